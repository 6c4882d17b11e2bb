"""A local multi-node Ray cluster on this machine: `pipeline cluster up` / `pipeline cluster down`,
and `connect`, the one place the pipeline starts or joins Ray (stages join a running `cluster up`
cluster on their own, so one `dvc repro` pays Ray's start-up once, not once per stage).

`cluster_up` starts one head and `nodes - 1` worker nodes with `ray start ... --block`, each in
its own session (so Ctrl-C in the terminal does not reach them) with its output in a log file.
`--block` keeps every `ray start` process alive as the parent of the node's daemons (gcs_server,
raylet, agents, and through the raylet the Ray worker processes), so the cluster's processes are
exactly the process trees rooted at the PIDs we started. Their PIDs and start times go into a
state file; `cluster_down` stops those trees (by PID, checking the start time so a reused PID
is never touched: SIGTERM, then SIGKILL after a grace period), waits for every one to exit and
removes the state file. It never calls
`ray stop` and never looks processes up by name, so other Ray clusters on the machine
(another user's, a test's `ray.init()`) are left alone.

Security defaults: the dashboard is off unless `dashboard_port` is given, and then it binds
127.0.0.1; the printed address is 127.0.0.1:<port>. Ray itself (2.60) has no setting to bind
its GCS/raylet gRPC ports to loopback on Linux: it resolves `--node-ip-address 127.0.0.1` to the
machine's reachable address and listens on all interfaces. On a shared network, firewall those
ports or run the nodes in a private network (see infra/README.md, "Security").

The state file is `$PIPELINE_CLUSTER_STATE`, else `${XDG_CACHE_HOME:-~/.cache}/defect-synth-pipeline/ray-cluster.json`;
Ray's temporary root is `$PIPELINE_RAY_TEMP_DIR`, else `/tmp/ray-pipeline-<uid>` (kept short:
Unix socket paths under it must stay below 108 bytes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline import environment
from pipeline.errors import PipelineError

STATE_ENV = "PIPELINE_CLUSTER_STATE"
TEMP_DIR_ENV = "PIPELINE_RAY_TEMP_DIR"
LOOPBACK = "127.0.0.1"
READY_MARKER = "Ray runtime started"
MIN_OBJECT_STORE_MB = 80          # Ray refuses less than 75 MiB
START_TIMEOUT_S = 120.0           # per node; 2 shared cores can be slow
STOP_TIMEOUT_S = 30.0            # processes of a failed start
STOP_GRACE_S = 10.0              # `down`: SIGTERM, then SIGKILL what is left after this



# --------------------------------------------------------------------------- paths and state

def state_path() -> Path:
    """Where `cluster up` records what it started."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "defect-synth-pipeline" / "ray-cluster.json"


def temp_root() -> Path:
    env = os.environ.get(TEMP_DIR_ENV)
    return Path(env).expanduser().absolute() if env else Path(f"/tmp/ray-pipeline-{os.getuid()}")


def read_state() -> Optional[dict[str, Any]]:
    """The recorded cluster, or None when `cluster up` has not run (or `down` removed it)."""
    path = state_path()
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"cluster state file {path} is unreadable ({err}). Check that no "
                            "Ray processes you started are still running, then delete the file.") from None


def _write_state(state: dict[str, Any]) -> None:
    path = state_path()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One `cluster up`/`down` at a time per state file."""
    path = state_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"cannot create {path.parent}: {err.strerror}. Set {STATE_ENV} to a "
                            "writable file path.") from None
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another `pipeline cluster` command is using {path}; "
                                "wait for it to finish.") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- processes

def _proc_record(proc) -> dict[str, Any]:
    return {"pid": proc.pid, "create_time": proc.create_time(), "name": _safe_name(proc)}


def _safe_name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - zombie / gone: the name is only informational
        return "?"


def _live_process(record: dict[str, Any]):
    """psutil.Process for a recorded PID if it is still the same process, else None."""
    import psutil

    try:
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["create_time"])) > 0.5:
            return None                                   # PID reused by something else
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
        return None


def _status(proc) -> str:
    try:
        return proc.status()
    except Exception:  # noqa: BLE001 - gone
        return "gone"


def _tree(record: dict[str, Any]) -> list:
    """The live process started as `record` and all its live descendants."""
    root = _live_process(record)
    if root is None:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except Exception:  # noqa: BLE001 - raced with its exit
        return [root]


def state_processes(state: dict[str, Any]) -> list:
    """Every live process the recorded cluster consists of (roots, recorded daemons, descendants)."""
    seen: dict[int, Any] = {}
    for node in state.get("nodes", []):
        for proc in _tree(node["root"]):
            seen[proc.pid] = proc
        for record in node.get("processes", []):
            proc = _live_process(record)
            if proc is not None:
                seen.setdefault(proc.pid, proc)
                with contextlib.suppress(Exception):
                    for child in proc.children(recursive=True):
                        seen.setdefault(child.pid, child)
    return list(seen.values())


def recorded_pids(state: dict[str, Any]) -> list[int]:
    """All PIDs written to the state file (roots first)."""
    pids = []
    for node in state.get("nodes", []):
        pids.append(int(node["root"]["pid"]))
        pids.extend(int(r["pid"]) for r in node.get("processes", []))
    return pids


def _terminate(procs: list, timeout: float) -> list:
    """SIGTERM, wait, SIGKILL what is left, wait. Returns processes still alive."""
    import psutil

    procs = [p for p in {p.pid: p for p in procs}.values() if p.is_running()]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=10)
    return [p for p in alive if p.is_running() and _status(p) != psutil.STATUS_ZOMBIE]


# --------------------------------------------------------------------------- starting nodes

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no output)"
    return "\n".join(text[-lines:]) or "(no output)"


def job_env() -> dict[str, str]:
    """The variables every process of this stage's Ray job must see: the package's library defaults
    (pipeline/environment.py), the console's quiet settings and verbosity, and any Ray Train setting
    the user exported (Ray Train would otherwise forward those from the driver to its controller and
    workers). Values as they are in this process's environment now."""
    return {key: value for key, value in os.environ.items() if _job_env_key(key)}


def _job_env_key(key: str) -> bool:
    from pipeline import console

    return key in environment.DEFAULTS or key in console.QUIET_ENV or key == console.VERBOSE_ENV \
        or key.startswith("RAY_TRAIN_")


def _node_env() -> dict[str, str]:
    """A node's environment: this one, the package's library defaults and the console's quiet settings
    filled in (set values win), so a stage that joins finds what it needs already there (`connect`)."""
    from pipeline import console

    return environment.with_defaults({**console.quiet_env(), **os.environ})


def _ray_start_command() -> list[str]:
    """`ray start` of this interpreter's Ray (tests replace it with a stand-in)."""
    return [sys.executable, "-u", "-m", "ray.scripts.scripts", "start"]


def _start_node(args: list[str], log: Path, what: str, timeout: float,
                env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run `ray start <args> --block` detached; return its record once the node is up."""
    import psutil

    cmd = [*_ray_start_command(), *args, "--block"]
    with open(log, "wb") as out:
        try:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=env if env is not None else _node_env(), start_new_session=True,
                                     close_fds=True)
        except OSError as err:
            raise PipelineError(f"could not run `ray start` for the {what}: {err}.") from None
    root = psutil.Process(popen.pid)
    record = {"role": what, "root": _proc_record(root), "log": str(log), "command": ["ray", "start", *args, "--block"]}
    deadline = time.monotonic() + timeout
    seen: dict[int, Any] = {}            # daemons spawned so far: stopped too if the start fails
    while True:
        with contextlib.suppress(psutil.Error):
            seen.update({p.pid: p for p in root.children(recursive=True)})
        code = popen.poll()
        if code is not None:
            _terminate(list(seen.values()), 10)
            raise PipelineError(f"`ray start` for the {what} exited with code {code} before the node "
                                f"came up. Its output ({log}):\n{_tail(log)}")
        try:
            if READY_MARKER in log.read_text(errors="replace"):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            _terminate([*_tree(record["root"]), *seen.values()], 10)
            raise PipelineError(f"the {what} did not come up within {timeout:.0f} s. "
                                f"Last output ({log}):\n{_tail(log)}")
        time.sleep(0.2)
    # The node's daemons are children of the blocking `ray start`: record them too.
    record["processes"] = [_proc_record(p) for p in root.children(recursive=True)]
    text = log.read_text(errors="replace")
    marker = "Process exit logs will be saved to:"
    for line in text.splitlines():
        if marker in line:
            record["session_dir"] = str(Path(line.split(marker, 1)[1].strip()).parent.parent)
    return record


def _validate(nodes: int, cpus_per_node: float, object_store_mb: int) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise PipelineError(f"--nodes must be a whole number of 1 or more (head + workers), got {nodes!r}.")
    if float(cpus_per_node) != int(cpus_per_node) or cpus_per_node < 1:
        raise PipelineError(f"--cpus-per-node must be a whole number of 1 or more (Ray counts whole "
                            f"CPUs per node), got {cpus_per_node!r}.")
    if object_store_mb < MIN_OBJECT_STORE_MB:
        raise PipelineError(f"--object-store-mb must be at least {MIN_OBJECT_STORE_MB} (Ray's minimum "
                            f"is 75 MiB), got {object_store_mb}.")
    return int(cpus_per_node)


def cluster_up(nodes: int = 2, cpus_per_node: float = 1, object_store_mb: int = 512, *,
               dashboard_port: Optional[int] = None, timeout_s: float = START_TIMEOUT_S,
               quiet: bool = False) -> dict[str, Any]:
    """Start a head and `nodes - 1` workers on this machine; print and return the address.

    Raises PipelineError when a cluster recorded in the state file is still running, or when a
    node fails to start (the nodes already started are stopped again).
    """
    cpus = _validate(nodes, cpus_per_node, object_store_mb)
    with _locked():
        existing = read_state()
        if existing is not None:
            if state_processes(existing):
                raise PipelineError(f"a local Ray cluster is already up at {existing['address']} "
                                    f"(state file {state_path()}). Use it (export RAY_ADDRESS="
                                    f"{existing['address']}) or stop it first: pipeline cluster down")
            state_path().unlink(missing_ok=True)       # stale: its processes are all gone

        temp_dir = temp_root()
        temp_dir.mkdir(parents=True, exist_ok=True)
        node_env = _node_env()
        port = _free_port()
        address = f"{LOOPBACK}:{port}"
        common = ["--num-cpus", str(cpus), "--object-store-memory", str(object_store_mb * 1024 * 1024),
                  "--node-ip-address", LOOPBACK, "--temp-dir", str(temp_dir), "--disable-usage-stats"]
        head_args = ["--head", "--port", str(port), *common]
        if dashboard_port is None:
            head_args += ["--include-dashboard=false"]
        else:
            head_args += ["--include-dashboard=true", "--dashboard-host", LOOPBACK,
                          "--dashboard-port", str(dashboard_port)]
        state: dict[str, Any] = {
            "address": address, "port": port, "temp_dir": str(temp_dir), "started_at": time.time(),
            "cpus_per_node": cpus, "object_store_mb": object_store_mb,
            "dashboard": f"http://{LOOPBACK}:{dashboard_port}" if dashboard_port else None,
            # What the nodes' processes see of job_env()'s variables: a stage whose job_env() matches
            # joins without a runtime_env (`connect`).
            "env": {key: value for key, value in node_env.items() if _job_env_key(key)},
            "nodes": [],
        }
        logs = temp_dir / "logs"
        logs.mkdir(exist_ok=True)
        try:
            state["nodes"].append(_start_node(head_args, logs / f"head-{port}.log", "head node", timeout_s, node_env))
            _write_state(state)                          # from here on `down` can clean up
            for i in range(1, nodes):
                state["nodes"].append(_start_node(["--address", address, *common],
                                                  logs / f"worker{i}-{port}.log", f"worker node {i}", timeout_s,
                                                  node_env))
                _write_state(state)
        except BaseException:
            left = _terminate(state_processes(state), STOP_GRACE_S)
            if not left:
                state_path().unlink(missing_ok=True)
            raise
    if not quiet:
        print(f"Ray cluster up: {nodes} node(s) (1 head + {nodes - 1} worker), {cpus} CPU and "
              f"{object_store_mb} MiB object store each.")
        print(f"address: {address}")
        if state["dashboard"]:
            print(f"dashboard: {state['dashboard']} (loopback only)")
        print(f"state: {state_path()}  logs: {logs}")
        print(f"export RAY_ADDRESS={address}")
        print("stop it with: pipeline cluster down")
    return state


def cluster_down(*, timeout_s: float = STOP_GRACE_S, quiet: bool = False) -> list[int]:
    """Stop the processes `cluster_up` started (workers first, then the head); return their PIDs.

    Each node's `ray start --block` gets SIGTERM and stops its daemons gracefully; whatever of
    the cluster is still running `timeout_s` seconds later gets SIGKILL, as `ray stop` does after
    its grace period. (After a job with a runtime_env, Ray 2.60's raylet can spend 30 s retrying
    its already-stopped runtime-env agent before it exits.) Raises PipelineError when no cluster
    is recorded or a process survives SIGKILL.
    """
    import psutil

    with _locked():
        state = read_state()
        if state is None:
            raise PipelineError(f"no local Ray cluster is up (no state file at {state_path()}). "
                                "Start one with: pipeline cluster up --nodes 2")
        # Everything that belongs to the cluster now (daemons, agents, Ray worker processes),
        # taken before any signal: a process orphaned by its parent's exit is still known.
        procs = state_processes(state)
        stopped = [p.pid for p in procs]
        nodes = state.get("nodes", [])
        # Workers first, so they do not log errors about a vanished head.
        for group in (nodes[1:], nodes[:1]):
            roots = [tree[0] for tree in (_tree(node["root"]) for node in group) if tree]
            for root in roots:
                with contextlib.suppress(psutil.Error):
                    root.send_signal(signal.SIGTERM)
            psutil.wait_procs(roots, timeout=timeout_s)
        left = {p.pid: p for p in [*procs, *state_processes(state)]
                if p.is_running() and _status(p) != psutil.STATUS_ZOMBIE}
        stopped.extend(left)
        for proc in left.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _, alive = psutil.wait_procs(list(left.values()), timeout=10)
        alive = [p for p in alive if p.is_running() and _status(p) != psutil.STATUS_ZOMBIE]
        if alive:
            raise PipelineError("these processes of the local Ray cluster did not exit: "
                                f"{', '.join(str(p.pid) for p in alive)}. Stop them by PID, then run "
                                "`pipeline cluster down` again.")
        state_path().unlink(missing_ok=True)
    stopped = sorted(set(stopped))
    if not quiet:
        if stopped:
            print(f"Ray cluster at {state['address']} stopped ({len(stopped)} processes).")
        else:
            print(f"Ray cluster at {state['address']} had already exited; state file removed.")
    return stopped


# --------------------------------------------------------------------------- joining from a stage

def running_cluster() -> Optional[dict[str, Any]]:
    """The cluster `cluster up` recorded, when its processes still run; else None."""
    try:
        state = read_state()
    except PipelineError:
        return None
    return state if state is not None and state_processes(state) else None


def ray_logging(verbose: bool) -> dict[str, Any]:
    """ray.init arguments for Ray's own logging: errors only unless verbose.

    `logging_level` is the driver's `ray` logger ("Started a local Ray instance"); `logging_config`
    the root and `ray` loggers of every worker of the job (e.g. the Train placement-group cleaner's
    "Failed to query Ray Train Controller actor state" warnings without a dashboard). Worker
    output still reaches the driver (log_to_driver): errors and tracebacks pass these levels.
    """
    import logging

    import ray

    if verbose:
        return {"log_to_driver": True}
    return {"log_to_driver": True, "logging_level": logging.ERROR,
            "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="ERROR")}


@contextlib.contextmanager
def _lean_local_head(skip_api_server: bool) -> Iterator[None]:
    """While active, a local Ray started by ray.init() runs no autoscaler monitor process and, if
    `skip_api_server`, no API server process. Each is a Python process a stage's own Ray starts
    and stops for nothing (bench/bench_ray_overhead.py, 2 cores):

    - the API server ("dashboard" process): Ray 2.60 starts it on a head even with
      include_dashboard=False, then with only its usage-stats module (off here,
      RAY_USAGE_STATS_ENABLED=0), and ray.init waits until it has imported its web stack and
      published its address (~0.8 s). It serves the dashboard, job submission and the State API
      (`ray.util.state`), which the pipeline does not use (ray_train.PipelineTorchTrainer drops the
      one Ray Train part that asks it).
    - the autoscaler monitor: on a single local node nothing is there to add or remove, and at
      ray.shutdown() it outlives its SIGTERM by the whole 1 s grace period (its handler reports its
      own termination to the GCS, which shutdown has already stopped) before it is killed.

    `pipeline cluster up` starts its nodes with `ray start` and keeps both (and its dashboard,
    --dashboard-port). If Ray renames a method, that one is not replaced (only its cost comes back)."""
    from ray._private import node

    skipped = ("start_monitor", "start_api_server") if skip_api_server else ("start_monitor",)

    def not_started(self, **kwargs):
        return None

    with replaced_attributes(node.Node, {name: not_started for name in skipped}):
        yield


@contextlib.contextmanager
def replaced_attributes(owner: Any, replacements: dict[str, Any]) -> Iterator[None]:
    """While active, `owner`'s own attribute `name` (a class's or a module's) is replacements[name];
    restored on exit. For the Ray internals the start-up cuts replace: a name `owner` does not
    define (Ray renamed it) is skipped, so only that cut's cost comes back."""
    originals = {name: vars(owner)[name] for name in replacements if name in vars(owner)}
    for name in originals:
        setattr(owner, name, replacements[name])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


_inherits_env = False   # set by connect: see workers_inherit_env


def workers_inherit_env() -> bool:
    """True when this process's `connect` started or joined the Ray it uses without a job
    runtime_env: every Ray worker process of the job already has job_env() from its node.

    Why it matters: Ray starts a fresh worker process (Python + `import ray`: seconds on a small
    machine) for every task or actor that carries a runtime_env, while one without can take an
    idle worker the node prestarted (as many as it has CPUs). So a job without a runtime_env,
    whose Train controller and workers carry none either (ray_cluster.InheritEnvController),
    skips those process starts (bench/bench_ray_overhead.py)."""
    import ray

    return _inherits_env and ray.is_initialized()


def connect(address: Optional[str] = None, *, num_cpus: Optional[int] = None, use_gpu: bool = False,
            object_store_mb: int = 256, include_dashboard: bool = False) -> tuple[bool, str]:
    """Join a Ray cluster, or start a local Ray: the one way the pipeline starts Ray.

    Order: `address`; RAY_ADDRESS; the local cluster `pipeline cluster up` started (joining it
    costs well under a second, against seconds for starting Ray, so stages of one `dvc repro`
    share it); else a local Ray with `num_cpus` (default all cores). Returns (this call started
    Ray, so the caller shuts it down; a description of where it runs).

    The job's processes need job_env(). A local Ray started here inherits it (its daemons and
    workers are children of this process), and so do the nodes of a `cluster up` cluster whose
    recorded environment matches; only on other clusters is it sent as the job's runtime_env,
    which makes Ray start a fresh process for every task and actor (workers_inherit_env).
    """
    global _inherits_env
    import ray

    from pipeline import console

    environment.apply_defaults()
    for key, value in console.quiet_env().items():
        os.environ.setdefault(key, value)
    _inherits_env = False
    if ray.is_initialized():
        return False, "the Ray instance this process already uses"
    env = job_env()
    target, where, inherits = address or os.environ.get("RAY_ADDRESS") or None, "", False
    state = running_cluster()
    if target:
        where = f"Ray cluster {target}"
    elif state is not None:
        target, where = state["address"], f"local Ray cluster {state['address']} (pipeline cluster up)"
    if target and state is not None and target == state["address"]:
        inherits = env.items() <= state.get("env", {}).items()
    kwargs = {**({} if inherits or not target else {"runtime_env": {"env_vars": env}}),
              **ray_logging(console.verbose())}
    try:
        if target:
            ray.init(address=target, **kwargs)
            _inherits_env = inherits
            return True, f"joined {where}"
        cpus = num_cpus or os.cpu_count() or 1
        # address="local": always a new instance for this stage. Without it ray.init() joins any
        # Ray a test or another user left running on this machine (/tmp/ray), and then refuses
        # num_cpus ("When connecting to an existing cluster, num_cpus ... must not be provided").
        with _lean_local_head(skip_api_server=not include_dashboard):
            ray.init(address="local", num_cpus=cpus, num_gpus=None if use_gpu else 0,
                     include_dashboard=include_dashboard, dashboard_host=LOOPBACK,
                     object_store_memory=object_store_mb * 1024 * 1024, **kwargs)
        _inherits_env = True
        return True, f"local Ray ({cpus} CPUs, started for this stage)"
    except Exception as err:  # noqa: BLE001 - ray.init raises bare Exception for a node start timeout
        what = where or "a local Ray instance"
        raise PipelineError(f"cannot start or join {what}: {str(err)[:300]}. Check the address (`ray status`), "
                            "drop --address / RAY_ADDRESS, or stop a dead local cluster with "
                            "`pipeline cluster down`.") from None
