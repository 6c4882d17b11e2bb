"""`pipeline ui`: an MLflow server against the pipeline's store, supervised until Ctrl+C or
SIGTERM stops it and the uvicorn children it starts.

Quiet by default: one line with the URL; uvicorn's access log is off and the server's own output
(warnings, startup lines) goes to a log file, printed only when the server fails. `verbose` (from
`pipeline ui --verbose` or `pipeline -v ui`) passes all of it through."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from pipeline.tracking.store import TrackingError, artifact_root, check_tracking, is_http, tracking_uri


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ui_command(host: str, port: int, uri: str | None = None, verbose: bool = False) -> list[str]:
    """`mlflow server` against the pipeline's store: one worker, no job runner (light, ~7 s start);
    without `verbose`, uvicorn logs no access lines and only warnings."""
    uri = uri or tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if not verbose:
        cmd += ["--uvicorn-opts", "--no-access-log --log-level warning"]
    root = artifact_root(uri)
    if root is not None:  # runs created through the server keep artifacts beside the others
        cmd += ["--artifacts-destination", str(root)]
    return cmd


def serve_ui(host: str = "127.0.0.1", port: int = 5000, verbose: bool = False) -> None:
    """Start the MLflow UI/server on host:port against the same store and block until stopped."""
    uri = tracking_uri()
    if is_http(uri):
        raise TrackingError(f"MLFLOW_TRACKING_URI points at a server already ({uri}): open it in a browser, "
                            "or unset MLFLOW_TRACKING_URI to serve the embedded store.")
    check_tracking(uri)
    if not _port_free(host, port):
        raise TrackingError(f"port {port} on {host} is in use. Pass --port <free port>, or stop what uses it.")
    root = artifact_root(uri)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = None
    if not verbose:
        env.setdefault("PYTHONWARNINGS", "ignore")
        log = tempfile.NamedTemporaryFile("w+", prefix="mlflow-ui-", suffix=".log", delete=False)
    print(f"MLflow UI at http://{host}:{port}  (store {uri}"
          + (f"; server log {log.name}" if log else "") + "; Ctrl+C stops it)", flush=True)
    # Own process group: `mlflow server` runs uvicorn as a child; stopping us stops both.
    proc = subprocess.Popen(ui_command(host, port, uri, verbose=verbose), env=env, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT if log else None)

    def _stop(signum=None, frame=None):
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        _stop_group(proc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if log is not None:
            log.close()
    if code != 0:
        if log is None:
            raise TrackingError(f"the MLflow server exited with code {code}; see its output above.")
        tail = "".join(Path(log.name).read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise TrackingError(f"the MLflow server exited with code {code}; the end of its log "
                            f"{log.name}:\n{tail}")


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; give its children the same signal once more
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        return
