"""Progress bars (tqdm) that can be switched off (tests, --json, PURE_FAST_PROGRESS=0)."""
from __future__ import annotations

import contextlib
import os
import sys


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass


def enabled_default() -> bool:
    return os.environ.get("PURE_FAST_PROGRESS", "1") != "0"


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    if not (enabled and enabled_default()):
        yield _NullBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, unit=unit)
    try:
        yield bar
    finally:
        bar.close()


def verbose() -> bool:
    """``--verbose`` (PURE_FAST_VERBOSE=1): third-party libraries keep their own warnings and bars."""
    return os.environ.get("PURE_FAST_VERBOSE", "0") == "1"


def quiet_third_party() -> None:
    """Silence third-party noise unless verbose: diffusers' / transformers' warnings (e.g. "should be kept in
    float32: []", the torchvision fallback notices) and their loading bars ("Loading weights", "Writing model
    shards"), which ignore ``--quiet``. Environment switches cover the libraries not imported yet; the ones
    already imported are switched directly. Errors still surface as exceptions."""
    if verbose():
        return
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    for name in ("diffusers", "transformers"):
        lib = sys.modules.get(name)
        if lib is not None:
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
