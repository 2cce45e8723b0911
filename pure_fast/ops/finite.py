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


def first_nonfinite(tensors) -> int | None:
    """Index of the first tensor that holds a NaN/Inf, or None, for a list of floating-point tensors.

    CUDA tensors are checked together: one max-|x| reduction per tensor on the device (``_foreach_norm``
    with ord=inf: NaN and Inf propagate), the flags stacked and copied to the host once: one synchronisation
    for the whole list instead of one per tensor. Host tensors use :func:`finite_stats` (no sync to save)."""
    tensors = list(tensors)
    flags: dict[int, bool] = {}
    by_group: dict = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cuda":
            by_group.setdefault((t.device, t.dtype), []).append(i)
        else:
            flags[i] = finite_stats(t)[0] == 0
    if by_group:
        norms, order = [], []
        for idx in by_group.values():
            norms += [n.float().reshape(1) for n in torch._foreach_norm([tensors[i].detach() for i in idx], float("inf"))]
            order += idx
        finite = torch.isfinite(torch.cat(norms)).tolist()  # the one copy to the host
        flags.update(zip(order, finite))
    for i in range(len(tensors)):
        if not flags[i]:
            return i
    return None
