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
- an empty retain set means P_R = 0 (a warning is issued), i.e. plain projection E = I - P_F;
- ``basis`` / ``rounds`` (the forget-specific basis and the closed loop) and ``preset='paper'``: see
  ``PureOptions`` and ``PAPER_PRESET``; the defaults were chosen on the toy world's dev concepts by
  ``bench/sweep_pure.py`` (results in ``bench/results/sweep_pure.md``).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..collect.activations import CollectOptions
from ..edits.edit import LowRankEdit
from ..errors import UsageError
from ..collect.activations import collect_activations
from ..estimate.subspace import (ContrastFactors, contrast_edit, group_basis, specific_basis, specific_energy, union_of,
                                  warn_degenerate, warn_overlap)
from ..options import option
from .base import EraseContext, Method

THRESHOLD = (0, 1, "(]")
RESIDUAL_MEASURE_THRESHOLD = 0.99  # the closed loop's measuring basis keeps 99 % of the forget-specific energy

# The paper's method ("Concept Unlearning via Cross-Attention Activation Projection for Diffusion Models",
# arXiv:2605.25765), reachable exactly as ``preset='paper'``: literal uncentred SVDs with cumulative-variance
# thresholds (the paper gives no values: 0.95, this library's conservative default), one open-loop edit of K
# and V with the variance basis, activations of a short trajectory ("typically 5 timesteps", its rebuttal)
# with a few random latents: the first 5 steps of a 10-step DDIM schedule, 2 seeds per anchor, CFG at the
# model's default scale, conditional branch. The same on every category (no toy thresholds); options the
# caller names explicitly still override it.
PAPER_PRESET = {"forget_threshold": 0.95, "retain_threshold": 0.95, "max_rank": None, "center": False,
                "edit_keys": True, "edit_values": True, "basis": "variance", "rounds": 1, "residual_tol": 0.05,
                "steps": 10, "record_steps": 5, "seeds": (0, 1), "guidance_scale": None, "scheduler": "ddim",
                "size": None}


@dataclass
class PureOptions:
    """``basis``: how V_F is chosen per layer: 'variance' (the paper: top directions of the forget rows up to
    ``forget_threshold`` of their variance) or 'specific' (top directions of the forget rows with the retain
    subspace removed, ``H_F (I - P_R)``, up to ``forget_threshold`` of that forget-specific energy: each
    layer's rank follows what only the forget concept holds there, and ``E = I - P_F`` is a projector) or
    'contrast' (not a projection: the ridge-contrast map ``E = I - C_F (C_F + M)^{-1}``, the minimiser of
    ``tr(E C_F E^T) + tr((E - I) M (E - I)^T)`` with C_F the forget rows' deviations from the retain mean and
    ``M = retain_weight * (E_R[h h^T] + ridge * I)``; a forget direction is removed in proportion to how much
    more forget than retain energy it carries, instead of not at all as soon as a retain anchor spans it,
    which is what happens when many members of one category are retained; truncated to the generalized
    eigen-directions holding ``forget_threshold`` of the whitened forget energy, see
    ``estimate.subspace.contrast_factors``).
    ``rounds``: the closed loop. After an edit, the forget anchors are collected again on the edited model,
    the forget-specific signal left is measured against the unedited model's (same anchors and seeds:
    construction data, never evaluation data) and what is left is erased; at most ``rounds`` rounds (1 =
    open loop, the paper), stopping once the residual is below ``residual_tol``. A round that does not lower
    the residual is dropped and the loop stops, so the residual never increases. Each round is one low-rank
    factor pair per weight; they are concatenated, so the result is one low-rank edit (rank <= the sum of
    the rounds'), one file, one LoRA, one revert. ``preset``: 'paper' = ``PAPER_PRESET``."""

    PRESETS = {"paper": PAPER_PRESET}
    forget_threshold: float = option(0.95, range=THRESHOLD, help="PURE cumulative-variance threshold (0,1]")
    retain_threshold: float = option(0.95, range=THRESHOLD, help="PURE cumulative-variance threshold (0,1]")
    max_rank: int | None = option(None, range=(1, math.inf, "[)"), use="an integer >= 1 (or None for no cap)",
                                  help="rank cap per forget concept and layer (None: no cap)")
    center: bool = option(True, help="centre the pooled activations (the shared mean direction kept apart)")
    edit_keys: bool = option(True, help="edit the to_k weights")
    edit_values: bool = option(True, help="edit the to_v weights")
    basis: str = option("variance", choices=("variance", "specific", "contrast"),
                        help="forget basis: 'variance' (paper), 'specific' (outside the retain subspace) or "
                             "'contrast' (ridge trade-off against the retain rows' energy)")
    # 30: chosen on the toy world's dev concepts by bench/sweep_defaults.py (bench/results/sweep_defaults.md)
    retain_weight: float = option(30.0, range=(0, math.inf, "()"),
                                  help="basis='contrast': weight of the retain rows against the forget deviations")
    ridge: float = option(1e-3, range=(0, math.inf, "()"),
                          help="basis='contrast': ridge, relative to the retain rows' mean energy per direction")
    within_weight: float = option(1.0, range=(0, 1, "[]"),
                                  help="basis='contrast': weight of the forget rows' spread around their own mean "
                                       "(1: all of it; 0: only the shift of their mean from the retain mean)")
    # 3: chosen on the toy world's dev concepts (bench/sweep_pure.py, bench/results/sweep_pure.md)
    rounds: int = option(3, range=(1, 20, "[]"), use="an integer in [1, 20] (1 = open loop)",
                         help="closed loop: at most this many erase rounds, re-measured on the edited model")
    residual_tol: float = option(0.05, range=(0, 1, "[)"),
                                 help="closed loop: stop once the anchors' forget-specific residual is below this")
    preset: str = option("default", choices=("default", "paper"),
                         help="'paper': the published method exactly (PAPER_PRESET); named options still override")
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


def forget_basis(acts, forget_prompts, retain, opts: PureOptions, retain_acts=None):
    """The union over forget concepts of each concept's basis (``opts.basis``); for 'contrast', the
    ``ContrastFactors`` of all forget concepts together (retain rows from ``retain_acts``, default ``acts``)."""
    if opts.basis == "contrast":
        racts = acts if retain_acts is None else retain_acts
        return contrast_edit(acts, [f"forget:{c}" for c in forget_prompts],
                             "retain" if "retain" in racts.groups() else None, opts.forget_threshold,
                             opts.max_rank, opts.retain_weight, opts.ridge, retain_acts=racts,
                             within_weight=opts.within_weight)
    if opts.basis == "specific":
        per_concept = [specific_basis(acts, f"forget:{c}", retain, opts.forget_threshold, opts.max_rank)
                       for c in forget_prompts]
    else:
        per_concept = [group_basis(acts, f"forget:{c}", opts.forget_threshold, opts.max_rank, opts.center)
                       for c in forget_prompts]
    return union_of(per_concept) if len(per_concept) > 1 else per_concept[0]


def round_factors(layers, forget, retain, opts: PureOptions, factors: dict) -> dict:
    """One round's factors per weight name, on the weights as the ``factors`` gathered so far leave them
    (``W + sum up @ down``, float64)."""
    out = {}
    with torch.no_grad():
        for d, gb in forget.items():
            idx = gb.layer_indices
            V_R = retain[d].V
            which = ([("to_k", lambda l: l.key_weight)] if opts.edit_keys else []) + (
                [("to_v", lambda l: l.value_weight)] if opts.edit_values else [])
            for proj, name_of in which:
                Ws = []
                for i in idx:
                    w = getattr(layers[i].module, proj).weight.detach().to(torch.float64)
                    if name_of(layers[i]) in factors:
                        up, down = factors[name_of(layers[i])]
                        w = w + up.to(w.device, torch.float64) @ down.to(w.device, torch.float64)
                    Ws.append(w)
                W = torch.stack(Ws)
                if isinstance(gb, ContrastFactors):
                    up, down = -gb.A.to(W.device), gb.B.to(W.device) @ W
                else:
                    up, down = pure_factors(gb.V.to(W.device), V_R.to(W.device), W)
                for j, i in enumerate(idx):
                    r = int(gb.ranks[j])
                    if r:
                        out[name_of(layers[i])] = (up[j, :, :r].float().cpu().contiguous(),
                                                   down[j, :r].float().cpu().contiguous())
    return out


def concat_factors(a: dict, b: dict) -> dict:
    """Factors of the sum of two low-rank changes: ``[up_a, up_b] @ [down_a; down_b]`` per weight."""
    out = dict(a)
    for n, (u, d) in b.items():
        out[n] = (torch.cat([out[n][0], u], 1), torch.cat([out[n][1], d], 0)) if n in out else (u, d)
    return out


def weighted_residual(after: dict[int, float], before: dict[int, float], layers) -> float:
    """Width-weighted mean over layers of the forget-specific energy left (``after / before``)."""
    num = den = 0.0
    for i, e0 in before.items():
        if e0 > 0:
            num += layers[i].d_out * after.get(i, 0.0) / e0
            den += layers[i].d_out
    return num / den if den else 0.0


def make_edit(ctx: EraseContext) -> LowRankEdit:
    """Build the PURE edit from the context's forget anchors (per concept) and retain anchors."""
    opts, forget_prompts, retain_prompts = ctx.options, ctx.forget_prompts, ctx.retain_prompts
    groups = {f"forget:{c}": p for c, p in forget_prompts.items()}
    groups["retain"] = retain_prompts
    acts = ctx.collect(groups)

    with ctx.timed("estimate_s"):
        if not retain_prompts:
            warnings.warn("no retain concepts: PURE becomes plain projection E = I - P_F", stacklevel=2)
        retain = group_basis(acts, "retain", opts.retain_threshold, None, opts.center)
        forget = forget_basis(acts, forget_prompts, retain, opts)
        warn_degenerate("forget", forget, acts.layers)
        if retain_prompts and opts.basis == "variance":
            warn_overlap(forget, retain, acts.layers)

    layers = acts.layers
    with ctx.timed("edit_s"):
        factors = round_factors(layers, forget, retain, opts, {})
    residuals: list[float] = []
    n_rounds = 1
    if opts.rounds > 1:
        factors, residuals = closed_loop(ctx, acts, retain, factors)
        n_rounds = len(residuals)
    shapes = {n: tuple(getattr(l.module, p).weight.shape) for l in layers
              for p, n in (("to_k", l.key_weight), ("to_v", l.value_weight)) if n in factors}
    ranks = {l.name: int(factors[n][0].shape[1]) for l in layers for n in (l.value_weight, l.key_weight)
             if n in factors}
    stats = ctx.stats(
        rows={g: acts.rows(g) for g in acts.groups()},
        forget_rank=ranks,
        retain_rank={layers[i].name: int(r) for gb in retain.values()
                     for i, r in zip(gb.layer_indices, gb.ranks.tolist())},
        rounds=n_rounds,
        residual=residuals,
    )
    return LowRankEdit(
        method="pure", family=ctx.adapter.family,
        concepts={"forget": list(forget_prompts), "retain_prompts": list(retain_prompts)},
        options=ctx.options_meta(), factors=factors, shapes=shapes, stats=stats,
    )


def closed_loop(ctx: EraseContext, acts, retain, factors: dict) -> tuple[dict, list[float]]:
    """Rounds 2.. of the closed loop (see ``PureOptions``). Returns (the kept factors, the anchors' residual
    after each kept round). Timed as ``loop_collect_s`` / ``loop_estimate_s``."""
    opts, forget_prompts, adapter = ctx.options, ctx.forget_prompts, ctx.adapter
    layers = acts.layers
    measure = {c: specific_basis(acts, f"forget:{c}", retain, RESIDUAL_MEASURE_THRESHOLD) for c in forget_prompts}
    before = {c: specific_energy(acts, f"forget:{c}", measure[c], retain) for c in forget_prompts}
    groups = {f"forget:{c}": p for c, p in forget_prompts.items()}
    residuals: list[float] = []
    t_collect = t_est = 0.0
    candidate = kept = factors
    for k in range(1, opts.rounds + 1):
        t0 = time.perf_counter()
        probe = LowRankEdit(method="pure", family=adapter.family, concepts={}, options={}, factors=candidate,
                            shapes={n: (u.shape[0], d.shape[1]) for n, (u, d) in candidate.items()})
        probe.apply(adapter, check=False)
        try:
            acts_k = collect_activations(adapter, groups, opts.collect, progress=ctx.progress)
        finally:
            probe.revert(adapter)
        t_collect += time.perf_counter() - t0
        t0 = time.perf_counter()
        r = max(weighted_residual(specific_energy(acts_k, f"forget:{c}", measure[c], retain), before[c], layers)
                for c in forget_prompts)
        if residuals and r >= residuals[-1]:
            t_est += time.perf_counter() - t0
            break  # this round did not help: keep the previous factors and stop
        kept = candidate
        residuals.append(r)
        if r < opts.residual_tol or k == opts.rounds:
            t_est += time.perf_counter() - t0
            break
        candidate = concat_factors(kept, round_factors(layers, forget_basis(acts_k, forget_prompts, retain, opts,
                                                                            retain_acts=acts),
                                                       retain, opts, kept))
        t_est += time.perf_counter() - t0
    ctx.timings["loop_collect_s"] = t_collect
    ctx.timings["loop_estimate_s"] = t_est
    return kept, residuals


METHOD = Method("pure", PureOptions, make_edit,
                "PURE: projects the forget concepts' cross-attention activations off the K/V weights (closed form)")
