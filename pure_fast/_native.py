"""Access to the compiled extension ``pure_fast._C``.

Importing pure_fast never imports ``_C``; the first native call does. A missing or broken build raises
:class:`NativeUnavailable` with the command that rebuilds it. Every wrapper here checks dtype, device and
contiguity before handing raw pointers to C++ (the C++ side only sees addresses and sizes).
"""
from __future__ import annotations

import functools

import torch

from .errors import PureFastError

REBUILD = "pip install --no-build-isolation -e . (or: make native)"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class NativeUnavailable(PureFastError):
    """The compiled extension is missing or does not load."""


@functools.lru_cache(maxsize=None)
def load():
    try:
        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, OSError from a broken .so, ...
        raise NativeUnavailable(
            f"the native extension pure_fast._C is not available ({type(exc).__name__}: {exc}); "
            f"rebuild it with: {REBUILD}"
        ) from None
    return _C


def available() -> bool:
    try:
        load()
        return True
    except NativeUnavailable:
        return False


def has_cuda() -> bool:
    """True when _C was compiled with its CUDA kernels."""
    return load().has_cuda()


def stream_handle(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def check_buffer(t: torch.Tensor, name: str, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {sorted(str(d) for d in dtypes)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; native kernels run on cpu or cuda")


def finite_stats(t: torch.Tensor) -> tuple[int, float]:
    """(number of NaN/Inf entries, largest finite |x|) of ``t``, in one native pass."""
    t = t.contiguous()
    check_buffer(t, "tensor", DTYPE_CODES)
    C = load()
    if t.device.type == "cuda" and not C.has_cuda():
        raise NativeUnavailable(f"pure_fast._C was built without CUDA; rebuild with PURE_FAST_CUDA=ON: {REBUILD}")
    return C.finite_stats(t.data_ptr(), t.numel(), DTYPE_CODES[t.dtype], t.device.type == "cuda", stream_handle(t))
