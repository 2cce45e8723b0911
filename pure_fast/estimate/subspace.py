"""Per-layer subspace bases from collected activations, one batched call per shape group.

Numerical health (documented behaviour; never NaN):
- rank-deficient rows (duplicate or collinear anchors, more rows than directions): the eigen-decompositions
  keep only directions above ``1e-10`` of the largest eigenvalue and divide by singular values only where
  they are positive, so the basis is orthonormal on the directions that exist. A streamed Gram matrix
  (fp32) uses the floor ``GRAM_REL_FLOOR`` = 1e-6 so its rounding noise never becomes a direction. When a
  group of at least two rows is one repeated row at some layer (identical anchors), ``group_basis`` warns;
- an empty group (no anchors, e.g. no retain concepts) has rank 0 everywhere: P = 0 (PURE warns);
- a threshold never gives rank 0 (the smallest rank reaching it is >= 1); rank 0 happens only where a
  layer's activations are all zero, and ``warn_degenerate`` warns that those layers stay unchanged;
- forget and retain subspaces that (nearly) coincide: ``warn_overlap`` measures, per layer, the share of
  the forget basis outside span(V_R), ``||V_F^T (I - P_R)||_F^2 / rank(V_F)`` (mean squared sine of the
  principal angles), and warns where it is below ``tol`` (default 1e-3): the edit is (close to) zero there,
  because PURE only removes what the retain set does not also hold.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..collect.activations import Activations
from ..ops.batched_svd import centered_basis, subspace_basis, union_basis


def shape_groups(layers) -> dict[int, list[int]]:
    """Layer indices grouped by activation width d_out (equal shapes are processed together)."""
    groups: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(layer.d_out, []).append(i)
    return groups


@dataclass
class GroupBasis:
    """Bases of one shape group: V [L_g, d, k] with zero columns past each layer's rank."""

    layer_indices: list[int]
    V: torch.Tensor
    ranks: torch.Tensor


GRAM_REL_FLOOR = 1e-6  # eigenvalue floor for streamed fp32 Gram matrices (their rounding noise is ~1e-7 relative)
IDENTICAL_SPREAD = 1e-8  # centred / uncentred energy below this: the rows are (numerically) one repeated row


def group_basis(acts: Activations, group: str, threshold: float, max_rank: int | None = None,
                center: bool = True) -> dict[int, GroupBasis]:
    """For one prompt group: per shape group, the basis of its pooled activations.

    center=True: the mean direction plus the principal directions of the centred rows (threshold on the
    centred variance). center=False: the paper's literal uncentred SVD (threshold on raw energy).
    Rows kept as rows are decomposed with the default eigenvalue floor (1e-10 of the largest); a streamed
    Gram matrix (accumulated in fp32) with ``GRAM_REL_FLOOR``, so its rounding noise never becomes a basis
    direction. Warns when a group of >= 2 rows is one repeated row at some layer (identical anchors).
    """
    out = {}
    stats = acts.stats[group]
    identical = []
    for d, idx in shape_groups(acts.layers).items():
        st = [stats[i] for i in idx]
        if all(s.n_rows == 0 for s in st):
            out[d] = GroupBasis(idx, torch.zeros(len(idx), d, 0, dtype=torch.float64),
                                torch.zeros(len(idx), dtype=torch.long))
            continue
        gram = any(s.is_gram for s in st)
        if gram:
            data = torch.stack([s.gram if s.is_gram else s.matrix().T @ s.matrix() for s in st])
        else:
            data = torch.stack([s.matrix() for s in st])
        floor = GRAM_REL_FLOOR if gram else 1e-10
        mean = torch.stack([s.mean() for s in st]).to(data.device)
        if center:
            V, ranks = centered_basis(data, threshold, mean=mean, count=st[0].n_rows, is_gram=gram, max_rank=max_rank,
                                      rel_floor=floor)
        else:
            V, ranks, _ = subspace_basis(data, threshold, is_gram=gram, max_rank=max_rank, rel_floor=floor)
        # identical rows: centred energy sum ||x - mu||^2 = sum ||x||^2 - n ||mu||^2 ~ 0
        n = st[0].n_rows
        if n >= 2:
            total = (torch.diagonal(data.double(), dim1=1, dim2=2).sum(-1) if gram else (data.double() ** 2).sum((1, 2)))
            spread = total - n * (mean.double() ** 2).sum(-1)
            for j, i in enumerate(idx):
                if float(total[j]) > 0 and float(spread[j]) <= IDENTICAL_SPREAD * float(total[j]):
                    identical.append(acts.layers[i].name)
        out[d] = GroupBasis(idx, V, ranks.cpu())
    if identical:
        warnings.warn(f"{group}: its {stats[0].n_rows} anchor rows are one repeated row at {len(identical)} layer(s) "
                      f"(e.g. {identical[0]}): the anchors are identical there, so the basis is that one direction; "
                      "use more varied anchors or templates", stacklevel=2)
    return out


def union_of(bases: list[dict[int, GroupBasis]]) -> dict[int, GroupBasis]:
    """Per shape group, the orthonormal basis of the sum of several groups' subspaces."""
    out = {}
    for d in bases[0]:
        V, ranks = union_basis([b[d].V for b in bases])
        out[d] = GroupBasis(bases[0][d].layer_indices, V, ranks)
    return out


def warn_degenerate(name: str, basis: dict[int, GroupBasis], layers) -> list[str]:
    """Layers whose basis has rank 0 (nothing estimated): a warning, never NaNs."""
    empty = []
    for gb in basis.values():
        for li, r in zip(gb.layer_indices, gb.ranks.tolist()):
            if r == 0:
                empty.append(layers[li].name)
    if empty:
        warnings.warn(f"{name} basis has rank 0 at {len(empty)} layer(s) (e.g. {empty[0]}); those layers are unchanged",
                      stacklevel=2)
    return empty


def overlap_fraction(forget: dict[int, GroupBasis], retain: dict[int, GroupBasis]) -> dict[int, float]:
    """Per layer index: ``||V_F^T (I - P_R)||_F^2 / rank(V_F)``, the share of the forget basis outside
    span(V_R) (1 = orthogonal to the retain subspace, 0 = inside it). Layers with rank(V_F) = 0 are omitted."""
    out = {}
    for d, gb in forget.items():
        V_F = gb.V.to(torch.float64)
        V_R = retain[d].V.to(V_F.device, torch.float64) if d in retain else V_F.new_zeros(V_F.shape[0], V_F.shape[1], 0)
        G = V_F.transpose(1, 2) - (V_F.transpose(1, 2) @ V_R) @ V_R.transpose(1, 2)
        energy = (G * G).sum((1, 2))
        for j, i in enumerate(gb.layer_indices):
            r = int(gb.ranks[j])
            if r:
                out[i] = float(energy[j]) / r
    return out


def warn_overlap(forget: dict[int, GroupBasis], retain: dict[int, GroupBasis], layers, tol: float = 1e-3) -> list[str]:
    """Warn where the forget subspace lies (nearly) inside the retain subspace: the edit is ~0 there."""
    frac = overlap_fraction(forget, retain)
    low = [layers[i].name for i, f in frac.items() if f < tol]
    if low:
        worst = min(frac.values())
        warnings.warn(
            f"forget and retain anchors are nearly collinear at {len(low)} of {len(frac)} layer(s) (e.g. {low[0]}: "
            f"only {worst:.1%} of the forget subspace lies outside the retain subspace); the edit changes those "
            "layers little. Retain concepts that are less similar to the forgotten one", stacklevel=2)
    return low


def _projected_grams(acts: Activations, group: str, retain: dict[int, GroupBasis]) -> dict[int, torch.Tensor]:
    """Per shape group: ``(I - P_R) H^T H (I - P_R)`` [L_g, d, d] float64 of one group's rows."""
    stats = acts.stats[group]
    out = {}
    for d, idx in shape_groups(acts.layers).items():
        st = [stats[i] for i in idx]
        G = torch.stack([(s.gram if s.is_gram else s.matrix().T @ s.matrix()).double() for s in st])
        V_R = retain[d].V.to(G.device, torch.float64) if d in retain else G.new_zeros(len(idx), d, 0)
        P = torch.eye(d, dtype=torch.float64, device=G.device) - V_R @ V_R.transpose(1, 2)
        out[d] = P @ G @ P
    return out


def specific_basis(acts: Activations, group: str, retain: dict[int, GroupBasis], threshold: float,
                   max_rank: int | None = None) -> dict[int, GroupBasis]:
    """Forget-*specific* basis: per layer, the top directions of the group's rows with the retain subspace
    removed, ``H (I - P_R)``, up to ``threshold`` of that (uncentred) energy. Orthogonal to span(V_R), so
    PURE's ``E = I - P_F (I - P_R)`` becomes the projector ``I - P_F``, and each layer's rank follows how
    much forget-specific energy it holds, not the concept's total variance."""
    from ..ops.batched_svd import subspace_basis

    out = {}
    for d, G in _projected_grams(acts, group, retain).items():
        idx = shape_groups(acts.layers)[d]
        if acts.stats[group][idx[0]].n_rows == 0:
            out[d] = GroupBasis(idx, torch.zeros(len(idx), d, 0, dtype=torch.float64), torch.zeros(len(idx), dtype=torch.long))
            continue
        V, ranks, _ = subspace_basis(0.5 * (G + G.transpose(1, 2)), threshold, is_gram=True, max_rank=max_rank,
                                     rel_floor=GRAM_REL_FLOOR)
        out[d] = GroupBasis(idx, V, ranks.cpu())
    return out


def specific_energy(acts: Activations, group: str, measure: dict[int, GroupBasis],
                    retain: dict[int, GroupBasis]) -> dict[int, float]:
    """Per layer index: ``sum_rows ||Q^T (I - P_R) h||^2`` for the group's rows, Q = ``measure``'s basis
    (the closed loop's residual: the forget-specific signal still present)."""
    out = {}
    for d, G in _projected_grams(acts, group, retain).items():
        Q = measure[d].V.to(G.device, torch.float64)
        e = torch.diagonal(Q.transpose(1, 2) @ G @ Q, dim1=1, dim2=2).sum(-1)
        for j, i in enumerate(measure[d].layer_indices):
            out[i] = float(e[j])
    return out


@dataclass
class ContrastFactors:
    """Per shape group, the truncated ridge-contrast edit of the output space (see ``contrast_factors``):
    ``I - C_F (C_F + M)^{-1} ~ I - A B``, A [L_g, d, k] (columns scaled by the shrink ``lambda / (1 + lambda)``),
    B [L_g, k, d], zero columns / rows past each layer's rank; ``eigvals`` [L_g, d] the generalized
    eigenvalues (descending) of (C_F, M)."""

    layer_indices: list[int]
    A: torch.Tensor
    B: torch.Tensor
    ranks: torch.Tensor
    eigvals: torch.Tensor


def _second_moment(st) -> torch.Tensor:
    g = st.gram if st.is_gram else st.matrix().T @ st.matrix()
    return g.double() / max(st.n_rows, 1)


def contrast_grams(acts: Activations, forget_groups: Sequence[str], retain_group: str | None, retain_weight: float,
                   ridge: float, retain_acts: Activations | None = None,
                   within_weight: float = 1.0) -> dict[int, tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Per shape group: (layer indices, C_F, M), float64 [L_g, d, d].

    ``C_F = sum_c E_c[(h - m_R)(h - m_R)^T]`` over the forget groups (each concept weighted equally, its rows
    centred on the retain mean m_R, so what the forget anchors share with everything else is not counted);
    ``M = retain_weight * (E_R[h h^T] + ridge * (tr(E_R[h h^T]) / d) I)`` (uncentred retain second moment: the
    shared mean direction carries most of its energy and is protected). Without retain rows, m_R = 0 and the
    ridge is relative to ``tr(C_F) / d``. ``within_weight`` w splits each concept's term into its spread around
    its own mean and the shift of that mean: ``w * Cov_c + (m_c - m_R)(m_c - m_R)^T`` (w = 1: the expression
    above; w = 0: the mean shift only). ``retain_acts``: where the retain group's rows are (default ``acts``;
    the closed loop re-collects only the forget anchors)."""
    racts = acts if retain_acts is None else retain_acts
    out = {}
    for d, idx in shape_groups(acts.layers).items():
        C_F = R = None
        if retain_group is not None and racts.stats[retain_group][idx[0]].n_rows > 0:
            rst = [racts.stats[retain_group][i] for i in idx]
            R = torch.stack([_second_moment(s) for s in rst])
            m_R = torch.stack([s.mean().double() for s in rst]).to(R.device)
        for g in forget_groups:
            fst = [acts.stats[g][i] for i in idx]
            if fst[0].n_rows == 0:
                continue
            G = torch.stack([_second_moment(s) for s in fst])
            mf = torch.stack([s.mean().double() for s in fst]).to(G.device).unsqueeze(2)
            mr = m_R.to(G.device).unsqueeze(2) if R is not None else torch.zeros_like(mf)
            shift = (mf - mr) @ (mf - mr).transpose(1, 2)
            G = within_weight * (G - mf @ mf.transpose(1, 2)) + shift
            C_F = G if C_F is None else C_F + G
        if C_F is None:
            C_F = torch.zeros(len(idx), d, d, dtype=torch.float64)
        eye = torch.eye(d, dtype=torch.float64, device=C_F.device)
        if R is not None:
            scale = torch.diagonal(R, dim1=1, dim2=2).sum(-1) / d
            M = retain_weight * (R.to(C_F.device) + ridge * scale.to(C_F.device)[:, None, None] * eye)
        else:
            scale = torch.diagonal(C_F, dim1=1, dim2=2).sum(-1) / d
            M = ridge * scale.clamp_min(1e-30)[:, None, None] * eye
        out[d] = (idx, 0.5 * (C_F + C_F.transpose(1, 2)), 0.5 * (M + M.transpose(1, 2)))
    return out


def contrast_factors(C_F: torch.Tensor, M: torch.Tensor, threshold: float, max_rank: int | None = None,
                     min_shrink: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ridge-contrast change of the output space, ``C_F (C_F + M)^{-1}`` (M symmetric positive definite),
    as low-rank factors. ``E = I - C_F (C_F + M)^{-1}`` minimises ``tr(E C_F E^T) + tr((E - I) M (E - I)^T)``:
    the forget deviations are removed where they are large against what the retain rows (and the ridge) hold,
    and shrunk, not removed, where retain rows also need that direction.

    With ``M = L L^T`` and ``L^{-1} C_F L^{-T} = Q diag(lambda) Q^T``: ``C_F (C_F + M)^{-1} = (L Q) diag(lambda /
    (1 + lambda)) (Q^T L^{-1})``. Kept: the top directions holding ``threshold`` of the whitened forget energy
    ``sum lambda`` (at most ``max_rank``), and only those whose shrink ``lambda / (1 + lambda)`` is at least
    ``min_shrink``. Returns (A [L, d, k], B [L, k, d], ranks [L], eigenvalues [L, d] descending)."""
    C_F = C_F.to(torch.float64)
    M = M.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info > 0).any()):
        from ..errors import UsageError
        raise UsageError("the contrast basis' retain matrix is not positive definite (its ridge is below the "
                         "activations' rounding noise); raise the PURE option ridge (e.g. ridge=1e-3)")
    Linv_C = torch.linalg.solve_triangular(L, C_F, upper=False)  # L^{-1} C_F
    S = torch.linalg.solve_triangular(L, Linv_C.transpose(1, 2), upper=False)  # L^{-1} C_F L^{-T}
    lam, Q = torch.linalg.eigh(0.5 * (S + S.transpose(1, 2)))
    lam, Q = lam.flip(-1).clamp_min(0), Q.flip(-1)
    total = lam.sum(-1, keepdim=True)
    cum = torch.cumsum(lam, -1) / total.clamp_min(1e-300)
    rank = (cum < threshold - 1e-12).sum(-1) + 1
    shrink = lam / (1 + lam)
    rank = torch.minimum(rank, (shrink >= min_shrink).sum(-1))
    rank = torch.where(total.squeeze(-1) > 0, rank, torch.zeros_like(rank))
    if max_rank is not None:
        rank = rank.clamp(max=max_rank)
    k = max(int(rank.max()), 0) if rank.numel() else 0
    keep = (torch.arange(k, device=rank.device)[None, :] < rank[:, None]).to(torch.float64)  # [L, k]
    Qk = Q[:, :, :k]
    A = (L @ Qk) * (shrink[:, :k] * keep)[:, None, :]
    B = torch.linalg.solve_triangular(L.transpose(1, 2), Qk, upper=True).transpose(1, 2) * keep[:, :, None]  # Q^T L^{-1}
    return A, B, rank.cpu(), lam


def contrast_edit(acts: Activations, forget_groups: Sequence[str], retain_group: str | None, threshold: float,
                  max_rank: int | None, retain_weight: float, ridge: float,
                  retain_acts: Activations | None = None, within_weight: float = 1.0) -> dict[int, ContrastFactors]:
    """``contrast_factors`` of ``contrast_grams`` for every shape group."""
    out = {}
    for d, (idx, C_F, M) in contrast_grams(acts, forget_groups, retain_group, retain_weight, ridge,
                                           retain_acts, within_weight).items():
        A, B, ranks, lam = contrast_factors(C_F, M, threshold, max_rank)
        out[d] = ContrastFactors(idx, A, B, ranks, lam)
    return out
