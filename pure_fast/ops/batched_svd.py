"""Batched subspace estimation: orthonormal bases of row spaces for a stack of equally shaped layers.

One call handles every layer of a shape group (``[L, n, d]`` rows or ``[L, d, d]`` Gram matrices):
- rows with n < d: eigen-decomposition of the small Gram ``H H^T`` ([L, n, n]), V = H^T U / sigma;
- rows with n >= d, or a streamed Gram ``H^T H``: eigen-decomposition of the d x d Gram.
- ``method="randomized"`` (rows or Gram): a batched randomized range finder (Halko, Martinsson & Tropp
  2011, Alg. 4.4 with QR-stabilised power iterations): ``Y = H Omega`` for a Gaussian ``Omega [L, d, k]``,
  ``q`` power iterations, ``B = Q^T H`` and the SVD of the small ``[L, k, d]`` B. The cumulative-variance
  rank is taken against the *exact* total energy ``||H||_F^2`` (or ``trace G``), so a sketch that is too
  small is detected (its captured energy stays under the threshold) and the sketch doubles until it holds
  the threshold's share, falling back to the exact route once k reaches min(n, d). Worth it when both n
  and d are large and the kept rank is small; the exact routes stay the default (PURE's shapes are cheap).
Per-layer ranks from a cumulative-variance threshold are applied with masks (columns past the rank are
zero), so no Python loop runs over layers. Work is done in float64 for stability.

``subspace_basis_loop`` is the per-layer reference used by tests and benchmarks.
"""
from __future__ import annotations

import os

import torch

from ..errors import UsageError

# Small symmetric eigenproblems of CUDA tensors are solved on the host. torch's batched ``linalg.eigh`` on
# CUDA is slow for batches of small matrices (pytorch/pytorch#174674, 2026: [500, 100, 100] in 914 ms vs
# 8 ms in CuPy; #183806: eigh 30-130x slower from 2.10), exactly PURE's shapes: [L, n, n] Gram matrices with
# n = anchors x seeds x steps ~ 80-160, and the union's blocks. LAPACK on the host does one such matrix in
# well under a millisecond; the copies are tiny ([70, 160, 160] float64 = 14 MB). ``PURE_FAST_EIGH`` =
# ``host`` / ``device`` forces a side; ``auto`` (default) takes the host for CUDA inputs with n <= 96.
# Measured on an H100 host (bench_estimate, table ``eigh``, 2026-11-22): [70, 80, 80] 30 ms host vs 75 ms
# device (2.5x); [60, 130, 130] 83 vs 64 ms and [70, 160, 160] 128 vs 86 ms (device faster), hence 96.
HOST_EIGH_MAX_N = 96


def eigh_on_host(x: torch.Tensor) -> bool:
    """Whether :func:`batched_eigh` solves ``x`` ([..., n, n]) on the host."""
    mode = os.environ.get("PURE_FAST_EIGH", "auto").strip().lower() or "auto"
    if mode not in ("auto", "host", "device"):
        raise UsageError(f"PURE_FAST_EIGH={mode!r} is not valid; use auto, host or device")
    if x.device.type == "cpu" or mode == "device":
        return False
    return mode == "host" or x.shape[-1] <= HOST_EIGH_MAX_N


def batched_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(x)`` (ascending eigenvalues), on the host for small CUDA matrices (see above);
    results come back on x's device."""
    if eigh_on_host(x):
        evals, evecs = torch.linalg.eigh(x.detach().to("cpu"))
        return evals.to(x.device, non_blocking=False), evecs.to(x.device, non_blocking=False)
    return torch.linalg.eigh(x)


def _ranks_from_energy(s2: torch.Tensor, threshold: float, max_rank: int | None, rel_floor: float) -> torch.Tensor:
    """s2: [L, k] descending eigenvalues. Smallest r with cumulative share >= threshold, per layer."""
    s2 = s2.clamp(min=0)
    total = s2.sum(-1, keepdim=True)
    share = s2.cumsum(-1) / total.clamp(min=torch.finfo(s2.dtype).tiny)
    # number of leading components needed: count of shares strictly below threshold, plus one
    r = (share < threshold - 1e-12).sum(-1) + 1
    # never keep numerically-zero directions
    significant = (s2 > rel_floor * s2[..., :1]).sum(-1)
    r = torch.minimum(r, significant)
    if max_rank is not None:
        r = r.clamp(max=max_rank)
    r = torch.where(total.squeeze(-1) > 0, r, torch.zeros_like(r))
    return r


def subspace_basis(
    data: torch.Tensor,
    threshold: float,
    *,
    is_gram: bool = False,
    max_rank: int | None = None,
    rel_floor: float = 1e-10,
    method: str = "exact",
    **randomized_options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top right-singular vectors up to a cumulative-variance threshold, for every layer at once.

    data: [L, n, d] rows (or [L, d, d] Gram when ``is_gram``). Returns (V [L, d, k] with zero columns past
    each layer's rank, ranks [L] int64, energies [L, k] descending sigma^2). k = max rank over layers.
    ``method``: "exact" (small Gram / SVD / eigh, chosen by shape) or "randomized" (see
    :func:`randomized_basis`, which takes ``randomized_options``).
    """
    if data.dim() != 3:
        raise ValueError(f"expected a [L, n, d] stack, got shape {tuple(data.shape)}")
    if method == "randomized":
        return randomized_basis(data, threshold, is_gram=is_gram, max_rank=max_rank, rel_floor=rel_floor,
                                **randomized_options)
    if method != "exact":
        raise ValueError(f"method={method!r}; use 'exact' or 'randomized'")
    if randomized_options:
        raise TypeError(f"unexpected options {sorted(randomized_options)} for method='exact'")
    x = data.to(torch.float64)
    L = x.shape[0]
    if is_gram:
        d = x.shape[-1]
        evals, evecs = batched_eigh(0.5 * (x + x.transpose(1, 2)))
        s2 = evals.flip(-1)
        V = evecs.flip(-1)
    else:
        n, d = x.shape[1], x.shape[2]
        if n == 0:
            return x.new_zeros(L, d, 0), torch.zeros(L, dtype=torch.long, device=x.device), x.new_zeros(L, 0)
        if n < d:
            small = x @ x.transpose(1, 2)  # [L, n, n]
            evals, U = batched_eigh(small)
            s2 = evals.flip(-1).clamp(min=0)
            U = U.flip(-1)
            sigma = s2.sqrt()
            safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
            V = (x.transpose(1, 2) @ U) / safe.unsqueeze(1)
        else:
            _, S, Vh = torch.linalg.svd(x, full_matrices=False)
            s2 = S**2
            V = Vh.transpose(1, 2)
    ranks = _ranks_from_energy(s2, threshold, max_rank, rel_floor)
    k = int(ranks.max()) if ranks.numel() else 0
    V = V[:, :, :k]
    mask = torch.arange(k, device=V.device)[None, :] < ranks[:, None]  # [L, k]
    V = V * mask[:, None, :]
    if not is_gram and k > 0:
        # re-orthonormalise the kept columns (the small-Gram route loses a little orthogonality)
        Q, R = torch.linalg.qr(V)
        sign = torch.sign(torch.diagonal(R, dim1=1, dim2=2))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        V = Q * sign[:, None, :] * mask[:, None, :]
    return V, ranks, s2[:, :k] * mask


def _masked_output(V, s2, ranks):
    k = int(ranks.max()) if ranks.numel() else 0
    mask = torch.arange(k, device=V.device)[None, :] < ranks[:, None]
    return V[:, :, :k] * mask[:, None, :], ranks, s2[:, :k] * mask


def randomized_basis(
    data: torch.Tensor,
    threshold: float,
    *,
    is_gram: bool = False,
    max_rank: int | None = None,
    rel_floor: float = 1e-10,
    sketch: int | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched randomized SVD; same outputs and rank rule as :func:`subspace_basis` (exact total energy).

    ``sketch``: initial sketch width (default ``max_rank + oversample``, else ``16 + oversample``); it
    doubles while some layer's sketch captures less than ``threshold`` of that layer's energy. The Gaussian
    test matrix comes from a CPU generator seeded with ``seed`` (same basis on any device for a given seed).
    """
    if data.dim() != 3:
        raise ValueError(f"expected a [L, n, d] stack, got shape {tuple(data.shape)}")
    x = data.to(torch.float64)
    L, n, d = x.shape
    full = d if is_gram else min(n, d)
    if full == 0 or L == 0:
        return subspace_basis(data, threshold, is_gram=is_gram, max_rank=max_rank, rel_floor=rel_floor)
    if is_gram:
        x = 0.5 * (x + x.transpose(1, 2))
        total = torch.diagonal(x, dim1=1, dim2=2).sum(-1).clamp(min=0)
    else:
        total = (x * x).sum((1, 2))
    k = sketch or ((max_rank or 16) + oversample)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    while True:
        if k >= full:  # the sketch would be as large as the problem: exact is cheaper and exact
            return subspace_basis(data, threshold, is_gram=is_gram, max_rank=max_rank, rel_floor=rel_floor)
        omega = torch.randn(L, d, k, generator=g, dtype=torch.float64).to(x.device)
        xt = x if is_gram else x.transpose(1, 2)
        Q = torch.linalg.qr(x @ omega)[0]  # [L, n, k] (Gram: [L, d, k])
        for _ in range(power_iters):
            Z = torch.linalg.qr(xt @ Q)[0]
            Q = torch.linalg.qr(x @ Z)[0]
        if is_gram:
            evals, evecs = batched_eigh(Q.transpose(1, 2) @ x @ Q)
            s2 = evals.flip(-1).clamp(min=0)
            V = Q @ evecs.flip(-1)
        else:
            _, S, Vh = torch.linalg.svd(Q.transpose(1, 2) @ x, full_matrices=False)  # B = Q^T H: [L, k, d]
            s2 = S**2
            V = Vh.transpose(1, 2)
        captured = s2.sum(-1)
        enough = captured >= (threshold - 1e-12) * total
        if max_rank is not None and max_rank <= k - oversample:
            enough = torch.ones_like(enough)  # the cap is inside the sketch: the rank is at most max_rank
        if bool(enough.all()):
            break
        k *= 2
    # cumulative share against the exact total energy (not the sketch's): same rule as the exact routes
    share = s2.cumsum(-1) / total[:, None].clamp(min=torch.finfo(s2.dtype).tiny)
    r = (share < threshold - 1e-12).sum(-1) + 1
    r = torch.minimum(r, (s2 > rel_floor * s2[:, :1]).sum(-1))
    if max_rank is not None:
        r = r.clamp(max=max_rank)
    r = torch.where(total > 0, r, torch.zeros_like(r)).clamp(max=s2.shape[1])
    return _masked_output(V, s2, r)


def subspace_basis_loop(data: torch.Tensor, threshold: float, *, is_gram: bool = False,
                        max_rank: int | None = None):
    """Reference: one full SVD (or eigh) per layer in a Python loop. Same outputs as ``subspace_basis``."""
    Vs, ranks = [], []
    for l in range(data.shape[0]):
        x = data[l].to(torch.float64)
        if is_gram:
            evals, evecs = torch.linalg.eigh(0.5 * (x + x.T))
            s2, V = evals.flip(0).clamp(min=0), evecs.flip(1)
        else:
            _, S, Vh = torch.linalg.svd(x, full_matrices=False)
            s2, V = S**2, Vh.T
        r = int(_ranks_from_energy(s2[None], threshold, max_rank, 1e-10)[0])
        Vs.append(V[:, :r])
        ranks.append(r)
    k = max(ranks) if ranks else 0
    d = data.shape[-1]
    out = torch.zeros(data.shape[0], d, k, dtype=torch.float64, device=data.device)
    for l, V in enumerate(Vs):
        out[l, :, : V.shape[1]] = V
    return out, torch.tensor(ranks, dtype=torch.long), None


def centered_basis(
    data: torch.Tensor,
    threshold: float,
    *,
    mean: torch.Tensor,
    count: int | torch.Tensor,
    is_gram: bool = False,
    max_rank: int | None = None,
    rel_floor: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis of span{mean} + the top principal directions of the centred data (threshold on centred variance).

    data: rows [L, n, d] or uncentred Gram [L, d, d]; mean: [L, d] row mean; count: rows per layer.
    Returns (V [L, d, k] masked, ranks [L]). The mean direction is always kept (when non-zero): it carries
    the concept's average signal; the centred spectrum decides how many further directions are kept.
    """
    x = data.to(torch.float64)
    mu = mean.to(torch.float64)
    if is_gram:
        n = torch.as_tensor(count, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        xc = x - n * mu[:, :, None] * mu[:, None, :]
        Vc, rc, _ = subspace_basis(xc, threshold, is_gram=True, max_rank=None if max_rank is None else max(max_rank - 1, 1),
                                   rel_floor=rel_floor)
    else:
        xc = x - mu[:, None, :]
        Vc, rc, _ = subspace_basis(xc, threshold, max_rank=None if max_rank is None else max(max_rank - 1, 1),
                                   rel_floor=rel_floor)
    # add the mean direction, Gram-Schmidt against the centred basis
    resid = mu - (Vc @ (Vc.transpose(1, 2) @ mu[:, :, None]))[:, :, 0] if Vc.shape[2] else mu.clone()
    norm = resid.norm(dim=1)
    # sqrt of the eigenvalue floor (1e-5 for 1e-10): a residual below it is rounding noise of fp32 rows, not a direction
    keep = norm > max(rel_floor, 1e-10) ** 0.5 * mu.norm(dim=1).clamp(min=1e-300)
    unit = resid / norm.clamp(min=1e-300)[:, None] * keep[:, None]
    V = torch.cat([unit[:, :, None], Vc], dim=2)
    ranks = rc + keep.long()
    # compact: move zero columns to the end so that columns [0, rank) are the basis
    order = torch.argsort((V.abs().sum(1) == 0).to(torch.int8), dim=1, stable=True)
    V = torch.gather(V, 2, order[:, None, :].expand(-1, V.shape[1], -1))
    k = int(ranks.max()) if ranks.numel() else 0
    return V[:, :, :k], ranks


def union_basis(bases: list[torch.Tensor], tol: float = 1e-6, block_columns: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the sum of subspaces (each [L, d, k_i], orthonormal or zero columns), batched.

    Returns (V [L, d, k] masked, ranks [L]). Directions shared by several inputs are kept once.

    Block Gram-Schmidt over the inputs (concatenated into blocks of about ``block_columns`` columns), all
    layers at once: the part of each block outside the span gathered so far, ``R = B - Q Qᵀ B``, keeps the
    directions with singular value above ``tol``, found by the eigen-decomposition of the small Gram ``RᵀR``
    (eigenvalue > tol²), scaled to unit length, projected off Q a second time ("twice is enough") and
    orthonormalised by a second such eigen step. Cost: a few batched GEMMs per block over Q plus ``block x block`` eigenproblems,
    instead of the SVD of the whole ``[d, Σ k_i]`` stack (``union_basis_svd``, the reference). The span is the
    same; only directions within ~``tol`` of the others can be decided differently (for two inputs sharing a
    direction at angle θ: dropped at θ ≤ √2 tol in the same block, as the SVD does, θ ≤ tol across blocks).
    Columns come in block order (not by singular value); everything downstream uses the projector.
    """
    if not bases:
        raise ValueError("union_basis needs at least one basis")
    # inputs are taken in blocks of about ``block_columns`` columns: fewer, fatter products over Q
    mats, pending = [], []
    for b in bases:
        pending.append(b.to(torch.float64))
        if sum(p.shape[2] for p in pending) >= block_columns:
            mats.append(torch.cat(pending, dim=2))
            pending = []
    if pending:
        mats.append(torch.cat(pending, dim=2))
    L, d = mats[0].shape[0], mats[0].shape[1]
    dev = mats[0].device
    ranks = torch.zeros(L, dtype=torch.long, device=dev)
    Q = mats[0].new_zeros(L, d, 0)
    tol2 = tol * tol
    for V in mats:
        if V.shape[2] == 0:
            continue
        R = V - Q @ (Q.transpose(1, 2) @ V) if Q.shape[2] else V
        N, _ = _orthonormal_directions(R, tol2)
        if Q.shape[2]:  # second Gram-Schmidt pass, on the scaled directions: removes what the first pass's
            N = N - Q @ (Q.transpose(1, 2) @ N)  # rounding and the 1/sqrt(lambda) scaling left along Q
        N, keep = _orthonormal_directions(N, 0.25)  # kept columns have norm ~1, dropped ones are 0
        ranks = ranks + keep.sum(-1)
        Q = torch.cat([Q, N], dim=2)
    if Q.shape[2] == 0:
        return Q, ranks
    order = torch.argsort((Q.abs().sum(1) == 0).to(torch.int8), dim=1, stable=True)
    Q = torch.gather(Q, 2, order[:, None, :].expand(-1, d, -1))
    k = int(ranks.max())
    mask = torch.arange(k, device=dev)[None, :] < ranks[:, None]
    return Q[:, :, :k] * mask[:, None, :], ranks


def _orthonormal_directions(R: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns spanning R's directions with Gram eigenvalue > floor: ``(R U / sqrt(lambda)) masked``, and the
    mask [L, k] (the eigenvectors of the k x k Gram ``RᵀR``, so only small eigenproblems)."""
    G = R.transpose(1, 2) @ R
    evals, U = batched_eigh(0.5 * (G + G.transpose(1, 2)))
    keep = evals > floor
    scale = torch.where(keep, evals.clamp(min=floor).rsqrt(), torch.zeros_like(evals))
    return (R @ U) * scale[:, None, :], keep


def union_basis_svd(bases: list[torch.Tensor], tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for :func:`union_basis`: left singular vectors of the stacked bases with singular value
    > ``tol`` (one SVD of ``[d, Σ k_i]`` per layer). Returns (V [L, d, k] masked, ranks [L])."""
    cat = torch.cat([b.to(torch.float64) for b in bases], dim=2)
    if cat.shape[2] == 0:
        return cat, torch.zeros(cat.shape[0], dtype=torch.long, device=cat.device)
    U, S, _ = torch.linalg.svd(cat, full_matrices=False)
    ranks = (S > tol).sum(-1)
    k = int(ranks.max())
    mask = torch.arange(k, device=U.device)[None, :] < ranks[:, None]
    return U[:, :, :k] * mask[:, None, :], ranks


def projector_distance(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """||P1 - P2||_F per layer: compares subspaces independent of the choice of basis."""
    P1 = V1 @ V1.transpose(-1, -2)
    P2 = V2 @ V2.transpose(-1, -2)
    return torch.linalg.matrix_norm(P1 - P2)
