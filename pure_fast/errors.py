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


def one_line(exc: BaseException) -> tuple[int, str]:
    """(exit code, the one line the CLI prints after 'pure-fast: error: ') for any exception."""
    if isinstance(exc, PureFastError):
        return exc.exit_code, str(exc)
    if isinstance(exc, MemoryError):
        return 1, "out of memory; lower --batch-size (or --size)"
    text = str(exc)
    try:
        import torch

        oom = isinstance(exc, torch.cuda.OutOfMemoryError)
    except Exception:  # noqa: BLE001 - torch unavailable: only the message can tell
        oom = False
    if oom or "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        return 1, "the device ran out of memory; lower --batch-size (or --size)"
    msg = text.splitlines()[0] if text else ""
    return 1, f"unexpected {type(exc).__name__}: {msg} (rerun with --debug for details)"
