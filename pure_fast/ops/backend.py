"""Backend registry: each op dispatches ``cuda -> triton -> torch`` (the first that applies).

Force one backend for every op with ``PURE_FAST_BACKEND=torch|triton|native`` or, in code,
``with pure_fast.ops.backend.force("torch"): ...``. ``auto`` (default) picks the fastest available for the
tensor's device. Plain-torch references are always available and are the ground truth in tests.
"""
from __future__ import annotations

import contextlib
import os
import threading

from ..errors import UsageError

VALID = ("auto", "torch", "triton", "native")
_local = threading.local()


def requested() -> str:
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced
    value = os.environ.get("PURE_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in VALID:
        raise UsageError(f"PURE_FAST_BACKEND={value!r} is not valid; use one of {', '.join(VALID)}")
    return value


@contextlib.contextmanager
def force(name: str):
    """Force a backend inside a ``with`` block (thread-local)."""
    if name not in VALID:
        raise ValueError(f"backend {name!r} is not one of {VALID}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def triton_usable(device_type: str) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return device_type in ("cuda", "cpu")


def native_usable(device_type: str) -> bool:
    from .. import _native

    if not _native.available():
        return False
    if device_type == "cuda":
        return _native.has_cuda()
    return device_type == "cpu"


def choose(device_type: str, *, native: bool = False, triton: bool = False) -> str:
    """Pick the backend for one call of an op that implements the given backends (torch always)."""
    want = requested()
    if want == "torch":
        return "torch"
    if want == "native":
        if not native:
            return "torch"
        from .. import _native

        _native.load()  # raises the rebuild message when missing
        return "native"
    if want == "triton":
        return "triton" if triton and triton_usable(device_type) else "torch"
    if native and native_usable(device_type):
        return "native"
    if triton and device_type == "cuda" and triton_usable(device_type):
        return "triton"
    return "torch"
