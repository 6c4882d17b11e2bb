"""MLflow tracking: store selection, name rules, the rank-0 run logger (restarts, outages), stage
logging that never fails a stage, and the UI server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def plan(uri: str, launch_id: str = "L1", name: str = "run-a") -> tracking.TrainTracking:
    return tracking.TrainTracking(uri=uri, experiment="defect-synth/test", run_name=name, launch_id=launch_id,
                                  params={"common.kimg": "0.1"}, tags={"family": "test", tracking.LAUNCH_TAG: launch_id})


def test_default_store_is_the_repo_sqlite_db(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{REPO_ROOT / 'mlflow.db'}" and Path(uri[len("sqlite:///"):]).is_absolute()
    assert tracking.artifact_root(uri) == REPO_ROOT / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000" and tracking.artifact_root() is None


def test_metric_names_are_sanitized():
    assert tracking.sanitize_name("D/loss") == "D/loss"
    assert tracking.sanitize_name("progress/alpha:fade-in 1.0") == "progress/alpha:fade-in 1.0"
    assert tracking.sanitize_name("D(x)@real") == "D_x__real"
    assert tracking.sanitize_name("/a//b/") == "a/b"
    assert tracking.sanitize_name("../x") == "_/x"
    assert tracking.flat_params({"a": {"b": [1, 2]}, "c": None}) == {"a.b": "[1, 2]", "c": "None"}


def test_unreachable_server_is_a_clear_error_quickly():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError) as err:
        tracking.check_tracking(url)
    msg = str(err.value)
    assert url in msg and "pipeline ui" in msg and "unset MLFLOW_TRACKING_URI" in msg
    assert time.monotonic() - start < 5


def test_experiment_gets_an_explicit_artifact_location(store, tmp_path):
    c = client(store)
    exp_id = tracking.ensure_experiment(c, "defect-synth/x", store)
    assert c.get_experiment(exp_id).artifact_location == (tmp_path / "mlartifacts" / "defect-synth/x").as_uri()
    assert tracking.ensure_experiment(c, "defect-synth/x", store) == exp_id


def test_logger_continues_its_run_without_duplicate_steps(store, tmp_path):
    a = tracking.TrainRunLogger(plan(store), extra_tags={"ray.num_workers": 2})
    a.on_start(None, 0)
    a.on_tick(10, {"D/loss": 1.0, "bad@name": 2.0, "nan": float("nan")})
    a.on_tick(20, {"D/loss": 0.9, "bad@name": 2.0})
    state = a.state_dict()                  # what a checkpoint at nimg 20 holds
    a.on_tick(30, {"D/loss": 0.8})          # logged, then the worker dies

    b = tracking.TrainRunLogger(plan(store, launch_id="L2"))   # e.g. --resume: a new launch
    b.load_state_dict(state)
    b.on_start(None, 20)
    for nimg in (30, 40):                   # 30 is recomputed after the restart: not logged twice
        b.on_tick(nimg, {"D/loss": 0.5})
    grid = tmp_path / "grid-000000040.png"
    grid.write_bytes(b"png")
    b.on_snapshot(40, {}, None, grid)
    b.on_end(None, {}, None)

    assert b.run_id == a.run_id
    c = client(store)
    history = c.get_metric_history(a.run_id, "D/loss")
    assert [m.step for m in history] == [10, 20, 30, 40] and history[2].value == 0.8
    run = c.get_run(a.run_id)
    assert "bad_name" in run.data.metrics and "nan" not in run.data.metrics
    assert run.data.params == {"common.kimg": "0.1"} and run.data.tags["ray.num_workers"] == "2"
    assert run.info.status == "FINISHED"
    assert [f.path for f in c.list_artifacts(a.run_id, "samples")] == ["samples/grid-000000040.png"]

    # A retry of the same launch that died before its first checkpoint finds the run by launch id.
    again = tracking.TrainRunLogger(plan(store, launch_id="L2"))
    again.on_start(None, 0)
    assert again.run_id == a.run_id and again.last_step == 40


def test_logger_buffers_while_the_store_is_down(tmp_path):
    """Nothing raises while the server is unreachable; one warning; state keeps what is unsent."""
    down = f"http://127.0.0.1:{free_port()}"
    logger = tracking.TrainRunLogger(plan(down))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.on_start(None, 0)
        for nimg in (10, 20, 30):
            logger.on_tick(nimg, {"D/loss": 1.0})
    assert len([w for w in caught if issubclass(w.category, tracking.TrackingWarning)]) == 1
    assert [step for step, _ in logger.state_dict()["pending_metrics"]] == [10, 20, 30]


def test_stage_logging(store, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"swd": 0.1}))
    run_id = tracking.log_evaluation({"swd": {"cyclegan": 0.12, "stargan": 0.2}, "name": "x"}, [report])
    c = client(store)
    run = c.get_run(run_id)
    assert run.data.metrics == {"swd.cyclegan": 0.12, "swd.stargan": 0.2}
    assert c.get_experiment(run.info.experiment_id).name == "defect-synth/evaluate"
    assert [f.path for f in c.list_artifacts(run_id)] == ["report.json"]

    gen = tracking.log_generation({"model": "cyclegan", "per_class": 4}, {"kept": 8}, [])
    assert c.get_run(gen).data.params == {"model": "cyclegan", "per_class": "4"}
    down = tracking.log_downstream({"acc": 0.9}, [])
    assert c.get_experiment(c.get_run(down).info.experiment_id).name == "defect-synth/downstream"


def test_stage_logging_never_fails_the_stage(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.warns(tracking.TrackingWarning, match="outputs are unaffected"):
        assert tracking.log_evaluation({"swd": 0.1}, []) is None
    assert time.monotonic() - start < 5


def test_ui_refuses_a_busy_port(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(tracking.TrackingError, match="in use"):
            tracking.serve_ui("127.0.0.1", s.getsockname()[1])


# --------------------------------------------------------------------------- slow: a real server

def start_ui(port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, "pipeline ui exited"
    proc.kill()
    raise AssertionError("pipeline ui did not answer /health within 90 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pipeline.config import PrepareParams, from_dict
    from pipeline.data.prepare import run_prepare

    out = tmp_path_factory.mktemp("trk") / "prepared"
    run_prepare(from_dict(PrepareParams, {"resolution": 16, "synthetic": {
        "classes": ["scratch"], "per_class": 6, "normal": 12, "paired": 2}}, "prepare"), out)
    return out


@pytest.mark.slow
def test_server_drops_mid_run_and_training_finishes(tmp_path, prepared):
    """`pipeline ui` serves the store; it is stopped after tick 2 and restarted after tick 4 while the
    engine trains with the MLflow logger: training finishes, every tick is logged exactly once."""
    from pipeline.config import Params, from_dict, train_params
    from pipeline.training.loop import TrainJob, train

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": db}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = {"proc": start_ui(port, env)}
    try:
        body = json.dumps({"experiment_ids": ["0"], "max_results": 1}).encode()
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:   # the REST API answers
            assert resp.status == 200

        params = from_dict(Params, {"train": {
            "common": {"kimg": 0.06, "batch_size": 4, "tick_kimg": 0.01, "snapshot_ticks": 2},
            "dcgan": {"base_channels": 8, "d_base_channels": 8, "z_dim": 16}}}, "params")
        common, cfg = train_params(params, "dcgan")
        job = TrainJob("dcgan", common, cfg, prepared, tmp_path / "out", tmp_path / "work")
        os.environ["MLFLOW_TRACKING_URI"] = url
        try:
            trk = tracking.plan_training_run("dcgan", "drop", "L-drop", job.resolved_config(), prepared, None, None)
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI")
        logger = tracking.TrainRunLogger(trk)

        class Chaos:
            """Forwards to the logger; stops the server after tick 2, restarts it after tick 4."""
            ticks = 0

            def __getattr__(self, name):
                return getattr(logger, name)

            def on_tick(self, nimg, metrics):
                logger.on_tick(nimg, metrics)
                Chaos.ticks += 1
                if Chaos.ticks == 2:
                    stop(server["proc"])
                elif Chaos.ticks == 4:
                    server["proc"] = start_ui(port, env)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = train(job, Chaos())
        assert metrics["kimg"] == pytest.approx(0.06)
        assert any(issubclass(w.category, tracking.TrackingWarning) for w in caught)
        assert (tmp_path / "out" / "generator_ema.pt").exists()

        c = client(url)
        run = c.get_run(logger.run_id)
        assert [m.step for m in c.get_metric_history(run.info.run_id, "D/loss")] == [12, 20, 32, 40, 52, 60]
        assert run.info.status == "FINISHED" and "pipeline.model_uri" in run.data.tags
        assert {f.path for f in c.list_artifacts(run.info.run_id, "samples")} == {
            "samples/grid-000000020.png", "samples/grid-000000040.png"}
    finally:
        stop(server["proc"])


# --------------------------------------------------------------------------- issue 14: registry, repro id, lineage

def test_repro_id_is_the_dvc_process_of_the_stage(tmp_path, monkeypatch):
    """Two stage processes under one `dvc` process get the same id; outside DVC there is none."""
    monkeypatch.delenv(tracking.REPRO_ENV, raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert tracking.repro_id() is None
    fake_dvc = tmp_path / "dvc"     # a stand-in named like the real entry point, running two "stages"
    fake_dvc.write_text(f"#!{sys.executable}\n"
                        "import os, subprocess, sys\n"
                        "code = 'from pipeline.tracking import repro_id; print(repro_id())'\n"
                        "ids = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,\n"
                        "                      env={**os.environ, 'DVC_STAGE': s}).stdout.strip() for s in ('a', 'b')]\n"
                        "print(os.getpid(), *ids)\n")
    fake_dvc.chmod(0o755)
    pid, first, second = subprocess.run([str(fake_dvc)], capture_output=True, text=True, check=True,
                                        cwd=REPO_ROOT).stdout.split()
    assert first == second and first.startswith("dvc-") and first.endswith(f"-{pid}")
    monkeypatch.setenv(tracking.REPRO_ENV, "by-hand-1")
    assert tracking.repro_id() == "by-hand-1" and tracking.run_context_tags()[tracking.REPRO_TAG] == "by-hand-1"


def test_trained_generator_is_a_tagged_model_version_and_lineage_finds_it(store, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv(tracking.REPRO_ENV, "repro-7")
    out = tmp_path / "final" / "cyclegan"
    out.mkdir(parents=True)
    (out / "generator_ema.pt").write_bytes(b"generator weights")
    p = plan(store)
    p.experiment, p.register_model = "defect-synth/cyclegan", "defect-synth-test-cyclegan"
    p.tags.update({"dataset_hash": "d" * 64, tracking.REPRO_TAG: tracking.repro_id(), "family": "cyclegan"})
    logger = tracking.TrainRunLogger(p)
    logger.on_start(None, 0)
    logger.on_end(out, {"D/loss": 1.0}, torch.nn.Linear(2, 2))

    c = client(store)
    run = c.get_run(logger.run_id)
    sha = tracking.file_sha256(out / "generator_ema.pt")
    assert run.data.tags[tracking.GENERATOR_SHA_TAG] == sha
    (version,) = c.search_model_versions("name = 'defect-synth-test-cyclegan'")
    assert run.data.tags[tracking.MODEL_VERSION_TAG] == f"defect-synth-test-cyclegan/{version.version}"
    assert version.run_id == logger.run_id
    assert {k: version.tags[k] for k in ("dataset_hash", tracking.GENERATOR_SHA_TAG, tracking.REPRO_TAG,
                                         "train_run_id")} == {"dataset_hash": "d" * 64, tracking.GENERATOR_SHA_TAG: sha,
                                                              tracking.REPRO_TAG: "repro-7", "train_run_id": logger.run_id}

    # generate, then evaluate: each finds what it used through the files it read.
    models = tmp_path / "models" / "cyclegan"
    models.mkdir(parents=True)
    (models / "generator_ema.pt").write_bytes(b"generator weights")     # delivered byte for byte
    gen_tags = tracking.lineage_for_model(models)
    assert gen_tags == {"lineage.generator_sha256": sha, "lineage.train_run_id": logger.run_id,
                        "lineage.model_version": f"defect-synth-test-cyclegan/{version.version}"}
    synthetic = tmp_path / "synthetic" / "cyclegan"
    synthetic.mkdir(parents=True)
    (synthetic / "manifest.json").write_text('{"model": "cyclegan"}')
    gen_run = tracking.log_generation({"model": "cyclegan"}, {"generated": 8}, [], tags={
        **gen_tags, tracking.MANIFEST_SHA_TAG: tracking.file_sha256(synthetic / "manifest.json")})
    with tracking.stage_tags(tracking.lineage_for_synthetic(tmp_path / "synthetic", ["cyclegan", "stargan"])):
        eval_run = tracking.log_evaluation({"swd": 0.1}, [])
    plain_run = tracking.log_evaluation({"swd": 0.2}, [])                  # outside: no lineage tags
    tags = c.get_run(eval_run).data.tags
    assert tags["lineage.cyclegan.generate_run_id"] == gen_run
    assert tags["lineage.cyclegan.train_run_id"] == logger.run_id
    assert tags["lineage.cyclegan.model_version"] == f"defect-synth-test-cyclegan/{version.version}"
    assert not any(k.startswith("lineage.stargan") for k in tags)          # no synthetic set: nothing claimed
    assert tags[tracking.REPRO_TAG] == "repro-7" == c.get_run(gen_run).data.tags[tracking.REPRO_TAG]
    assert not any(k.startswith("lineage.") for k in c.get_run(plain_run).data.tags)


def test_default_registered_model_name_per_family(store, prepared):
    p = tracking.plan_training_run("cyclegan", "r1", "L9", {"family": "cyclegan"}, prepared, "train@cyclegan", None)
    assert p.register_model == "defect-synth-cyclegan" and p.tags["dvc_stage"] == "train@cyclegan"
    assert tracking.plan_training_run("cyclegan", "r2", "L10", {}, prepared, None, "mine").register_model == "mine"


# --------------------------------------------------------------------------- issue 30: what the UI shows

def test_experiments_open_in_the_model_training_view(store):
    c = client(store)
    new = tracking.ensure_experiment(c, "defect-synth/new", store)
    assert c.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = c.create_experiment("defect-synth/old")          # made before the tag existed
    assert tracking.EXPERIMENT_KIND_TAG not in c.get_experiment(old).tags
    assert tracking.ensure_experiment(c, "defect-synth/old", store) == old
    assert c.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    mine = c.create_experiment("defect-synth/mine", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.ensure_experiment(c, "defect-synth/mine", store)   # a user's choice is left alone
    assert c.get_experiment(mine).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_runs_are_named_by_stage_and_model_and_describe_their_lineage(store, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv(tracking.REPRO_ENV, "repro-30")
    out = tmp_path / "final" / "defectgan"
    out.mkdir(parents=True)
    (out / "generator_ema.pt").write_bytes(b"weights 30")
    p = plan(store, launch_id="L30", name="train-defectgan-r1")
    p.experiment, p.register_model = "defect-synth/defectgan", "defect-synth-test-defectgan"
    p.tags.update({"dataset_hash": "e" * 64, tracking.REPRO_TAG: tracking.repro_id(), "family": "defectgan",
                   "ray.run_name": "train-defectgan-r1"})
    logger = tracking.TrainRunLogger(p)
    logger.on_start(None, 0)
    c = client(store)
    assert "repro-30" in c.get_run(logger.run_id).data.tags[tracking.NOTE_TAG]     # visible while it trains
    logger.on_end(out, {"D/loss": 1.0}, torch.nn.Linear(2, 2))

    train = c.get_run(logger.run_id)
    sha = tracking.file_sha256(out / "generator_ema.pt")
    (version,) = c.search_model_versions("name = 'defect-synth-test-defectgan'")
    model_version = f"defect-synth-test-defectgan/{version.version}"
    assert c.get_experiment(train.info.experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    for text in (train.data.tags[tracking.NOTE_TAG], version.description):
        for value in ("repro-30", sha, logger.run_id, model_version, "e" * 64):
            assert value in text
        assert f"`{tracking.REPRO_TAG}`" in text and f"`{tracking.GENERATOR_SHA_TAG}`" in text
    assert version.description.startswith("EMA generator of defectgan run train-defectgan-r1")

    models = tmp_path / "models" / "defectgan"
    models.mkdir(parents=True)
    (models / "generator_ema.pt").write_bytes(b"weights 30")
    synthetic = tmp_path / "synthetic" / "defectgan"
    synthetic.mkdir(parents=True)
    (synthetic / "manifest.json").write_text('{"model": "defectgan"}')
    gen = c.get_run(tracking.log_generation({"model": "defectgan"}, {"generated": 8}, [], tags={
        **tracking.lineage_for_model(models), tracking.MANIFEST_SHA_TAG: tracking.file_sha256(synthetic / "manifest.json")}))
    assert gen.info.run_name.startswith("generate-defectgan-") and gen.data.tags["model"] == "defectgan"
    note = gen.data.tags[tracking.NOTE_TAG]
    assert "defectgan" in note.splitlines()[0]
    for key, value in (("lineage.train_run_id", logger.run_id), ("lineage.model_version", model_version),
                       ("lineage.generator_sha256", sha), (tracking.REPRO_TAG, "repro-30")):
        assert f"- `{key}`: {value}" in note

    with tracking.stage_tags(tracking.lineage_for_synthetic(tmp_path / "synthetic", ["defectgan"])):
        ev = c.get_run(tracking.log_evaluation({"swd": 0.1}, []))
        down = c.get_run(tracking.log_downstream({"acc": 0.9}, []))
    assert ev.info.run_name.startswith("evaluate-") and down.info.run_name.startswith("downstream-")
    for run in (ev, down):
        note = run.data.tags[tracking.NOTE_TAG]
        assert f"- `lineage.defectgan.generate_run_id`: {gen.info.run_id}" in note
        assert f"- `lineage.defectgan.model_version`: {model_version}" in note


def test_ui_server_logs_no_access_lines_unless_verbose():
    quiet = tracking.ui_command("127.0.0.1", 5001, "sqlite:////tmp/x.db")
    assert quiet[quiet.index("--uvicorn-opts") + 1] == "--no-access-log --log-level warning"
    assert "--uvicorn-opts" not in tracking.ui_command("127.0.0.1", 5001, "sqlite:////tmp/x.db", verbose=True)


@pytest.mark.slow
def test_ui_prints_one_line_for_several_page_loads(tmp_path, store):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "pipeline ui did not start"
                time.sleep(0.3)
        for path in ("/", "/health", "/api/2.0/mlflow/experiments/search?max_results=5") * 3:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
    finally:
        stop(proc)
    lines = [line for line in proc.stdout.read().splitlines() if line.strip()]
    assert lines[1:] == ["interrupted"], lines          # the stop (SIGTERM, as Ctrl+C) says so
    assert f"MLflow UI at http://127.0.0.1:{port}" in lines[0]
    log = Path(lines[0].split("server log ")[1].split(";")[0])
    assert "GET /" not in log.read_text()                # no access log, not even in the file
    log.unlink()
