"""Why a Ray Train run failed, told to the user: a worker's PipelineError verbatim (a clear
message already), anything else briefly, with where the worker's full traceback is and how to
continue the run."""

from __future__ import annotations

from pipeline.errors import PipelineError


def failure_message(err: Exception, run_name: str, run_dir: str) -> str:
    """The user-facing reason of a failed fit(): a worker's PipelineError verbatim when there is one."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, exc in sorted(failures.items()):
        seen = exc
        while seen is not None:
            if isinstance(seen, PipelineError):
                return f"training failed on worker {rank}: {seen}"
            seen = getattr(seen, "cause", None) or seen.__cause__
    first = next(iter(sorted(failures.items())), None)
    why = f"worker {first[0]}: {type(first[1]).__name__}: {str(first[1])[-400:]}" if first else str(err)[-400:]
    return (f"training failed ({why}). The worker's full traceback is above. Checkpoints are in {run_dir}; "
            f"continue with `pipeline train --resume --run-name {run_name}` once the cause is fixed.")
