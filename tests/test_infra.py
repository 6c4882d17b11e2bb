"""infra/: what can be checked offline, in seconds.

- the `ray up` config against the JSON schema Ray ships and Ray's own config preparation;
- the KubeRay RayCluster / RayJob: API version, kinds, required fields, and Ray's KubeRay
  translation (the one its autoscaler runs) turning each into a valid autoscaling config;
- the RayJob entrypoint is a real `pipeline train` command line for a known family;
- the Dockerfile installs what the README's set-up installs, in the same order;
- the MLflow / PostgreSQL / CI scripts: syntax, loopback defaults, no passwords on argv;
- `pipeline cluster up/down` PID bookkeeping, with a stand-in for `ray start`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
RAY_UP = INFRA / "ray" / "cluster-aws-gpu.yaml"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
START_SERVER = INFRA / "mlflow" / "start-server.sh"
PG_LOCAL = INFRA / "mlflow" / "postgres-local.sh"
CI_PACKAGES = INFRA / "ci-system-packages.sh"


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


# --------------------------------------------------------------------------- ray up (cloud)

def test_ray_up_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(RAY_UP.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)                    # exactly the file as written
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` checks after defaults

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and cfg["head_node_type"] not in gpu, "GPU workers, CPU head"
    for name in gpu:
        assert types[name]["max_workers"] >= 2
        assert "--gpus all" in types[name]["docker"]["worker_run_options"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]


def test_ray_up_security_and_image():
    cfg = yaml.safe_load(RAY_UP.read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in RAY_UP.read_text()
    assert "--disable-usage-stats" in head
    # Nothing installed at boot outside the pinned image.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert not any("pip install" in c for c in cfg.get(key, [])), key
    env = " ".join(cfg["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=http://" in env
    assert cfg["docker"]["image"] == image_name()


# --------------------------------------------------------------------------- KubeRay

def image_name() -> str:
    """The image tag the README's docker build produces."""
    match = re.search(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", (INFRA / "README.md").read_text())
    assert match, "infra/README.md shows the docker build command"
    return match.group(1)


def ray_cluster_spec_check(spec: dict, where: str) -> None:
    """Required KubeRay v1 fields, and Ray's own KubeRay -> autoscaler translation accepts it."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head Service must stay in-cluster"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: workerGroupSpecs"
    pods = [head["template"]] + [g["template"] for g in groups]
    for g in groups:
        for key in ("groupName", "rayStartParams", "template", "minReplicas", "maxReplicas", "replicas"):
            assert key in g, f"{where}: workerGroupSpecs[].{key}"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for pod in pods:
        containers = pod["spec"]["containers"]
        assert containers and containers[0]["image"] == image_name()
        env = {e["name"]: e for e in containers[0].get("env", [])}
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://"), "rank 0 may run on any pod"
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        for mount in containers[0].get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: volumeMount {mount['name']} has no volume"

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": "defect-synth", "namespace": "default"}, "spec": spec}
    autoscaling = _derive_autoscaling_config_from_ray_cr(cr)      # runs Ray's validate_config too
    gpu_types = [t for name, t in autoscaling["available_node_types"].items() if t["resources"].get("GPU")]
    assert gpu_types, f"{where}: a worker group with GPUs (nvidia.com/gpu limits)"


def test_kuberay_raycluster():
    docs = load_all(K8S / "raycluster.yaml")
    (cluster,) = by_kind(docs, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    ray_cluster_spec_check(cluster["spec"], "raycluster.yaml")
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] == cluster["metadata"]["name"]


def train_command_options() -> dict[str, set[str]]:
    import typer.main

    from pipeline.cli import app

    group = typer.main.get_command(app)
    return {name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
            for name, cmd in group.commands.items()}


def test_kuberay_rayjob_runs_pipeline_train():
    from pipeline.models import family_class

    (job,) = by_kind(load_all(K8S / "rayjob.yaml"), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    ray_cluster_spec_check(spec["rayClusterSpec"], "rayjob.yaml")

    entry = spec["entrypoint"]
    commands = [shlex.split(c) for c in re.split(r"&&|\|\|", entry)]
    options = train_command_options()
    trains = [c for c in commands if c[:2] == ["pipeline", "train"]]
    assert len(trains) == 1, entry
    for cmd in commands:
        if cmd[0] != "pipeline":
            continue
        sub = cmd[1]
        assert sub in options, f"unknown command pipeline {sub}"
        for token in cmd[2:]:
            if token.startswith("--"):
                assert token in options[sub], f"pipeline {sub} has no option {token}"
    train = trains[0]
    family = train[train.index("--stage") + 1]
    family_class(family)                          # a real GAN family
    assert "--use-gpu" in train and "--num-workers" in train


def test_k8s_manifests_parse_and_stay_in_cluster():
    for path in sorted(K8S.glob("*.yaml")):
        docs = load_all(path)
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
            assert doc["kind"] != "Ingress", "expose services through an auth proxy, not directly"
    (deploy,) = by_kind(load_all(K8S / "mlflow.yaml"), "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/app/infra/mlflow/start-server.sh"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"], "password from a Secret"
    assert "--allowed-hosts" in container["args"]


# --------------------------------------------------------------------------- Dockerfile vs README

SETUP_SCRIPT = INFRA / "setup-venv.sh"


def normalise(command: str) -> str:
    """A pip command without quiet/progress flags and with single spaces."""
    words = [w for w in command.split() if w not in ("-q", "-qq", "--quiet")]
    return " ".join(words)


def readme_setup_commands(text: str) -> list[str]:
    """The README's one-line set-up, split into commands."""
    lines = [line for line in text.splitlines() if "-m venv .venv" in line and "constraints.txt" in line]
    assert lines, "the README shows the one-line set-up"
    return [normalise(c) for c in lines[0].split("&&")]


def script_install_commands() -> list[str]:
    """The pip installs of infra/setup-venv.sh (what README.md's `bash infra/setup-venv.sh` runs)."""
    return [normalise(line) for line in SETUP_SCRIPT.read_text().splitlines()
            if line.strip().startswith(".venv/bin/pip install")]


def dockerfile_run_commands() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            commands += [normalise(c) for c in line[4:].split("&&")]
    return commands


def in_order(wanted: list[str], have: list[str], what: str) -> None:
    missing = [c for c in wanted if c not in have]
    assert not missing, f"the Dockerfile lacks {what}'s step(s) {missing}"
    positions = [have.index(c) for c in wanted]
    assert positions == sorted(positions), f"the Dockerfile runs {what}'s steps in another order"


def test_dockerfile_installs_what_the_readme_does():
    docker = dockerfile_run_commands()
    in_order(readme_setup_commands((INFRA / "README.md").read_text()), docker, "infra/README.md")
    if SETUP_SCRIPT.exists():                     # the top README's `bash infra/setup-venv.sh`
        installs = script_install_commands()
        assert len(installs) >= 2
        in_order(installs, docker, "infra/setup-venv.sh")
    assert "torch==2.13.0" in " ".join(docker)
    first = next(i for i, c in enumerate(docker) if "pip install torch==" in c)
    second = next(i for i, c in enumerate(docker) if "pip install -c constraints.txt -e" in c)
    assert first < second, "torch first, then the constrained install"

    # One torch / Python version everywhere.
    torch_pin = re.search(r"torch==([\w.]+)", " ".join(docker)).group(1)
    assert f"torch=={torch_pin}" in (REPO / "constraints.txt").read_text()
    assert f'"torch=={torch_pin}"' in (REPO / "pyproject.toml").read_text()
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith("python:3.11")
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE.read_text(), re.M), "the image does not run as root"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text()
    assert ".venv/" in ignore and ".git/" in ignore


# --------------------------------------------------------------------------- scripts

SCRIPTS = [START_SERVER, PG_LOCAL, CI_PACKAGES]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    assert os.access(script, os.X_OK), f"chmod +x {script}"
    subprocess.run(["bash", "-n", str(script)], check=True)


def run_start_server(*args, env=None, tmp_path=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    return subprocess.run(["bash", str(START_SERVER), "--print-command", "--data-dir", str(tmp_path / "srv"), *args],
                          capture_output=True, text=True, env={**base, **(env or {})}, timeout=30)


def test_mlflow_server_defaults(tmp_path):
    res = run_start_server(tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    cmd = shlex.split(out.splitlines()[-1])
    assert cmd[1] == "server"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--workers") + 1] == "1"
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "srv" / "artifacts")
    assert f"MLFLOW_BACKEND_STORE_URI=sqlite:///{tmp_path / 'srv' / 'mlflow.db'}" in out
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in out
    assert "WARNING" not in res.stderr


def test_mlflow_server_postgres_and_flags(tmp_path):
    res = run_start_server("--backend", "postgresql", "--port", "5055", "--artifacts-destination", "s3://b/art",
                           env={"MLFLOW_PG_USER": "u1", "MLFLOW_PG_DB": "d1", "PGPASSWORD": "secret-value"},
                           tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "MLFLOW_BACKEND_STORE_URI=postgresql://u1@127.0.0.1:5432/d1" in res.stdout
    assert "secret-value" not in res.stdout + res.stderr
    cmd = shlex.split(res.stdout.splitlines()[-1])
    assert cmd[cmd.index("--port") + 1] == "5055"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://b/art"

    # A password in the URI is refused (it would show in `ps` and shell history).
    res = run_start_server("--backend", "postgresql", "--postgres-uri", "postgresql://u:pw@h/db", tmp_path=tmp_path)
    assert res.returncode != 0 and "PGPASSWORD" in res.stderr

    # Another address only when asked, with a warning about authentication.
    res = run_start_server("--host", "0.0.0.0", "--allowed-hosts", "mlflow:5000", tmp_path=tmp_path)
    assert res.returncode == 0 and "WARNING" in res.stderr and "proxy" in res.stderr
    cmd = shlex.split(res.stdout.splitlines()[-1])
    assert cmd[cmd.index("--allowed-hosts") + 1] == "mlflow:5000"

    res = run_start_server("--backend", "mysql", tmp_path=tmp_path)
    assert res.returncode != 0 and "sqlite or postgresql" in res.stderr


def test_postgres_script_needs_a_password_from_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_PG_PASSWORD"}
    res = subprocess.run(["bash", str(PG_LOCAL)], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode != 0 and "MLFLOW_PG_PASSWORD" in res.stderr
    res = subprocess.run(["bash", str(PG_LOCAL)], capture_output=True, text=True, timeout=30,
                         env={**env, "MLFLOW_PG_PASSWORD": "x", "MLFLOW_PG_USER": "bad name; drop"})
    assert res.returncode != 0 and "identifier" in res.stderr


def test_no_credentials_committed():
    patterns = [re.compile(p) for p in (
        r"AKIA[0-9A-Z]{16}",                               # AWS access key id
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"postgres(?:ql)?://[^\s/:@]+:[^\s/@]+@",          # password inside a URI
        r"(?i)(password|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_\-]{8,}",
    )]
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        for pattern in patterns:
            for match in pattern.finditer(text):
                line = text[:match.start()].count("\n") + 1
                snippet = text.splitlines()[line - 1]
                # The refusal pattern in start-server.sh and `$VARIABLE` references are not secrets.
                if "$" in match.group(0) or "[^/@]" in snippet:
                    continue
                pytest.fail(f"{path.relative_to(REPO)}:{line} looks like a credential: {snippet.strip()}")


# --------------------------------------------------------------------------- cluster up / down

FAKE_RAY_START = textwrap.dedent("""
    # Stand-in for `ray start --block`: a daemon child, a ready line, then block.
    # FAKE_STUBBORN: the head's child ignores SIGTERM (`down` must escalate); FAKE_FAIL: the start fails.
    import os, signal, subprocess, sys, time
    args = sys.argv[1:]
    if os.environ.get("FAKE_FAIL") and ("--head" not in args or os.environ["FAKE_FAIL"] == "head"):
        print("boom: could not bind port", flush=True)
        sys.exit(3)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stubborn_here = "--head" in args and os.environ.get("FAKE_STUBBORN")
    child = subprocess.Popen([sys.executable, "-c", stubborn if stubborn_here else "import time; time.sleep(600)"])
    time.sleep(0.3)
    print("Ray runtime started.", flush=True)
    print("Process exit logs will be saved to: /tmp/x/session_fake/logs/ray_process_exit.log", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))   # leaves the child behind on purpose
    time.sleep(600)
""")


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    from pipeline import cluster

    script = tmp_path / "fake_ray_start.py"
    script.write_text(FAKE_RAY_START)
    monkeypatch.setenv(cluster.STATE_ENV, str(tmp_path / "state" / "ray-cluster.json"))
    monkeypatch.setenv(cluster.TEMP_DIR_ENV, str(tmp_path / "ray"))
    monkeypatch.setattr(cluster, "_ray_start_command", lambda: [sys.executable, "-u", str(script)])
    return cluster


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cluster_up_records_and_down_stops_exactly_those_pids(fake_ray, capsys, monkeypatch):
    cluster = fake_ray
    monkeypatch.setenv("FAKE_STUBBORN", "1")
    state = cluster.cluster_up(nodes=3, cpus_per_node=1, object_store_mb=100, timeout_s=30)
    out = capsys.readouterr().out
    assert f"export RAY_ADDRESS={state['address']}" in out
    assert state["address"].startswith("127.0.0.1:")
    saved = json.loads(cluster.state_path().read_text())
    assert [n["role"] for n in saved["nodes"]] == ["head node", "worker node 1", "worker node 2"]
    head_cmd = saved["nodes"][0]["command"]
    assert head_cmd[:3] == ["ray", "start", "--head"]
    assert "--include-dashboard=false" in head_cmd and "--block" in head_cmd
    assert head_cmd[head_cmd.index("--node-ip-address") + 1] == "127.0.0.1"
    assert head_cmd[head_cmd.index("--object-store-memory") + 1] == str(100 * 1024 * 1024)
    worker_cmd = saved["nodes"][1]["command"]
    assert worker_cmd[worker_cmd.index("--address") + 1] == state["address"]
    pids = cluster.recorded_pids(saved)
    assert len(pids) == 6 and all(alive(p) for p in pids)          # 3 roots + 3 daemons

    with pytest.raises(PipelineError, match="already up"):
        cluster.cluster_up(nodes=2, object_store_mb=100)

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stopped = cluster.cluster_down(timeout_s=1)
        assert set(pids) <= set(stopped)
        assert not any(alive(p) for p in pids)
        assert alive(bystander.pid), "down touches nothing it did not start"
        assert not cluster.state_path().exists()
    finally:
        bystander.kill()
        bystander.wait()
    with pytest.raises(PipelineError, match="no local Ray cluster is up"):
        cluster.cluster_down()


def test_failed_start_is_reported_and_cleaned_up(fake_ray, monkeypatch):
    cluster = fake_ray
    monkeypatch.setenv("FAKE_FAIL", "worker")
    with pytest.raises(PipelineError, match=r"worker node 1 exited with code 3[\s\S]*boom"):
        cluster.cluster_up(nodes=2, object_store_mb=100, timeout_s=30)
    assert not cluster.state_path().exists(), "the head that did start was stopped again"
    monkeypatch.setenv("FAKE_FAIL", "head")
    with pytest.raises(PipelineError, match="head node exited"):
        cluster.cluster_up(nodes=1, object_store_mb=100, timeout_s=30)


def test_stale_or_reused_pids_are_never_signalled(fake_ray):
    cluster = fake_ray
    import psutil

    me = psutil.Process()
    path = cluster.state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Our own PID, but with another start time: a PID reused by an unrelated process.
    node = {"role": "head node", "root": {"pid": me.pid, "create_time": me.create_time() - 1000}, "processes": []}
    path.write_text(json.dumps({"address": "127.0.0.1:1", "nodes": [node]}))
    assert cluster.cluster_down(quiet=True) == []
    assert not path.exists()

    # A recorded cluster whose processes are alive blocks `up` (here: this very process).
    node["root"]["create_time"] = me.create_time()
    path.write_text(json.dumps({"address": "127.0.0.1:1", "nodes": [node]}))
    with pytest.raises(PipelineError, match="already up at 127.0.0.1:1"):
        cluster.cluster_up(nodes=1, object_store_mb=100)
    path.unlink()


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes"),
    ({"cpus_per_node": 0.5}, "--cpus-per-node"),
    ({"object_store_mb": 10}, "--object-store-mb"),
])
def test_cluster_up_validates_before_starting_anything(fake_ray, kwargs, message):
    args = {"nodes": 2, "cpus_per_node": 1, "object_store_mb": 100, **kwargs}
    with pytest.raises(PipelineError, match=message):
        fake_ray.cluster_up(**args)
    assert not fake_ray.state_path().exists()


def test_cli_cluster_errors_are_messages_not_tracebacks(tmp_path):
    env = {**os.environ, "PIPELINE_CLUSTER_STATE": str(tmp_path / "none.json")}
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "cluster", "down"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=REPO)
    assert res.returncode == 2
    assert "no local Ray cluster is up" in res.stderr and "Traceback" not in res.stderr
    assert time.monotonic() - start < 30
