"""Per-layer subspace bases from collected activations, one batched call per shape group."""
from __future__ import annotations

import warnings
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


def group_basis(acts: Activations, group: str, threshold: float, max_rank: int | None = None,
                center: bool = True) -> dict[int, GroupBasis]:
    """For one prompt group: per shape group, the basis of its pooled activations.

    center=True: the mean direction plus the principal directions of the centred rows (threshold on the
    centred variance). center=False: the paper's literal uncentred SVD (threshold on raw energy).
    """
    out = {}
    stats = acts.stats[group]
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
        if center:
            mean = torch.stack([s.mean() for s in st]).to(data.device)
            V, ranks = centered_basis(data, threshold, mean=mean, count=st[0].n_rows, is_gram=gram, max_rank=max_rank)
        else:
            V, ranks, _ = subspace_basis(data, threshold, is_gram=gram, max_rank=max_rank)
        out[d] = GroupBasis(idx, V, ranks.cpu())
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
