"""User-facing errors.

Every problem a user can fix (bad input file, bad params key, unreachable server...) is raised
as a `PipelineError` whose message names the file, key or value and says what to do. The CLI
prints the message and exits non-zero without a traceback; anything else is a bug.
"""


class PipelineError(Exception):
    """An error the user can act on. `str(err)` is the whole message shown to them."""

    exit_code = 2


class ParamsError(PipelineError):
    """A params.yaml key or value is wrong."""


class DataError(PipelineError):
    """An input image, mask or folder layout is wrong."""


class TrainingError(PipelineError):
    """Training cannot go on (non-finite loss, bad checkpoint, ...)."""
