"""Batched edit application: every K/V weight of a shape group changed in one batched product.

Signatures (all functions take float tensors of one dtype and device; results are new tensors, inputs are
never modified):

    lowrank_update(W, ups, downs)        -> [W_i + up_i @ down_i]      PURE / any per-layer low-rank change
        W: [L, m, n] tensor or a list of L [m, n] tensors; ups: [L, m, R] (zero-padded) or a list of
        [m, r_i]; downs: [L, R, n] or a list of [r_i, n] (ranks may differ: ragged, r_i = 0 allowed).
        Returns a list of L [m, n] tensors (or one [L, m, n] tensor when W was one tensor).
    shared_update(Ws, U, V)              -> [W_i + (W_i @ U) @ V^T]    one low-rank right factor for every layer
        Ws: list of [m_i, n] (any m_i, one n); U, V: [n, r].  (CURE: W (I - P_dis) with
        P_dis = -U V^T; any shared ``W (I + U V^T)``.)
    right_multiply(Ws, A)                -> [W_i @ A]                  one dense right matrix (UCE: W0 A)
        Ws: list of [m_i, n]; A: [n, n'].
    apply_lowrank(current, factors)      -> {name: W + up @ down}      dict form used by LowRankEdit.new_weights
        current: name -> [m, n]; factors: name -> (up [m, r], down [r, n]) (any device/dtype: moved to
        current's); names missing from ``factors`` are returned unchanged (the same tensor).
    apply_shared(current, U=..., V=...) or apply_shared(current, A=...) -> {name: new W}
        dict form of shared_update / right_multiply: weights grouped by input width n.

Each op has a plain per-layer reference beside it (``*_reference``: a Python loop of the textbook
expression) and a dispatch: the per-layer loop under ``auto`` on every device, the batched path when a
non-torch backend is forced (``PURE_FAST_BACKEND=native`` or ``triton``); ``PURE_FAST_BACKEND=torch`` is the
loop too. Measured, the batching does not pay: on an H100 (``bench/bench_apply.py``, SDXL's 140 K/V weights in
float64, 2026-11-22) the batched low-rank update is 0.95x the loop for one concept and 0.71x for 50 (ranks
60-250: padding), the shared update 0.98x and ``W A`` 0.985x: the op is memory bound (each weight read and
written once, ~6 ms for 341 M float64 elements) and 140 launches cost well under a millisecond. On a 2-core
CPU the shared update is 0.49-0.66x the loop (its row concatenation copies every weight) and the low-rank
one ~1x. The batched path is kept, tested against the loop and selectable.

Design choices:
- Ragged ranks are zero-padded to the group's largest rank. Mathematically exact (the extra terms are
  ``x * 0``), but BLAS picks its kernel and summation order by the matrix sizes, so a product with another
  inner size K (padding), or a batched product instead of a single one (``bmm`` vs ``mm``; tiny shapes take
  a different CPU kernel), may round differently. Stated tolerance against the per-layer reference,
  elementwise: ``|batched - reference| <= 2 (r + 1) eps |up| |down| + 2 eps |W + up down|`` (two dot-product
  error bounds plus the final add), i.e. a few float64 ulps; after ``Edit.apply``'s single rounding to the
  storage dtype an element differs by at most one storage ulp, and only where its float64 value lies within
  that margin of a rounding boundary (measured on the SDXL shapes by ``bench/bench_apply.py``: none or a
  handful of 340 M elements; on the CPU BLAS here the SDXL-sized products were bit-identical). Revert stays
  bit-exact either way (the old tensors are kept).
- The sum ``W + T`` is done with ``torch._foreach_add`` over the un-stacked weights (one multi-tensor
  kernel on CUDA) instead of stacking W: stacking would copy every weight once more (the op is memory
  bound: W is read once, the result written once, the product T written and read once), and
  ``baddbmm``/``addmm`` with beta=1 rounds differently from ``W + U @ D`` (BLAS accumulates into C).
- Shared right matrices: every layer's rows are concatenated into one ``[sum m_i, n]`` matrix, so all
  140 SDXL K/V weights (one input width, 2048) take two GEMMs (``W U`` then ``(W U) V^T``) or one
  (``W A``), not 280. GEMM kernels depend on the row count too, so the stated tolerance is likewise
  ``2 eps (n |W| |U| + r |W U|) |V|^T + 2 eps |result|`` (``W A``: ``2 n eps |W| |A| + ...``), see
  :func:`shared_tolerance`.
- Memory is bounded: layers are processed in chunks whose temporary tensors stay under
  ``max_chunk_bytes`` (default 512 MiB), so applying to SDXL in float64 never holds a second full copy.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from . import backend

__all__ = [
    "apply_lowrank",
    "apply_shared",
    "lowrank_update",
    "lowrank_update_batched",
    "lowrank_update_reference",
    "pad_factors",
    "right_multiply",
    "right_multiply_batched",
    "right_multiply_reference",
    "shared_update",
    "shared_update_batched",
    "shared_update_reference",
    "DEFAULT_CHUNK_BYTES",
    "lowrank_tolerance",
    "shared_tolerance",
    "LOW_PRECISION_STORAGE",
    "shared_rounded_fp32",
    "shared_fp32_error_bound",
]

DEFAULT_CHUNK_BYTES = 512 * 2**20

Tensors = Sequence[torch.Tensor]


# ------------------------------------------------------------------------------------------ helpers
def _as_list(W) -> list[torch.Tensor]:
    if isinstance(W, torch.Tensor):
        if W.dim() != 3:
            raise ValueError(f"expected a [L, m, n] stack, got shape {tuple(W.shape)}")
        return list(W.unbind(0))
    return list(W)


def pad_factors(ups: Tensors, downs: Tensors, *, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded stacks ``U [L, m, R]``, ``D [L, R, n]`` of ragged factors (R = the largest rank)."""
    if len(ups) != len(downs):
        raise ValueError(f"{len(ups)} up factors but {len(downs)} down factors")
    if not ups:
        raise ValueError("no factors given")
    m, n = ups[0].shape[0], downs[0].shape[1]
    for i, (u, d) in enumerate(zip(ups, downs)):
        if u.dim() != 2 or d.dim() != 2 or u.shape[0] != m or d.shape[1] != n or u.shape[1] != d.shape[0]:
            raise ValueError(
                f"factor pair {i} has shapes {tuple(u.shape)} and {tuple(d.shape)}; expected [{m}, r] and [r, {n}]"
            )
    dtype = dtype or ups[0].dtype
    device = device or ups[0].device
    R = max(int(u.shape[1]) for u in ups)
    L = len(ups)
    if all(int(u.shape[1]) == R for u in ups):
        U = torch.stack([u.to(device, dtype) for u in ups])
        D = torch.stack([d.to(device, dtype) for d in downs])
        return U, D
    U = torch.zeros(L, m, R, dtype=dtype, device=device)
    D = torch.zeros(L, R, n, dtype=dtype, device=device)
    for i, (u, d) in enumerate(zip(ups, downs)):
        r = int(u.shape[1])
        if r:
            U[i, :, :r] = u.to(device, dtype)
            D[i, :r] = d.to(device, dtype)
    return U, D


def _check_weights(Ws: list[torch.Tensor], what: str) -> None:
    if not Ws:
        raise ValueError(f"{what}: no weights given")
    for i, w in enumerate(Ws):
        if w.dim() != 2:
            raise ValueError(f"{what}: weight {i} has shape {tuple(w.shape)}; expected a matrix")
        if w.dtype != Ws[0].dtype or w.device != Ws[0].device:
            raise ValueError(f"{what}: weights mix dtypes/devices ({w.dtype} on {w.device} vs {Ws[0].dtype} on "
                             f"{Ws[0].device})")


def _chunks(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges whose summed byte sizes stay under ``limit`` (at least one item)."""
    out, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        if i > start and acc + s > limit:
            out.append((start, i))
            start, acc = i, 0
        acc += s
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


# ------------------------------------------------------------------------------- stated tolerances
def lowrank_tolerance(W: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |batched - reference| for ``W + up @ down`` (two summation orders + the add)."""
    eps = torch.finfo(W.dtype).eps
    r = int(up.shape[1])
    a = up.abs().to(W.dtype) @ down.abs().to(W.dtype) if r else torch.zeros_like(W)
    return 2 * (r + 1) * eps * a + 2 * eps * (W.abs() + a)


def shared_tolerance(W: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                     A: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise bound on |batched - reference| for ``W + (W U) V^T`` (or ``W A`` when ``A`` is given)."""
    eps = torch.finfo(W.dtype).eps
    n = W.shape[1]
    Wa = W.abs()
    if A is not None:
        a = Wa @ A.abs().to(W.dtype)
        return 2 * (n + 1) * eps * a
    U, V = U.abs().to(W.dtype), V.abs().to(W.dtype)
    WU = Wa @ U
    a = WU @ V.T
    return 2 * eps * (n * a + U.shape[1] * a) + 2 * eps * (Wa + a)


# ------------------------------------------------------------------------- per-layer low-rank update
def lowrank_update_reference(W, ups: Tensors | torch.Tensor, downs: Tensors | torch.Tensor):
    """Reference: ``W_i + up_i @ down_i`` in a Python loop (the unbatched, textbook expression)."""
    Ws = _as_list(W)
    ups, downs = _as_list(ups), _as_list(downs)
    out = [w + u.to(w.device, w.dtype) @ d.to(w.device, w.dtype) for w, u, d in zip(Ws, ups, downs)]
    return torch.stack(out) if isinstance(W, torch.Tensor) else out


def lowrank_update_batched(W, ups: Tensors | torch.Tensor, downs: Tensors | torch.Tensor, *,
                           max_chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Batched: zero-pad the ragged factors, one ``bmm`` per chunk, one multi-tensor add."""
    Ws = _as_list(W)
    _check_weights(Ws, "lowrank_update")
    m, n = Ws[0].shape
    if any(tuple(w.shape) != (m, n) for w in Ws):
        raise ValueError("lowrank_update: every weight of a group must have the same shape (group by shape first)")
    padded = isinstance(ups, torch.Tensor) and ups.dim() == 3
    if not padded:
        ups, downs = list(ups), list(downs)
    if len(ups) != len(Ws) or len(downs) != len(Ws):
        raise ValueError(f"lowrank_update: {len(Ws)} weights but {len(ups)} up / {len(downs)} down factors")
    dtype, device = Ws[0].dtype, Ws[0].device
    per_layer = m * n * Ws[0].element_size()
    out: list[torch.Tensor] = []
    for a, b in _chunks([per_layer] * len(Ws), max_chunk_bytes):
        if padded:
            U = ups[a:b].to(device, dtype)
            D = downs[a:b].to(device, dtype)
            if U.shape[1] != m or D.shape[2] != n or U.shape[2] != D.shape[1]:
                raise ValueError(f"lowrank_update: padded factors {tuple(ups.shape)} / {tuple(downs.shape)} do not "
                                 f"make [{m}, {n}] changes")
        else:
            U, D = pad_factors(ups[a:b], downs[a:b], dtype=dtype, device=device)
            if U.shape[1] != m or D.shape[2] != n:
                raise ValueError(f"lowrank_update: factors make [{U.shape[1]}, {D.shape[2]}] changes, weights are "
                                 f"[{m}, {n}]")
        if U.shape[2] == 0:  # nothing to add anywhere in this chunk
            out += [w.clone() for w in Ws[a:b]]
            continue
        T = torch.bmm(U, D)
        out += list(torch._foreach_add(Ws[a:b], list(T.unbind(0))))
        del T
    return torch.stack(out) if isinstance(W, torch.Tensor) else out


def _use_loop() -> bool:
    """The dispatch rule (module docstring): the per-layer loop unless a non-torch backend is forced."""
    return backend.requested() in ("auto", "torch")


def lowrank_update(W, ups, downs, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Dispatch: the per-layer reference (auto, torch); batched when native / triton is forced."""
    if _use_loop():
        return lowrank_update_reference(W, ups, downs)
    return lowrank_update_batched(W, ups, downs, max_chunk_bytes=max_chunk_bytes)


# ---------------------------------------------------------------- shared right matrices (text space)
def shared_update_reference(Ws: Tensors, U: torch.Tensor, V: torch.Tensor) -> list[torch.Tensor]:
    """Reference: ``W_i + (W_i @ U) @ V^T`` per layer."""
    out = []
    for w in _as_list(Ws):
        u, v = U.to(w.device, w.dtype), V.to(w.device, w.dtype)
        out.append(w + (w @ u) @ v.T)
    return out


def _row_chunks(Ws: list[torch.Tensor], width: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
    esize = Ws[0].element_size()
    return _chunks([w.shape[0] * (w.shape[1] + width) * esize for w in Ws], max_chunk_bytes)


def shared_update_batched(Ws: Tensors, U: torch.Tensor, V: torch.Tensor, *,
                          max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[torch.Tensor]:
    """Batched: all layers' rows concatenated, two GEMMs per chunk, one multi-tensor add."""
    Ws = _as_list(Ws)
    _check_weights(Ws, "shared_update")
    n = Ws[0].shape[1]
    if any(w.shape[1] != n for w in Ws):
        raise ValueError("shared_update: every weight must have the same input width (group by it first)")
    if U.dim() != 2 or V.dim() != 2 or U.shape != V.shape or U.shape[0] != n:
        raise ValueError(f"shared_update: U {tuple(U.shape)} and V {tuple(V.shape)} must both be [{n}, r]")
    dtype, device = Ws[0].dtype, Ws[0].device
    u, vt = U.to(device, dtype), V.to(device, dtype).T
    out: list[torch.Tensor] = []
    for a, b in _row_chunks(Ws, n, max_chunk_bytes):
        group = Ws[a:b]
        Wc = torch.cat(group) if len(group) > 1 else group[0]
        T = (Wc @ u) @ vt
        out += list(torch._foreach_add(group, list(T.split([w.shape[0] for w in group]))))
        del T, Wc
    return out


def shared_update(Ws: Tensors, U: torch.Tensor, V: torch.Tensor, *,
                  max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[torch.Tensor]:
    """Dispatch of ``W_i + (W_i U) V^T``: the reference (auto, torch); batched when native / triton is forced."""
    if _use_loop():
        return shared_update_reference(Ws, U, V)
    return shared_update_batched(Ws, U, V, max_chunk_bytes=max_chunk_bytes)


def right_multiply_reference(Ws: Tensors, A: torch.Tensor) -> list[torch.Tensor]:
    """Reference: ``W_i @ A`` per layer."""
    return [w @ A.to(w.device, w.dtype) for w in _as_list(Ws)]


def right_multiply_batched(Ws: Tensors, A: torch.Tensor, *,
                           max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[torch.Tensor]:
    """Batched: all layers' rows concatenated, one GEMM per chunk; results are views of its output."""
    Ws = _as_list(Ws)
    _check_weights(Ws, "right_multiply")
    n = Ws[0].shape[1]
    if any(w.shape[1] != n for w in Ws):
        raise ValueError("right_multiply: every weight must have the same input width (group by it first)")
    if A.dim() != 2 or A.shape[0] != n:
        raise ValueError(f"right_multiply: A has shape {tuple(A.shape)}; expected [{n}, n']")
    a_ = A.to(Ws[0].device, Ws[0].dtype)
    out: list[torch.Tensor] = []
    for a, b in _row_chunks(Ws, A.shape[1], max_chunk_bytes):
        group = Ws[a:b]
        if len(group) == 1:
            out.append(group[0] @ a_)
            continue
        out += list((torch.cat(group) @ a_).split([w.shape[0] for w in group]))
    return out


def right_multiply(Ws: Tensors, A: torch.Tensor, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[torch.Tensor]:
    """Dispatch of ``W_i A``: the reference (auto, torch); batched when native / triton is forced."""
    if _use_loop():
        return right_multiply_reference(Ws, A)
    return right_multiply_batched(Ws, A, max_chunk_bytes=max_chunk_bytes)


# ------------------------------------------------------------------------------- dict-level helpers
def _group(current: Mapping[str, torch.Tensor], key) -> dict:
    groups: dict = {}
    for name, w in current.items():
        groups.setdefault((key(w), w.dtype, w.device), []).append(name)
    return groups


def apply_lowrank(current: Mapping[str, torch.Tensor], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """``{name: current[name] + up @ down}`` with equally shaped weights batched together.

    Factors are moved to each weight's device and dtype (float64 in ``Edit.apply``). Names without factors
    are returned unchanged (the same tensor object).
    """
    out: dict[str, torch.Tensor] = {n: w for n, w in current.items() if n not in factors}
    todo = {n: w for n, w in current.items() if n in factors}
    for _, names in _group(todo, lambda w: tuple(w.shape)).items():
        Ws = [todo[n] for n in names]
        new = lowrank_update(Ws, [factors[n][0] for n in names], [factors[n][1] for n in names],
                             max_chunk_bytes=max_chunk_bytes)
        out.update(zip(names, new))
    return {n: out[n] for n in current}


def apply_shared(current: Mapping[str, torch.Tensor], *, U: torch.Tensor | None = None,
                 V: torch.Tensor | None = None, A: torch.Tensor | None = None,
                 max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Every weight times one shared right matrix: ``W + (W U) V^T`` (U, V given) or ``W A`` (A given).

    Weights are grouped by input width (and dtype/device); all of a group's rows go through one GEMM chain.
    """
    if (A is None) == (U is None or V is None):
        raise ValueError("apply_shared: give either U and V (low-rank) or A (dense), not both / neither")
    out: dict[str, torch.Tensor] = {}
    for _, names in _group(current, lambda w: w.shape[-1]).items():
        Ws = [current[n] for n in names]
        if A is not None:
            new = right_multiply(Ws, A, max_chunk_bytes=max_chunk_bytes)
        else:
            new = shared_update(Ws, U, V, max_chunk_bytes=max_chunk_bytes)
        out.update(zip(names, new))
    return {n: out[n] for n in current}


# ---------------------------------------------------------- fp32 shared update for 16-bit storage weights
#: storage dtypes whose shared update is computed in fp32 (``shared_rounded_fp32``) instead of float64
LOW_PRECISION_STORAGE = (torch.float16, torch.bfloat16)


class _Fp32Matmul:
    """Inside: fp32 matmuls at full fp32 precision (no TF32 on CUDA), the previous setting restored after.
    The bound of :func:`shared_fp32_error_bound` holds only for IEEE fp32 products."""

    def __enter__(self):
        self.prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.prev)


def shared_rounded_fp32(Ws: Tensors, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                        A: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``W_i + (W_i U) V^T`` (or ``W_i A``) computed in fp32, rounded once to each weight's own dtype.

    For 16-bit weights (UCE / CURE on an fp16 / bf16 model), instead of a float64 pass over every weight:
    each weight is widened to fp32 (exact), ``T = W U`` ([m, r]) and ``W + T V^T`` are two fp32 GEMMs with
    fp32 accumulation (``addmm``: the add happens in the GEMM epilogue), then one rounding to the storage
    dtype. No host synchronisation. Error (:func:`shared_fp32_error_bound`): the fp32 products carry at most
    ``(n + r + 2) eps32`` relative to ``|W| |U| |V|^T`` elementwise (``eps32 = 2^-24`` is the unit roundoff,
    n the input width, r the rank; standard dot-product bounds, Higham "Accuracy and Stability of Numerical
    Algorithms" §3.1, for the two products and the add). At n = 2048 that is ~1.2e-4 of ``|W||U||V|``,
    against a bf16 half ulp of 2e-3 (fp16: 2.4e-4) of the result: after the one rounding to bf16/fp16 an
    element equals the float64 route's rounding except where its exact value lies within the bound of a
    rounding boundary (then one ulp apart), or where the result cancels to far below ``|W||U||V|`` (then
    apart by at most the bound + one ulp; tests/test_apply_edit.py measures well under 1 % of elements
    differing on random data).
    """
    Ws = _as_list(Ws)
    out = []
    with torch.no_grad(), _Fp32Matmul():
        for w in Ws:
            wf = w.to(torch.float32)
            if A is not None:
                new = wf @ A.to(w.device, torch.float32)
            else:
                u = U.to(w.device, torch.float32)
                v = V.to(w.device, torch.float32)
                new = torch.addmm(wf, wf @ u, v.T)
            out.append(new.to(w.dtype))
    return out


def shared_fp32_error_bound(W: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                            A: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise float64 bound on ``|fp32 result before rounding - exact W + (W U) V^T|`` (or ``W A``):
    ``(n + r + 2) eps32 (|W| |U|) |V|^T + eps32 |W|`` (low rank), ``(n + 1) eps32 |W| |A|`` (dense). Add half
    a storage ulp of the exact value for the rounded result. In norms: ``||err||_F <= (n + r + 2) eps32
    ||W||_F ||U||_F ||V||_F + eps32 ||W||_F``."""
    eps = torch.finfo(torch.float32).eps / 2  # unit roundoff
    Wa = W.detach().to(torch.float64).abs()
    n = W.shape[1]
    if A is not None:
        return (n + 1) * eps * (Wa @ A.to(W.device, torch.float64).abs())
    Ua, Va = U.to(W.device, torch.float64).abs(), V.to(W.device, torch.float64).abs()
    return (n + U.shape[1] + 2) * eps * ((Wa @ Ua) @ Va.T) + eps * Wa
