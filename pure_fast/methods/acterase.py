"""ActErase: training-free concept erasure by inference-time activation patching ("ActErase: A Training-Free
Paradigm for Precise Concept Erasure via Activation Patching", arXiv:2601.00267).

The paper (abstract only; no code, no details) describes: prompt pairs locate where activations differ,
the target activations are extracted, and at inference the input activations are replaced during the
forward pass, with no weight change. This module implements that paradigm; every specific is our choice:

Prompt pairs. Each forget anchor prompt is paired with the same prompt where the concept is replaced by a
neutral ``anchor`` phrase (whitespace, dangling punctuation and a/an fixed afterwards):

- the concept is replaced case-insensitively where it appears literally (templates put it there);
- toy-world concepts appear through surface forms ("crimson" for red): every anchor/held-out surface form
  of the concept is replaced (longest first, whole words);
- default ``anchor``: "" (the category-free prompt) for every category except ``celebrity`` ("a person",
  the usual neutral for identities; ``prompts.CATEGORY_PRESETS``). For the toy world, "" gives e.g.
  "a star on a striped background", a caption the model was trained on (templates may omit a slot; the
  attribute is then drawn at random), so the neutral twin is "the same image, colour unconstrained";
- a prompt where the concept cannot be found is skipped with a warning; a concept with no pair is an error.

Where they differ (collection). PURE's collector (``collect.activations``, reused as is) records the
cross-attention output before ``to_out``, mean-pooled over space, on the first ``record_steps`` of a
short DDIM trajectory, for every seed (defaults: 10 steps, first 5 recorded, seeds 0 and 1, conditional
branch, the model's CFG). Every distinct prompt is its own group, so each prompt gets a mean pooled vector
m(p) per layer (averaged over seeds and recorded steps). Per pair, δ = m(prompt) − m(neutral twin).

Which components (estimate, per layer, batched over equal widths with ``ops.batched_svd``):

- retain directions (only when ``retain_threshold`` is set; default None): the retain prompts'
  differences to *their* neutral twins, top right-singular vectors up to ``retain_threshold`` of the
  energy, V_R; the forget differences are projected off them, δ ← δ (I − V_R V_Rᵀ). Off by default because
  on the toy world it costs most of the erasure (the colours share their directions: with 0.5, red's
  detector rate only fell 1.0 → 0.72, without it 1.0 → 0.0) while the gate alone already keeps the other
  colours intact. It is the tool for models where the gate cannot separate forget from retain prompts
  (e.g. the random-weight test pipelines: with it the retain outputs move 5-10x less);
- the concept basis V (uncentred: the differences are measured from zero): top right-singular vectors of
  the stacked δ of the concept up to ``forget_threshold`` of the energy, at most ``max_rank`` columns;
  each forget concept gets its own basis (a concept with few prompts is not drowned by another);
- stored with it: μ_a = mean coordinates (m V) of the neutral twins, μ_f = those of the forget prompts.

Replacement at inference (``edits.patch``, forward pre-hooks on ``attn2.to_out[0]``, see there for why
hooks and not processors): per sample, presence π = (c̄ − μ_a)·(μ_f − μ_a)/|μ_f − μ_a|² from the spatial mean
c̄ of the coordinates; gate g = clamp((π − t)/(1 − t), 0, 1) (``gate='soft'``, t = ``gate_threshold``) or
1 (``gate='off'``); then ``mode='replace'`` sets every position's component to the anchor's,
h ← h − s·g·(hV − μ_a)Vᵀ, or ``mode='shift'`` moves only the spatial mean, h ← h − s·g·(c̄ − μ_a)Vᵀ;
s = ``strength``. All layers, every step of the sampler, conditional and unconditional rows alike (the gate
leaves rows without the concept untouched — bit-identical).

Retain concepts, when given, are always collected (not their twins unless ``retain_threshold`` is set) to
report their presence π per layer (``stats['retain_presence']``) and the fraction of (retain prompt,
layer) pairs whose gate would open (``stats['retain_gated_fraction']``); above 25 % a warning suggests a
higher ``gate_threshold`` or ``retain_threshold``.

Defaults, picked on the toy world (erase red, retain the other five colours; detector rate on red
canonical prompts, fresh seeds; ``evaluate.toy_bench.colour_rates`` measures it, see
``tests/test_acterase.py``):
replace, soft gate, t = 0.5, s = 1, forget threshold 0.9, max rank 4, no retain projection.
Sweep (10-18 images per colour, DDIM 10 steps): default red 1.0 → 0.0 with orange, yellow, purple at
1.0; mode='shift' leaves red at 0.89 (a uniform shift keeps the object's red where it is); t = 0.3 lets
orange drop to 0.89; t = 0.7 leaves red at 0.11; t = 0.1 without projection drops orange to 0.61; retain
projection 0.5 with t = 0.1 or 0.5 leaves red at 0.5-0.72 (gate on or off alike).

Numerical health (the math is unchanged; degenerate inputs give a documented result and one aggregated
``warnings.warn`` line per case and concept, saying what happened and what to do; never NaN values):

- non-finite activations (a broken checkpoint or an fp16 overflow) or a non-finite patch tensor:
  :class:`~pure_fast.errors.NumericalError` (one line) before anything is estimated or returned, so a NaN
  patch is never returned, saved or applied (the model is never touched by ``make_edit``);
- rank 0 at a layer (the concept's differences are all zero there, or the retain projection removed them):
  the layer gets no patch for that concept (an empty entry; a layer empty for every concept is dropped).
  One warning per concept names how many layers; when no layer is left at all, the "patch is empty"
  warning follows;
- μ_f ≈ μ_a at a patched layer (|μ_f − μ_a|² ≤ ``GATE_TOL`` = 1e-6 × the mean |δV|², e.g. differences
  that cancel on average): the presence π is undefined or noise there, so the soft gate stays closed
  (π = 0 when |w|² = 0) and that layer does nothing with ``gate='soft'``. One warning per concept (soft
  gate only): use more consistent anchor prompts or ``gate='off'``;
- ``retain_threshold`` set while no retain prompt pair exists (no retain concepts, or none of their prompts
  mentions them): nothing is projected off (the default behaviour); a warning says so. When it is set and
  the projection removes (nearly) all of a concept's difference energy at a layer (kept share below
  ``RETAIN_KEEP_TOL`` = 1e-3, like PURE's ``warn_overlap``), that layer ends with rank 0 or a tiny residual
  basis: one warning per concept names the layers; lower ``retain_threshold`` or retain less similar concepts;
- duplicate forget prompts (the same prompt listed several times): each copy counts in the basis and in μ_f
  (they are not removed, so weights stay as given); one warning per concept. When all of a concept's
  (≥ 2) difference rows are one repeated row at a layer (centred energy ≤ ``IDENTICAL_SPREAD`` = 1e-8 of the
  total), the basis there is that one direction: one warning per concept (use more varied templates).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from ..collect.activations import CollectOptions
from ..edits.patch import GATES, MODES, ConceptPatch, PatchEdit
from ..errors import NumericalError, UsageError
from ..estimate.subspace import shape_groups
from ..ops.batched_svd import subspace_basis
from ..options import option
from ..toy import world
from .base import EraseContext, Method

GATE_TOL = 1e-6  # |mu_f - mu_a|^2 below this share of the mean |delta V|^2: the soft gate never opens
RETAIN_KEEP_TOL = 1e-3  # share of a concept's difference energy left after the retain projection
IDENTICAL_SPREAD = 1e-8  # centred / uncentred energy of the difference rows: one repeated row
THRESHOLD = (0, 1, "(]")


@dataclass
class ActEraseOptions:
    """The options of ActErase (see the module docstring for what each does and how the defaults were picked)."""

    anchor: str | None = option(None, help="neutral phrase replacing the concept (None: the category's, \"\" "
                                "for most; \"a person\" for celebrity)")
    forget_threshold: float = option(0.9, range=THRESHOLD, help="ActErase cumulative-energy threshold (0,1]")
    retain_threshold: float | None = option(None, range=THRESHOLD,
                                            help="ActErase cumulative-energy threshold (0,1] (None: no protection)")
    max_rank: int | None = option(4, range=(1, 4096, "[]"), use="an integer in [1, 4096] (or None)",
                                  help="rank cap per concept and layer")
    strength: float = option(1.0, range=(0, 1, "(]"), help="patch strength (0,1]")
    gate: str = option("soft", choices=GATES, help="the presence gate")
    gate_threshold: float = option(0.5, range=(0, 1, "[)"), help="presence where the soft gate starts to open [0,1)")
    mode: str = option("replace", choices=MODES, help="replace every position's component, or shift the mean")
    collect: CollectOptions = field(default_factory=CollectOptions)

    def resolved_anchor(self) -> str:
        return "" if self.anchor is None else self.anchor


# ---- prompt pairs -----------------------------------------------------------------------------------
def _surface_forms(concept: str) -> list[str]:
    """The toy world's surface forms of ``concept`` ("crimson" for red); none for any other concept."""
    return world.surface_forms(concept, "all") if concept in world.SURFACE_FORMS else []


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(?=[,;:.])", "", text)
    text = text.strip(" ,;:")
    return world._fix_articles(text) if text else text


def neutral_prompt(prompt: str, concept: str, anchor: str = "") -> str | None:
    """``prompt`` with ``concept`` replaced by ``anchor``; None when the concept does not occur in it."""
    forms = [concept] + [f for f in _surface_forms(concept) if f.lower() != concept.lower()]
    for form in sorted(forms, key=len, reverse=True):
        pat = re.compile(r"(?<![\w-])" + re.escape(form) + r"(?![\w-])", re.IGNORECASE)
        if pat.search(prompt):
            return _tidy(pat.sub(lambda _: anchor, prompt))
    return None


def prompt_pairs(prompts: list[str], concepts: list[str], anchor: str) -> list[tuple[str, str]]:
    """(prompt, neutral twin) for every prompt that mentions one of ``concepts`` (the first found)."""
    out = []
    for p in prompts:
        for c in concepts:
            q = neutral_prompt(p, c, anchor)
            if q is not None and q != p:
                out.append((p, q))
                break
    return out


# ---- numerical health (see "Numerical health" in the module docstring) ------------------------------
def check_finite(what: str, **tensors: torch.Tensor) -> None:
    """Raise NumericalError (one line) when any of ``tensors`` holds NaN / Inf."""
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NumericalError(f"ActErase: {bad} non-finite value(s) in {what} ({name}); the model's weights or "
                                 "activations hold NaN/Inf (check the checkpoint or use float32); nothing was changed")


def check_patches_finite(patches: dict[str, list[ConceptPatch]]) -> None:
    """Every basis / anchor / forget tensor must be finite before the edit is returned."""
    for layer, entries in patches.items():
        for k, e in enumerate(entries):
            check_finite(f"the patch of {layer}", **{f"c{k}.basis": e.basis, f"c{k}.anchor": e.anchor,
                                                       f"c{k}.forget": e.forget})


def layer_health(D: torch.Tensor, V: torch.Tensor, ranks: torch.Tensor, D_raw: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """Per-layer flags ([L] bool) for one concept and shape group. D: [L, n, d] differences used for the basis
    (after any retain projection), D_raw: before it (None = no projection), V: [L, d, k] (zero columns past
    each rank), ranks [L]. ``w = mean(D V) = μ_f − μ_a`` exactly."""
    D, V = D.to(torch.float64), V.to(torch.float64)
    n = D.shape[1]
    C = D @ V  # [L, n, k]
    w = C.mean(1)
    ww = (w * w).sum(-1)
    scale = (C * C).sum(-1).mean(1) if n else ww
    out = {"rank0": ranks == 0, "gate_closed": (ranks > 0) & (ww <= GATE_TOL * scale)}
    total = (D * D).sum((1, 2))
    mean = D.mean(1)
    spread = total - n * (mean * mean).sum(-1)
    no = torch.zeros_like(ranks, dtype=torch.bool)
    out["identical"] = (total > 0) & (spread <= IDENTICAL_SPREAD * total) if n >= 2 else no
    if D_raw is None:
        out["retain_removed"] = no
    else:
        raw = (D_raw.to(torch.float64) ** 2).sum((1, 2))
        out["retain_removed"] = (raw > 0) & (total <= RETAIN_KEEP_TOL * raw)
    return out


def warn_health(concept: str, flags: dict[str, list[str]], n_layers: int, gate: str = "soft") -> None:
    """One warning per non-empty flag of ``concept``; ``flags`` maps a flag of ``layer_health`` to layer names."""
    c = concept

    def where(key):
        names = flags.get(key, [])
        return f"{len(names)} of {n_layers} layer(s) (e.g. {names[0]})" if names else ""

    if flags.get("rank0"):
        warnings.warn(f"ActErase: {c!r} has rank 0 at {where('rank0')}: its prompts do not differ from their neutral "
                      "twins there (after any retain projection), so those layers are not patched for it; "
                      "use more anchor prompts or a higher forget_threshold", stacklevel=3)
    if flags.get("gate_closed") and gate == "soft":
        warnings.warn(f"ActErase: for {c!r} the forget and neutral means coincide (mu_f ~ mu_a) at "
                      f"{where('gate_closed')}: the soft gate never opens there, so those layers do nothing; use more consistent anchor "
                      "prompts or gate='off'", stacklevel=3)
    if flags.get("retain_removed"):
        warnings.warn(f"ActErase: the retain projection removes nearly all of {c!r}'s difference (less than "
                      f"{RETAIN_KEEP_TOL:.1%} left) at {where('retain_removed')}: the patch barely acts there; lower "
                      "retain_threshold or retain concepts less similar to the forgotten one", stacklevel=3)
    if flags.get("identical"):
        warnings.warn(f"ActErase: the difference rows of {c!r} are one repeated row at {where('identical')}: its "
                      "anchor prompts are identical there, so the basis is that one direction; use more varied "
                      "anchor prompts or templates", stacklevel=3)


# ---- the method -----------------------------------------------------------------------------------
def _means(acts, prompts: list[str], layer_idx: list[int]) -> torch.Tensor:
    """[L_g, n, d] mean pooled activation of each prompt at each layer of one shape group (float64)."""
    return torch.stack([torch.stack([acts.stats[f"p:{p}"][i].mean() for p in prompts]) for i in layer_idx])


def make_edit(ctx: EraseContext) -> PatchEdit:
    """Build the ActErase patch from the context's forget anchors (per concept) and retain anchors."""
    opts, f_prompts, r_prompts, retain = ctx.options, ctx.forget_prompts, ctx.retain_prompts, ctx.retain
    anchor = opts.resolved_anchor()
    pairs = {}
    for c, prompts in f_prompts.items():
        pp = prompt_pairs(list(prompts), [c], anchor)
        if len(pp) < len(prompts):
            warnings.warn(f"ActErase: {len(prompts) - len(pp)} anchor prompt(s) of {c!r} do not mention it; "
                          "they are skipped", stacklevel=2)
        if not pp:
            raise UsageError(f"no anchor prompt of {c!r} mentions the concept, so no prompt pair can be built; "
                             "use templates with a '{}' slot")
        pairs[c] = pp
        dup = len(pp) - len({p for p, _ in pp})
        if dup:
            warnings.warn(f"ActErase: {dup} anchor prompt(s) of {c!r} repeat another one; each copy counts in the "
                          "basis and the forget mean; list distinct prompts", stacklevel=2)
    r_pairs = prompt_pairs(list(r_prompts), list(retain or []), anchor) if opts.retain_threshold else []
    if opts.retain_threshold and not r_pairs:
        warnings.warn(f"ActErase: retain_threshold={opts.retain_threshold} is set but no retain prompt pair exists "
                      "(no retain concepts, or none of their prompts mentions them), so nothing is projected off; "
                      "list retain concepts or leave retain_threshold unset", stacklevel=2)
    r_list = list(dict.fromkeys(r_prompts))
    unique = list(dict.fromkeys([x for pp in pairs.values() for pq in pp for x in pq]
                                + [x for pq in r_pairs for x in pq] + r_list))
    acts = ctx.collect({f"p:{p}": [p] for p in unique})
    with ctx.timed("estimate_s"):
        patches, shapes, stats = _estimate(ctx, acts, pairs, r_pairs, r_list, len(unique))
    return PatchEdit(method="acterase", family=ctx.adapter.family,
                     concepts={"forget": list(pairs), "retain_prompts": list(r_prompts)},
                     options=ctx.options_meta(anchor=anchor), patches=patches, shapes=shapes, stats=stats)


def _estimate(ctx: EraseContext, acts, pairs, r_pairs, r_list, n_collected: int):
    """(patches, shapes, stats) from the collected activations (see the module docstring)."""
    opts = ctx.options
    layers = acts.layers
    patches: dict[str, list[ConceptPatch]] = {l.name: [] for l in layers}
    ranks: dict[str, dict[str, int]] = {c: {} for c in pairs}
    presence: dict[str, dict[str, float]] = {c: {} for c in pairs}  # mean retain presence per layer
    gated: dict[str, torch.Tensor] = {c: torch.zeros(len(r_list), dtype=torch.float64) for c in pairs}
    health: dict[str, dict[str, list[str]]] = {c: {} for c in pairs}
    for idx in shape_groups(layers).values():
        R = _means(acts, r_list, idx) if r_list else None
        check_finite("the retain prompts' activations", R=R)
        V_R = None
        if r_pairs:
            RP = _means(acts, [p for p, _ in r_pairs], idx)
            RQ = _means(acts, [q for _, q in r_pairs], idx)
            check_finite("the retain prompt pairs' activations", retain=RP, neutral=RQ)
            V_R, _, _ = subspace_basis(RP - RQ, opts.retain_threshold)
        for c, pp in pairs.items():
            P = _means(acts, [p for p, _ in pp], idx)  # [L, n, d]
            Q = _means(acts, [q for _, q in pp], idx)
            check_finite(f"the activations of {c!r}'s prompt pairs", forget=P, neutral=Q)
            D = D_raw = P - Q
            if V_R is not None and V_R.shape[-1]:
                D = D - (D @ V_R) @ V_R.transpose(1, 2)
            else:
                D_raw = None
            V, r, _ = subspace_basis(D, opts.forget_threshold, max_rank=opts.max_rank)
            for key, flag in layer_health(D, V, r, D_raw).items():
                health[c].setdefault(key, []).extend(layers[i].name for j, i in enumerate(idx) if bool(flag[j]))
            mu_a = (Q @ V).mean(1)  # [L, k]
            mu_f = (P @ V).mean(1)
            for j, i in enumerate(idx):
                k = int(r[j])
                name = layers[i].name
                patches[name].append(ConceptPatch(V[j, :, :k].float().cpu().contiguous(),
                                                  mu_a[j, :k].float().cpu().contiguous(),
                                                  mu_f[j, :k].float().cpu().contiguous()))
                ranks[c][name] = k
                w = mu_f[j, :k] - mu_a[j, :k]
                if R is not None and k and float(w @ w) > 0:
                    pi = ((R[j] @ V[j, :, :k] - mu_a[j, :k]) @ w) / (w @ w)  # [n_retain]
                    presence[c][name] = round(float(pi.mean()), 4)
                    gated[c] += (pi > opts.gate_threshold).double()
    for c in pairs:
        warn_health(c, health[c], len(layers), opts.gate)
    patches = {n: e for n, e in patches.items() if any(x.rank for x in e)}
    check_patches_finite(patches)
    shapes = {l.name: (l.d_out, l.d_in) for l in layers if l.name in patches}
    if not patches:
        warnings.warn("ActErase found no difference between the forget prompts and their neutral twins; "
                      "the patch is empty", stacklevel=2)
    stats = ctx.stats(pairs={c: len(pp) for c, pp in pairs.items()}, retain_pairs=len(r_pairs),
                      prompts_collected=n_collected, rank=ranks,
                      example_pairs={c: list(pp[0]) for c, pp in pairs.items()})
    if r_list:
        stats["retain_presence"] = presence
        n_layers = max(len(patches), 1)
        stats["retain_gated_fraction"] = {c: round(float(g.mean()) / n_layers, 4) for c, g in gated.items()}
        for c, frac in stats["retain_gated_fraction"].items():
            if opts.gate == "soft" and frac > 0.25:
                warnings.warn(f"ActErase: on the collection trajectory the gate of {c!r} opens for retain prompts at "
                              f"{frac:.0%} of (prompt, layer) pairs; raise gate_threshold (now "
                              f"{opts.gate_threshold}) or set retain_threshold to protect them", stacklevel=2)
    return patches, shapes, stats


METHOD = Method("acterase", ActEraseOptions, make_edit,
                 "ActErase: patches the concept's activation components at inference (no weight change)")

__all__ = ["METHOD", "ActEraseOptions", "check_finite", "check_patches_finite", "layer_health", "make_edit",
           "neutral_prompt", "prompt_pairs", "warn_health"]
