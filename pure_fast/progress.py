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
def progress_bar(total: int, desc: str, enabled: bool = True):
    if not (enabled and enabled_default()):
        yield _NullBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
