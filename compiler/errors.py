"""opc's error types and the exit codes the CLI maps them to.

Every error a user can cause is an ``OpcError`` whose message is one line naming the
file, node or tensor at fault. The CLI prints that line and exits with ``exit_code``;
anything else escaping is a bug (a traceback is shown only with ``--debug``).
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # invalid model or compile failure
EXIT_USAGE = 2  # bad command line, bad pipeline string, bad option
EXIT_MISMATCH = 3  # verification outside tolerance
EXIT_INTERRUPTED = 130


class OpcError(Exception):
    """A user-facing error: one line, no traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class UsageError(OpcError):
    exit_code = EXIT_USAGE


class PipelineError(UsageError):
    """A pipeline string or pass option that cannot be used."""


class ModelError(OpcError):
    """The model file or graph is invalid."""


class DataError(OpcError):
    """Calibration / evaluation / input data that does not fit the model."""


class VerificationError(OpcError):
    exit_code = EXIT_MISMATCH
