#!/usr/bin/env bash
# usage: elpv_product.sh PARAMS WORKDIR "families"
set -x
P=$1; W=$2; D=$3; FAMS=${4:-"defectgan stargan cyclegan"}
mkdir -p $W; cd /tmp/x/clone2; export PYTHONPATH=/tmp/x/clone2
export MLFLOW_TRACKING_URI=sqlite:///$W/mlflow.db
export PIPELINE_PROGRESS=plain
S=$(date +%s)
for fam in $FAMS; do
  t=$(date +%s); /work/main/.venv/bin/pipeline train --stage $fam --params $P --data $D --out $W/models/$fam --run-name elpv-$fam-$(basename $W); echo "TRAIN $fam $(( $(date +%s)-t )) s"
done
for fam in $FAMS; do
  /work/main/.venv/bin/pipeline generate --params $P --model $fam --models-dir $W/models --data $D --out $W/synthetic/$fam
done
/work/main/.venv/bin/pipeline evaluate --params $P --data $D --synthetic $W/synthetic --out $W/evaluate
/work/main/.venv/bin/pipeline downstream --params $P --data $D --synthetic $W/synthetic --out $W/reports
echo "TOTAL $(( $(date +%s)-S )) s"
