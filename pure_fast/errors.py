"""Exceptions a user can cause. The CLI prints them as one line and exits non-zero (no traceback)."""


class PureFastError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""

    exit_code = 1


class UsageError(PureFastError):
    """Bad command-line usage or option values (exit code 2)."""

    exit_code = 2


class ModelLoadError(PureFastError):
    """A model path, config or checkpoint that cannot be used."""


class EditFileError(PureFastError):
    """An edit file that is missing, malformed, or made for other weights."""


class FingerprintMismatch(EditFileError):
    """An edit applied to weights other than those it was made for."""


class NumericalError(PureFastError):
    """Non-finite values where finite ones are required."""
