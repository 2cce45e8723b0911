"""PURE: projection in U-Net rendering for erasure ("Concept Unlearning via Cross-Attention Activation Projection
for Diffusion Models", arXiv:2605.25765).

Per layer l: ``E = I - P_F (I - P_R)``, ``W_K <- E W_K``, ``W_V <- E W_V``, with P_F, P_R projectors on the
top right-singular vectors (cumulative-variance thresholds) of the pooled cross-attention outputs of the
forget / retain anchors. The change is ``ΔW = -V_F [V_F^T (I - P_R) W]``: stored as factors
``up = -V_F`` [d_out, r], ``down = V_F^T (I - P_R) W`` [r, d_in], never as a dense d x d matrix.

Choices the paper leaves open (defaults picked on the toy world, documented in the README; the toy world's
categories use the thresholds of ``toy/presets.py``):
- trajectory: DDIM, 10-step schedule, its first 5 (noisiest) steps recorded, 2 seeds per anchor, CFG at
  the model's default scale, conditional branch only, reduced resolution (adapter.default_collect_size);
- centring (``center=True``, default): the raw pooled activations are dominated by one shared mean
  direction (on the tiny and toy models it alone holds > 95 % of the uncentred energy, so an uncentred
  threshold keeps only it and nothing is erased). Each basis is therefore the mean direction plus the
  principal directions of the centred rows up to the threshold (cumulative *variance*). The shared part
  of the means lies in span(V_R) and is cancelled by (I - P_R). ``center=False`` is the literal uncentred SVD;
- several forget concepts: each concept gets its own basis at the forget threshold, then the union is
  taken (a concept with few anchors is not drowned by another's variance);
- an empty retain set means P_R = 0 (a warning is issued), i.e. plain projection E = I - P_F.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..collect.activations import CollectOptions
from ..edits.edit import LowRankEdit
from ..errors import UsageError
from ..estimate.subspace import group_basis, union_of, warn_degenerate, warn_overlap
from ..options import option
from .base import EraseContext, Method

THRESHOLD = (0, 1, "(]")


@dataclass
class PureOptions:
    forget_threshold: float = option(0.95, range=THRESHOLD, help="PURE cumulative-variance threshold (0,1]")
    retain_threshold: float = option(0.95, range=THRESHOLD, help="PURE cumulative-variance threshold (0,1]")
    max_rank: int | None = option(None, range=(1, math.inf, "[)"), use="an integer >= 1 (or None for no cap)",
                                  help="rank cap per forget concept and layer (None: no cap)")
    center: bool = option(True, help="centre the pooled activations (the shared mean direction kept apart)")
    edit_keys: bool = option(True, help="edit the to_k weights")
    edit_values: bool = option(True, help="edit the to_v weights")
    collect: CollectOptions = field(default_factory=CollectOptions)

    def check(self) -> None:
        if not (self.edit_keys or self.edit_values):
            raise UsageError("edit_keys and edit_values are both off; nothing would change")


def pure_factors(V_F: torch.Tensor, V_R: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched factors of ΔW = -V_F V_F^T (I - P_R) W.

    V_F [L, d, k], V_R [L, d, m] (orthonormal or zero columns), W [L, d, d_in]. Returns (up [L, d, k],
    down [L, k, d_in]) in float64.
    """
    V_F = V_F.to(torch.float64)
    V_R = V_R.to(torch.float64)
    W = W.to(torch.float64)
    G = V_F.transpose(1, 2) - (V_F.transpose(1, 2) @ V_R) @ V_R.transpose(1, 2)  # [L, k, d] = V_F^T (I - P_R)
    return -V_F, G @ W


def make_edit(ctx: EraseContext) -> LowRankEdit:
    """Build the PURE edit from the context's forget anchors (per concept) and retain anchors."""
    opts, forget_prompts, retain_prompts = ctx.options, ctx.forget_prompts, ctx.retain_prompts
    groups = {f"forget:{c}": p for c, p in forget_prompts.items()}
    groups["retain"] = retain_prompts
    acts = ctx.collect(groups)

    with ctx.timed("estimate_s"):
        per_concept = [group_basis(acts, f"forget:{c}", opts.forget_threshold, opts.max_rank, opts.center)
                       for c in forget_prompts]
        forget = union_of(per_concept) if len(per_concept) > 1 else per_concept[0]
        if not retain_prompts:
            warnings.warn("no retain concepts: PURE becomes plain projection E = I - P_F", stacklevel=2)
        retain = group_basis(acts, "retain", opts.retain_threshold, None, opts.center)
        warn_degenerate("forget", forget, acts.layers)
        if retain_prompts:
            warn_overlap(forget, retain, acts.layers)

    layers = acts.layers
    factors, shapes, ranks = {}, {}, {}
    with ctx.timed("edit_s"), torch.no_grad():
        for d, gb in forget.items():
            idx = gb.layer_indices
            V_R = retain[d].V
            which = ([("to_k", lambda l: l.key_weight)] if opts.edit_keys else []) + (
                [("to_v", lambda l: l.value_weight)] if opts.edit_values else [])
            for proj, name_of in which:
                W = torch.stack([getattr(layers[i].module, proj).weight.detach() for i in idx])
                up, down = pure_factors(gb.V.to(W.device), V_R.to(W.device), W)
                for j, i in enumerate(idx):
                    r = int(gb.ranks[j])
                    if r == 0:
                        continue
                    name = name_of(layers[i])
                    factors[name] = (up[j, :, :r].float().cpu().contiguous(), down[j, :r].float().cpu().contiguous())
                    shapes[name] = tuple(W.shape[1:])
                    ranks[layers[i].name] = r
    stats = ctx.stats(
        rows={g: acts.rows(g) for g in acts.groups()},
        forget_rank=ranks,
        retain_rank={layers[i].name: int(r) for gb in retain.values()
                     for i, r in zip(gb.layer_indices, gb.ranks.tolist())},
    )
    return LowRankEdit(
        method="pure", family=ctx.adapter.family,
        concepts={"forget": list(forget_prompts), "retain_prompts": list(retain_prompts)},
        options=ctx.options_meta(), factors=factors, shapes=shapes, stats=stats,
    )


METHOD = Method("pure", PureOptions, make_edit,
                "PURE: projects the forget concepts' cross-attention activations off the K/V weights (closed form)")
