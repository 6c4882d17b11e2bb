#!/usr/bin/env bash
# A CPU preset through the stages, outside DVC, for a results folder: train each family, generate,
# evaluate and downstream on an already prepared dataset, timing each training.
#
#   bash bench/bench_preset_stages.sh PARAMS WORKDIR PREPARED ["defectgan stargan cyclegan"]
#
# PARAMS: a params.yaml with the preset (README "CPU preset for 64 px grey data"); PREPARED: the
# output of `pipeline prepare --params PARAMS`. Runs the checkout this script is in (PYTHONPATH),
# with its .venv; MLflow runs go to WORKDIR/mlflow.db. Prints TRAIN <family> <s> and TOTAL <s>.
set -euo pipefail
P=$(realpath "$1"); W=$(realpath -m "$2"); D=$(realpath "$3"); FAMS=${4:-"defectgan stargan cyclegan"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIPELINE="$ROOT/.venv/bin/pipeline"
mkdir -p "$W"; cd "$ROOT"; export PYTHONPATH="$ROOT"
export MLFLOW_TRACKING_URI="sqlite:///$W/mlflow.db" PIPELINE_PROGRESS=plain
S=$(date +%s)
for fam in $FAMS; do
  t=$(date +%s)
  "$PIPELINE" train --stage "$fam" --params "$P" --data "$D" --out "$W/models/$fam" --run-name "$fam-$(basename "$W")"
  echo "TRAIN $fam $(( $(date +%s) - t )) s"
done
for fam in $FAMS; do
  "$PIPELINE" generate --params "$P" --model "$fam" --models-dir "$W/models" --data "$D" --out "$W/synthetic/$fam"
done
"$PIPELINE" evaluate --params "$P" --data "$D" --synthetic "$W/synthetic" --out "$W/evaluate"
"$PIPELINE" downstream --params "$P" --data "$D" --synthetic "$W/synthetic" --out "$W/reports"
echo "TOTAL $(( $(date +%s) - S )) s"
