"""Ray Train launcher: multi-worker training, fault tolerance, --resume, two nodes, CLI errors.

Every fit() costs ~16-20 s on 2 cores, so one uninterrupted 2-worker run (`baseline`) is shared:
the killed run and the resumed run must end with exactly its generator weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from worker_hooks import install as install_hooks
from worker_hooks import reporter_wrapper

TINY_TRAIN = {
    # 2 workers x batch 4 = 8 images per iteration; ticks of 16 images; snapshots at 32 and 64.
    "common": {"seed": 0, "kimg": 0.08, "batch_size": 4, "tick_kimg": 0.016, "snapshot_ticks": 2,
               "max_failures": 1, "ema_decay": 0.9, "register_model": "defect-synth-test-dcgan"},
    "dcgan": {"base_channels": 8, "d_base_channels": 8, "z_dim": 16},
}
FAMILY = "dcgan"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny prepared dataset, a tmp MLflow store (env var) and a Ray storage folder."""
    from pipeline.config import PrepareParams, from_dict
    from pipeline.data.prepare import run_prepare

    root = tmp_path_factory.mktemp("raytrain")
    prep = from_dict(PrepareParams, {"resolution": 16, "seed": 0, "synthetic": {
        "classes": ["scratch", "spot"], "per_class": 6, "normal": 12, "paired": 6}}, "prepare")
    run_prepare(prep, root / "prepared")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    yield root
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def make_params(root: Path, max_failures: int = 1, **ray):
    from pipeline.config import Params, from_dict

    train = {**TINY_TRAIN, "common": {**TINY_TRAIN["common"], "max_failures": max_failures}}
    ray_section = {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(root / "ray_results"), **ray}
    return from_dict(Params, {"train": train, "ray": ray_section}, "params")


def launch(params, data_dir: Path, out_dir: Path, ray_overrides: dict | None = None, **kwargs) -> dict:
    """`pipeline train` without the CLI: the run spec and the resources built from params, then
    launch_training (FAMILY)."""
    from pipeline.training.loop import TrainJob
    from pipeline.training.ray_train import launch_training

    return launch_training(TrainJob.from_params(params, FAMILY, data_dir, out_dir),
                           params.ray.with_overrides(ray_overrides or {}), **kwargs)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def local_ray(workspace):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def baseline(workspace, local_ray):
    out = workspace / "models-baseline" / FAMILY
    summary = launch(make_params(workspace), workspace / "prepared", out, ray_overrides={},
                     resume=False, run_name=unique("baseline"), dvc_stage=f"train@{FAMILY}")
    return summary


def generator_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(Path(out_dir) / "generator_ema.pt", map_location="cpu", weights_only=True)
    return {f"{net}.{k}": v for net, sd in state["generators"].items() for k, v in sd.items()}


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = generator_tensors(a), generator_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def runs_named(run_name: str):
    client = mlflow_client()
    exp = client.get_experiment_by_name(f"defect-synth/{FAMILY}")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`ray.run_name` = '{run_name}'")


def steps(run_id: str, key: str = "D/loss") -> list[int]:
    return [m.step for m in mlflow_client().get_metric_history(run_id, key)]


class Killer(threading.Thread):
    """SIGKILLs rank 1's process once both ranks hold after the first checkpoint and the Train
    controller has recorded that checkpoint in the run folder (it polls workers every 0.2 s)."""

    def __init__(self, hook_dir: Path, run_dir: Path, timeout: float = 240.0, start_timeout: float = 600.0):
        super().__init__(daemon=True)
        self.hook_dir, self.run_dir, self.timeout, self.start_timeout = hook_dir, run_dir, timeout, start_timeout
        self.killed_pid, self.error = None, None

    def ready(self) -> bool:
        snapshot = self.run_dir / "checkpoint_manager_snapshot.json"
        held = all((self.hook_dir / f"held-rank{r}").exists() for r in (0, 1))
        return held and snapshot.exists() and "checkpoint-000000032" in snapshot.read_text()

    def run(self):
        # The checkpoint deadline counts from the workers' start, not from the launch: on a loaded
        # machine Ray took 3.5 min to start the two workers (2026-12-06, load 5-6).
        start_deadline = time.monotonic() + self.start_timeout
        while not all((self.hook_dir / f"rank{r}.pid").exists() for r in (0, 1)):
            if time.monotonic() > start_deadline:
                self.error = "workers never started"
                return
            time.sleep(0.05)
        deadline = time.monotonic() + self.timeout
        while not self.ready():
            if time.monotonic() > deadline:
                self.error = "workers never reached the first checkpoint"
                return
            time.sleep(0.05)
        self.killed_pid = int((self.hook_dir / "rank1.pid").read_text())
        os.kill(self.killed_pid, signal.SIGKILL)
        # Let rank 0 go on: it fails at its next collective and Ray restarts the group at once
        # (a worker still held would keep the group alive until the hold times out).
        (self.hook_dir / "release").touch()


def started_from(hook_dir: Path, rank: int = 0) -> list[int]:
    """nimg each attempt of `rank` started from (the hook appends one line per attempt)."""
    return [int(line.split()[1]) for line in (hook_dir / f"rank{rank}.log").read_text().splitlines()]


@pytest.fixture
def hook_dir(tmp_path):
    """The folder of the fault-injecting reporter (tests/worker_hooks.py); pass
    `wrap_reporter=reporter_wrapper(hook_dir)` to launch, or install it for the CLI."""
    d = tmp_path / "hook"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- fast: CLI errors

def invoke(args, env=None):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, args, env=env)


def test_unknown_stage_lists_families():
    from pipeline.models import REGISTRY

    res = invoke(["train", "--stage", "nosuchgan"])
    assert res.exit_code != 0
    assert "nosuchgan" in res.output and all(name in res.output for name in REGISTRY)
    assert "Traceback" not in res.output


def test_bad_params_name_the_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"train": {"common": {"kimgg": 1}}}))
    res = invoke(["train", "--stage", FAMILY, "--params", str(bad)])
    assert res.exit_code == 2
    assert "train.common.kimgg" in res.output and "train.common.kimg" in res.output
    assert "Traceback" not in res.output

    bad.write_text(yaml.safe_dump({"ray": {"num_workers": 0}}))
    res = invoke(["train", "--stage", FAMILY, "--params", str(bad), "--data", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_bad_ray_override_and_missing_data(workspace, tmp_path):
    from pipeline.errors import DataError, ParamsError
    with pytest.raises(ParamsError, match="ray.cpus_per_worker"):
        launch(make_params(workspace), workspace / "prepared", tmp_path / "out",
               ray_overrides={"cpus_per_worker": -1}, resume=False, run_name=None, dvc_stage=None)
    with pytest.raises(DataError, match="pipeline prepare"):
        launch(make_params(workspace), tmp_path / "nothing", tmp_path / "out",
               ray_overrides={}, resume=False, run_name=None, dvc_stage=None)


def write_params(root: Path, path: Path, max_failures: int = 1) -> Path:
    train = {**TINY_TRAIN, "common": {**TINY_TRAIN["common"], "max_failures": max_failures}}
    path.write_text(yaml.safe_dump({"train": train, "ray": {
        "num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(root / "ray_results")}}))
    return path


def test_tracking_server_down_fails_before_training(workspace, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    params = write_params(workspace, tmp_path / "params.yaml")
    name = unique("down")
    start = time.monotonic()
    res = invoke(["train", "--stage", FAMILY, "--params", str(params), "--data", str(workspace / "prepared"),
                  "--out", str(tmp_path / "out"), "--run-name", name], env={"MLFLOW_TRACKING_URI": url})
    assert res.exit_code != 0
    assert url in res.output and "pipeline ui" in res.output and "MLFLOW_TRACKING_URI" in res.output
    assert "Traceback" not in res.output
    assert time.monotonic() - start < 20
    assert not (workspace / "ray_results" / name).exists()   # Ray never started training
    assert not (tmp_path / "out").exists()


def test_resume_without_a_run_is_a_clear_error(workspace, tmp_path):
    params = write_params(workspace, tmp_path / "params.yaml")
    res = invoke(["train", "--stage", FAMILY, "--params", str(params), "--data", str(workspace / "prepared"),
                  "--out", str(tmp_path / "out"), "--resume", "--run-name", "never-ran"])
    assert res.exit_code != 0 and "never-ran" in res.output and "does not exist" in res.output
    assert "Traceback" not in res.output


def test_fresh_run_name_never_resumes_silently(workspace, tmp_path):
    from pipeline.errors import TrainingError
    from pipeline.training.run_folders import choose_run_name

    storage = tmp_path / "runs"
    (storage / "mine").mkdir(parents=True)
    with pytest.raises(TrainingError, match="--resume"):
        choose_run_name(str(storage), FAMILY, "mine", resume=False)
    name = choose_run_name(str(storage), FAMILY, None, resume=False)
    assert name.startswith(f"{FAMILY}-") and name != "mine"


# --------------------------------------------------------------------------- slow: real Ray runs

@pytest.mark.slow
def test_two_workers_outputs_and_mlflow_run(workspace, baseline):
    import mlflow

    from pipeline import tracking

    out = Path(baseline["out_dir"])
    for name in ("generator_ema.pt", "checkpoint.pt", "metrics.json", "loss_curves.png", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    assert baseline["world_size"] == 2 and len(baseline["worker_nodes"]) == 2
    assert baseline["metrics"]["kimg"] == pytest.approx(0.08)

    (run,) = runs_named(baseline["run_name"])
    assert run.info.run_id == baseline["mlflow_run_id"] and run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["common.kimg"] == "0.08" and params["dcgan.base_channels"] == "8" and params["family"] == FAMILY
    assert tags["family"] == FAMILY and tags["dvc_stage"] == f"train@{FAMILY}"
    assert tags["dataset_hash"] == tracking.dataset_hash(workspace / "prepared")
    assert tags["ray.num_workers"] == "2" and tags["ray.num_nodes"] == "1"
    assert "git_commit" in tags
    assert steps(run.info.run_id) == [16, 32, 48, 64, 80]   # step = images shown, once each
    for key in ("G/loss", "lr/G", "lr/D", "img_per_s", "gflop_per_s", "kimg"):
        assert key in run.data.metrics, key

    client = mlflow_client()
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/grid-000000032.png", "samples/grid-000000064.png"]
    final = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert final == {"final/metrics.json", "final/loss_curves.png", "final/samples.png"}

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/generator")
    expected = torch.load(out / "generator_ema.pt", weights_only=True)["generators"]
    (gen_state,) = expected.values()
    loaded = model.state_dict()
    assert loaded.keys() == gen_state.keys()
    assert all(torch.equal(loaded[k], gen_state[k]) for k in gen_state)   # the EMA weights
    versions = client.search_model_versions("name = 'defect-synth-test-dcgan'")
    assert run.info.run_id in {v.run_id for v in versions}


@pytest.mark.slow
def test_worker_error_is_reported_clearly(workspace, local_ray, tmp_path):
    """A PipelineError raised inside a worker (here: an empty data shard) reaches the user as is."""
    from pipeline.config import PrepareParams, from_dict
    from pipeline.data.prepare import run_prepare
    from pipeline.errors import TrainingError
    small = tmp_path / "prepared"
    run_prepare(from_dict(PrepareParams, {"resolution": 16, "split": {"train": 1.0, "val": 0.0, "test": 0.0},
                                          "synthetic": {"classes": ["scratch"], "per_class": 1, "normal": 1,
                                                        "paired": 0}}, "prepare"), small)
    with pytest.raises(TrainingError, match="training pool 'images' is empty on this worker"):
        launch(make_params(workspace, max_failures=0, num_workers=3), small, tmp_path / "out",
               ray_overrides={}, resume=False, run_name=unique("error"), dvc_stage=None)


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_weights(workspace, baseline, hook_dir):
    name = unique("killed")
    killer = Killer(hook_dir, workspace / "ray_results" / name)
    killer.start()
    out = workspace / "models-killed" / FAMILY
    summary = launch(make_params(workspace, max_failures=1), workspace / "prepared", out,
                     ray_overrides={}, resume=False, run_name=name, dvc_stage=None,
                     wrap_reporter=reporter_wrapper(hook_dir))
    killer.join(5)
    assert killer.error is None and killer.killed_pid is not None
    assert int((hook_dir / "rank1.pid").read_text()) != killer.killed_pid   # a new worker process
    assert started_from(hook_dir) == [0, 32]     # the retry resumed from the checkpoint at 32 images
    assert_same_weights(out, Path(baseline["out_dir"]))

    (run,) = runs_named(name)               # the same MLflow run across the restart
    assert run.info.run_id == summary["mlflow_run_id"]
    assert steps(run.info.run_id) == steps(baseline["mlflow_run_id"])


@pytest.mark.slow
def test_stopped_run_continues_with_resume(workspace, baseline, hook_dir, tmp_path, monkeypatch):
    from pipeline.errors import TrainingError
    name = unique("stopped")
    params_file = write_params(workspace, tmp_path / "params.yaml", max_failures=0)
    out = workspace / "models-resumed" / FAMILY
    killer = Killer(hook_dir, workspace / "ray_results" / name)
    killer.start()
    with pytest.raises(TrainingError, match="--resume"):
        launch(make_params(workspace, max_failures=0), workspace / "prepared", out,
               ray_overrides={}, resume=False, run_name=name, dvc_stage=None,
               wrap_reporter=reporter_wrapper(hook_dir))
    killer.join(5)
    assert killer.killed_pid is not None and not out.exists()
    (first,) = runs_named(name)

    install_hooks(hook_dir, monkeypatch.setattr)
    res = invoke(["train", "--stage", FAMILY, "--params", str(params_file), "--data", str(workspace / "prepared"),
                  "--out", str(out), "--resume", "--run-name", name])
    assert res.exit_code == 0, res.output
    assert started_from(hook_dir) == [0, 32]
    assert_same_weights(out, Path(baseline["out_dir"]))
    (run,) = runs_named(name)                # continued, not a second run
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert steps(run.info.run_id) == steps(baseline["mlflow_run_id"])


@pytest.mark.slow
def test_stage_with_its_own_ray_starts_train_without_runtime_envs(workspace, baseline, hook_dir, tmp_path):
    """`pipeline train` starting its own local Ray (as under `dvc repro`) gives neither the job nor
    the Train workers a runtime_env (so Ray can run them in the node's prestarted worker processes:
    issue 14's fixed cost); the workers still have the package's settings (inherited from the node),
    a killed worker is restarted and resumes, and the weights equal the baseline's, which Ray Train
    launched its own way (runtime_envs, the test's ray.init)."""
    name = unique("inherit")
    params = write_params(workspace, tmp_path / "params.yaml")
    out = tmp_path / "models" / FAMILY
    killer = Killer(hook_dir, workspace / "ray_results" / name)
    killer.start()
    res = run_cli(["train", "--stage", FAMILY, "--params", str(params), "--data", str(workspace / "prepared"),
                   "--out", str(out), "--run-name", name],
                  {"PIPELINE_CLUSTER_STATE": str(tmp_path / "no-cluster.json")}, hook_dir=hook_dir)
    killer.join(5)
    assert res.returncode == 0, res.stderr[-3000:]
    assert killer.error is None and killer.killed_pid is not None
    assert started_from(hook_dir) == [0, 32]
    for rank in (0, 1):
        env = json.loads((hook_dir / f"rank{rank}.env.json").read_text())
        assert env == {"runtime_env": {}, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                       "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       "OMP_WAIT_POLICY": "PASSIVE",
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}, rank   # Ray's 1 per 0.5 CPU
    assert_same_weights(out, Path(baseline["out_dir"]))


@pytest.mark.slow
def test_two_node_cluster_places_ranks_on_both_nodes(workspace, local_ray):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()   # leave the module's local instance; this test brings its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        name = unique("twonode")
        summary = launch(make_params(workspace, num_workers=2, cpus_per_worker=1.0),
                         workspace / "prepared", workspace / "models-twonode" / FAMILY,
                         ray_overrides={"address": cluster.address}, resume=False, run_name=name,
                                  dvc_stage=None)
        assert len(set(summary["worker_nodes"])) == 2
        (run,) = runs_named(name)
        assert run.data.tags["ray.num_nodes"] == "2" and run.data.tags["ray.cluster_nodes"] == "2"
        assert (workspace / "models-twonode" / FAMILY / "generator_ema.pt").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()


# --------------------------------------------------------------------------- issue 14: console, plots

def test_loss_curves_tsv_has_a_row_per_tick():
    from pipeline.training.delivery import loss_curves_tsv

    history = [{"nimg": 16, "kimg": 0.016, "D/loss": 1.5, "G/loss": 2.25, "lr/G": 1e-3, "img_per_s": 9.0},
               {"nimg": 32, "kimg": 0.032, "D/loss": 1.25, "G/loss": 2.0, "G/cyc": 0.5}]
    assert loss_curves_tsv(history).splitlines() == [
        "kimg\tD/loss\tG/cyc\tG/loss", "0.016\t1.5\t\t2.25", "0.032\t1.25\t0.5\t2"]


def test_progress_watch_moves_the_bar_and_names_a_restart(capsys):
    from pipeline import console
    from pipeline.training.ray_progress import ProgressWatch, progress_figures, progress_note

    tick = {"img_per_s": 95.4, "D/loss": 0.41234, "G/loss": 2.1, "lr/G": 0.1}
    assert progress_figures(tick) == {"img_per_s": 95.4, "D/loss": 0.41234, "G/loss": 2.1}
    assert progress_note(tick) == "95 img/s · D 0.412 · G 2.1"
    bar = console.Progress("train x", total=0.08, unit="kimg", precision=2, mode="off")
    watch = ProgressWatch("unused", bar, "train x")
    watch.show({"attempt": "a1", "nimg": 0, "started": True})
    assert bar.completed == 0 and bar.note == "workers started"
    watch.show({"attempt": "a1", "nimg": 48, **progress_figures(tick)})
    assert bar.completed == pytest.approx(0.048) and bar.note == progress_note(tick)
    assert capsys.readouterr().err == ""
    watch.show({"attempt": "b2", "nimg": 32, "started": True})      # Ray Train restarted the worker group
    assert bar.completed == pytest.approx(0.032)
    assert capsys.readouterr().err == "  train x: Ray Train restarted the workers; resuming from 0.032 kimg\n"


def run_cli(args, env_extra, timeout=900, hook_dir: Path | None = None):
    """`pipeline ARGS` in a process of its own; with the fault-injecting reporter when hook_dir is given."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PIPELINE_VERBOSE")}
    env.update({"PYTHONUNBUFFERED": "1", "PIPELINE_PROGRESS_INTERVAL_S": "3", **env_extra})
    entry = ["-m", "pipeline.cli"] if hook_dir is None else [str(Path(__file__).with_name("worker_hooks.py")),
                                                             str(hook_dir)]
    return subprocess.run([sys.executable, *entry, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_training_stage_prints_its_two_lines_and_progress_only(workspace, tmp_path):
    """Under DVC (DVC_STAGE set) a fresh process: no Ray, Ray Train or MLflow line of their own."""
    params = write_params(workspace, tmp_path / "params.yaml")
    out = tmp_path / "models" / FAMILY
    res = run_cli(["train", "--stage", FAMILY, "--params", str(params), "--data", str(workspace / "prepared"),
                   "--out", str(out), "--num-workers", "1", "--run-name", unique("quiet"),
                   "--headline", str(tmp_path / "headline.json")],
                  {"DVC_STAGE": f"train@{FAMILY}", "PIPELINE_CLUSTER_STATE": str(tmp_path / "no-cluster.json")})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (res.stdout + res.stderr).splitlines()
    own = [ln for ln in lines if not ln.startswith(f"  train {FAMILY}: ")]      # minus the periodic progress lines
    assert len(own) == 2, lines
    assert own[0] == f"▶ train@{FAMILY}  {FAMILY}, 0.08 kimg on 1 Ray Train worker(s)"
    assert own[1].startswith(f"✓ train@{FAMILY}  0.08 kimg, ") and "local Ray" in own[1]
    assert json.loads((tmp_path / "headline.json").read_text()).keys() == {"kimg", "D_loss", "G_loss"}
    assert (out / "loss_curves.tsv").read_text().splitlines()[0].startswith("kimg\tD/")

    verbose = run_cli(["--verbose", "train", "--stage", FAMILY, "--params", str(params),
                       "--data", str(workspace / "prepared"), "--out", str(tmp_path / "v" / FAMILY),
                       "--num-workers", "1", "--run-name", unique("verbose")],
                      {"PIPELINE_CLUSTER_STATE": str(tmp_path / "no-cluster.json")})
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    # Ray's own INFO lines are back (which ones depends on timing: Ray Train's "Reporting training
    # result" appeared in some runs and not in others under load; Ray core's start line always).
    verbose_out = verbose.stdout + verbose.stderr
    assert "Started a local Ray instance" in verbose_out or "Reporting training result" in verbose_out


@pytest.mark.slow
def test_a_worker_bug_shows_its_full_traceback(workspace, tmp_path, hook_dir):
    (hook_dir / "raise").touch()
    params = write_params(workspace, tmp_path / "params.yaml", max_failures=0)
    res = run_cli(["train", "--stage", FAMILY, "--params", str(params), "--data", str(workspace / "prepared"),
                   "--out", str(tmp_path / "out"), "--num-workers", "1", "--run-name", unique("bug")],
                  {"PIPELINE_CLUSTER_STATE": str(tmp_path / "no-cluster.json")}, hook_dir=hook_dir)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "training worker rank 0 failed:" in text and "Traceback (most recent call last):" in text
    assert 'raise RuntimeError("injected by the test hook: a worker bug")' in text   # the worker's own frame
    assert "error: training failed (worker 0: RuntimeError" in text and "--resume" in text
