"""Activation-level measurements of an edit's effect, for any model (no image judge needed).

For each layer, with V_F / V_R the forget / retain bases (estimated here from the unedited model), the
concept's *forget-specific signal* of a pooled cross-attention output h is s(h) = V_F^T (I - P_R) h: the part
of h in the forget directions that the retain directions do not explain (exactly what PURE subtracts).
We report, over the recorded pooled outputs:
- forget_energy_kept: ||s(h_after)||^2 / ||s(h_before)||^2 for forget prompts (0 = fully erased);
- retain_change: ||h_after - h_before|| / ||h_before|| for retain prompts (0 = untouched).
Both are averaged over layers weighted by layer width.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..collect.activations import CollectOptions, collect_activations
from ..estimate.subspace import group_basis, union_of


def _rows(adapter, prompts, opts: CollectOptions) -> list[torch.Tensor]:
    big = replace(opts, max_rows=10**9)
    acts = collect_activations(adapter, {"x": prompts}, big, progress=False)
    return [s.matrix().double() for s in acts.stats["x"]]


def forget_only_basis(adapter, forget_prompts: dict[str, list[str]], retain_prompts: list[str],
                      opts: CollectOptions, forget_threshold: float, retain_threshold: float, center: bool = True):
    groups = {f"f:{c}": p for c, p in forget_prompts.items()}
    groups["r"] = retain_prompts
    acts = collect_activations(adapter, groups, replace(opts, max_rows=10**9), progress=False)
    fb = [group_basis(acts, f"f:{c}", forget_threshold, center=center) for c in forget_prompts]
    f = union_of(fb) if len(fb) > 1 else fb[0]
    r = group_basis(acts, "r", retain_threshold, center=center)
    out = [None] * len(acts.layers)
    for d, gb in f.items():
        VF, VR = gb.V.double(), r[d].V.double().to(gb.V.device)
        for j, li in enumerate(gb.layer_indices):
            out[li] = (VF[j], VR[j])
    return out


def _signal(h: torch.Tensor, VF: torch.Tensor, VR: torch.Tensor) -> torch.Tensor:
    return (h - (h @ VR) @ VR.T) @ VF


def edit_effect(adapter, edit, forget_prompts: dict[str, list[str]], retain_prompts: list[str],
                eval_forget: list[str] | None = None, eval_retain: list[str] | None = None,
                opts: CollectOptions | None = None, forget_threshold=0.95, retain_threshold=0.95) -> dict:
    """Measure forget_energy_kept and retain_change of ``edit`` (applied and reverted here)."""
    opts = opts or CollectOptions(seeds=(0,))
    Q = forget_only_basis(adapter, forget_prompts, retain_prompts, opts, forget_threshold, retain_threshold)
    ef = eval_forget or [p for ps in forget_prompts.values() for p in ps]
    er = eval_retain or retain_prompts
    before_f, before_r = _rows(adapter, ef, opts), _rows(adapter, er, opts)
    edit.apply(adapter, check=False)
    try:
        after_f, after_r = _rows(adapter, ef, opts), _rows(adapter, er, opts)
    finally:
        edit.revert(adapter)
    kept, change, wsum = 0.0, 0.0, 0.0
    per_layer = []
    for li, bases in enumerate(Q):
        if bases is None or bases[0].abs().sum() == 0:
            continue
        VF, VR = (b.to(before_f[li].device) for b in bases)
        e_before = _signal(before_f[li], VF, VR).pow(2).sum()
        e_after = _signal(after_f[li], VF, VR).pow(2).sum()
        k = float(e_after / e_before.clamp(min=1e-30))
        c = float((after_r[li] - before_r[li]).norm() / before_r[li].norm().clamp(min=1e-30)) if er else 0.0
        w = VF.shape[0]
        kept += w * k
        change += w * c
        wsum += w
        per_layer.append({"layer": adapter.cross_attention_layers()[li].name, "forget_energy_kept": k, "retain_change": c})
    return {"forget_energy_kept": kept / max(wsum, 1e-30), "retain_change": change / max(wsum, 1e-30),
            "layers": per_layer}
