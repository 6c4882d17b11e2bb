"""Why a Ray Train run failed, told to the user: a worker's PipelineError verbatim (a clear
message already), anything else briefly, with the worker's full traceback and how to continue
the run.

The traceback travels on the exception itself (`with_traceback_text`, read by
`worker_tracebacks`): the exception object reaches the driver whole through
TrainingFailedError.worker_failures (pickled with its attributes), while Ray Train truncates the
traceback string to 1000 characters, and a worker's stderr reaches the driver through Ray's log
stream, which a local Ray stopped right after the failure may not have delivered yet."""

from __future__ import annotations

from pipeline.errors import PipelineError


_TRACEBACK_ATTR = "pipeline_traceback"


def with_traceback_text(exc: BaseException, text: str) -> BaseException:
    """`exc` carrying its formatted traceback `text` to the driver (worker side)."""
    setattr(exc, _TRACEBACK_ATTR, text)
    return exc


def worker_tracebacks(err: Exception) -> dict[int, str]:
    """rank -> full traceback text of every failed worker that sent one (driver side)."""
    failures = getattr(err, "worker_failures", None) or {}
    texts = {rank: getattr(exc, _TRACEBACK_ATTR, None) for rank, exc in failures.items()}
    return {rank: text for rank, text in sorted(texts.items()) if text}


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
    where = "The worker's full traceback is above." if worker_tracebacks(err) else "See the worker's log above."
    return (f"training failed ({why}). {where} Checkpoints are in {run_dir}; "
            f"continue with `pipeline train --resume --run-name {run_name}` once the cause is fixed.")
