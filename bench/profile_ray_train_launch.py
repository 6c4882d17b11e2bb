"""Timeline of one train stage on Ray: where its fixed seconds go (issue 14, target <= 5 s).

    .venv/bin/python bench/profile_ray_train_launch.py ROOT [KIMG=0.032 in the environment]

Runs `launch_training` once for the tiny CycleGAN of bench_ray_overhead.py (data prepared under
ROOT on the first call) and prints when each step happened, in seconds after launch_training was
called: the MLflow plan (driver), connect (local Ray started, or a head joined when
PIPELINE_CLUSTER_STATE names a running `pipeline cluster up`), fit(), the worker process's creation
(psutil) and its `_worker_loop` entry/exit (a wrapper around the production loop writes them), the
delivery and ray.shutdown; and which heavy modules the worker had imported at entry and exit.
"fixed" = launch_training's wall time minus the worker loop (the engine run, MLflow included).
"""
import json, os, sys, time
from pathlib import Path
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
T0 = time.time()
import pipeline  # noqa
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
os.environ["PIPELINE_PROGRESS"] = "off"
os.environ.setdefault("PIPELINE_CLUSTER_STATE", str(root / "none.json"))
from bench_ray_overhead import _params
from pipeline.config import PrepareParams, from_dict
if not (root / "prepared").exists():
    from pipeline.data.prepare import run_prepare
    run_prepare(from_dict(PrepareParams, {"resolution": 16, "synthetic": {
        "classes": ["scratch", "spot"], "per_class": 12, "normal": 24, "paired": 2}}, "prepare"), root / "prepared", quiet=True)
t_imp = time.time()
from pipeline.training import ray_train
t_imp2 = time.time()
marks = root / "marks"; marks.mkdir(exist_ok=True)
orig = ray_train._worker_loop
def timed_loop(config, _orig=orig, _marks=str(marks)):
    import time as _t, psutil, os as _os, sys as _sys, json as _json
    p = psutil.Process()
    d = {"proc_create": p.create_time(), "entry": _t.time(), "parent": p.ppid(),
         "mods_at_entry": sorted(m for m in ("mlflow", "albumentations", "pandas", "torch", "pipeline.tracking") if m in _sys.modules)}
    try:
        _orig(config)
    finally:
        d["exit"] = _t.time()
        d["mods_at_exit"] = sorted(m for m in ("mlflow", "albumentations", "pandas", "torch", "pipeline.tracking") if m in _sys.modules)
        open(f"{_marks}/worker{_os.getpid()}.json", "w").write(_json.dumps(d))
ray_train._worker_loop = timed_loop
# time the pieces on the driver
import ray
from pipeline import cluster
ev = {}
orig_fit = ray_train.PipelineTorchTrainer.fit
def fit(self):
    ev["fit_start"] = time.time(); r = orig_fit(self); ev["fit_end"] = time.time(); return r
ray_train.PipelineTorchTrainer.fit = fit
orig_deliver = ray_train.deliver
def deliver(*a):
    ev["deliver_start"] = time.time(); r = orig_deliver(*a); ev["deliver_end"] = time.time(); return r
ray_train.deliver = deliver
orig_shutdown = ray.shutdown
def shutdown(*a, **k):
    ev["shutdown_start"] = time.time(); r = orig_shutdown(*a, **k); ev["shutdown_end"] = time.time(); return r
ray.shutdown = shutdown
orig_connect = cluster.connect
def connect(*a, **k):
    ev["connect_start"] = time.time(); r = orig_connect(*a, **k); ev["connect_end"] = time.time(); return r
cluster.connect = connect
from pipeline import tracking
orig_plan = tracking.plan_training_run
def plan(*a, **k):
    ev["plan_start"] = time.time(); r = orig_plan(*a, **k); ev["plan_end"] = time.time(); return r
tracking.plan_training_run = plan
params = _params(root, float(os.environ.get("KIMG", "0.032")), 8)
from pipeline.training.loop import TrainJob
t_launch = time.time()
job = TrainJob.from_params(params, "cyclegan", root / "prepared", root / f"out{time.time():.0f}")
s = ray_train.launch_training(job, params.ray, False, None, None)
t_done = time.time()
w = [json.loads(p.read_text()) for p in marks.glob("worker*.json")][-1]
for p in marks.glob("*.json"): p.unlink()
rel = lambda t: f"{t - t_launch:7.2f}"
print(f"import ray_train            {t_imp2 - t_imp:6.2f} s (driver)")
print(f"launch start -> plan        {rel(ev['plan_start'])} .. {rel(ev['plan_end'])}")
print(f"connect                     {rel(ev['connect_start'])} .. {rel(ev['connect_end'])}  ({s['ray']})")
print(f"fit() start                 {rel(ev['fit_start'])}")
print(f"worker process created      {rel(w['proc_create'])}")
print(f"worker loop entry           {rel(w['entry'])}   modules {w['mods_at_entry']}")
print(f"worker loop exit            {rel(w['exit'])}   modules {w['mods_at_exit']}")
print(f"fit() end                   {rel(ev['fit_end'])}")
print(f"deliver                     {rel(ev['deliver_start'])} .. {rel(ev['deliver_end'])}")
if 'shutdown_start' in ev: print(f"ray.shutdown                {rel(ev['shutdown_start'])} .. {rel(ev['shutdown_end'])}")
print(f"launch_training returns     {rel(t_done)}")
print("engine-side (loop entry->exit)", f"{w['exit'] - w['entry']:.2f}", "fixed =", f"{(t_done - t_launch) - (w['exit'] - w['entry']):.2f}")
