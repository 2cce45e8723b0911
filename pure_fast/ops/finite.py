"""Finite check of a tensor: native (C++/OpenMP or CUDA) single pass, torch reference."""
from __future__ import annotations

import torch

from . import backend


def finite_stats_reference(t: torch.Tensor) -> tuple[int, float]:
    x = t.detach().reshape(-1)
    finite = torch.isfinite(x)
    bad = int((~finite).sum())
    vals = x[finite]
    mx = float(vals.abs().max()) if vals.numel() else 0.0
    return bad, mx


def finite_stats(t: torch.Tensor) -> tuple[int, float]:
    """(count of NaN/Inf, max finite |x|)."""
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        if backend.choose(t.device.type, native=True) == "native":
            from .. import _native

            return _native.finite_stats(t.detach())
    return finite_stats_reference(t)


def all_finite(t: torch.Tensor) -> bool:
    return finite_stats(t)[0] == 0
