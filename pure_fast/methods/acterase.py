"""ActErase: training-free concept erasure by inference-time activation patching (papers/002).

The paper (abstract only; no code, no details) describes: prompt pairs locate where activations differ,
the target activations are extracted, and at inference the input activations are replaced during the
forward pass, with no weight change. This module implements that paradigm; every specific is our choice:

Prompt pairs. Each forget anchor prompt is paired with the same prompt where the concept is replaced by a
neutral ``anchor`` phrase (whitespace, dangling punctuation and a/an fixed afterwards):

- the concept is replaced case-insensitively where it appears literally (templates put it there);
- toy-world concepts appear through surface forms ("crimson" for red): every anchor/held-out surface form
  of the concept is replaced (longest first, whole words);
- default ``anchor``: "" (the category-free prompt) for every category except ``celebrity`` ("a person",
  the usual neutral for identities). For the toy world, "" gives e.g. "a star on a striped background",
  a caption the model was trained on (templates may omit a slot; the attribute is then drawn at random),
  so the neutral twin is "the same image, colour unconstrained";
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
canonical prompts, fresh seeds; ``python -m pure_fast.methods.acterase`` reproduces it):
replace, soft gate, t = 0.5, s = 1, forget threshold 0.9, max rank 4, no retain projection.
Sweep (10-18 images per colour, DDIM 10 steps): default red 1.0 → 0.0 with orange, yellow, purple at
1.0; mode='shift' leaves red at 0.89 (a uniform shift keeps the object's red where it is); t = 0.3 lets
orange drop to 0.89; t = 0.7 leaves red at 0.11; t = 0.1 without projection drops orange to 0.61; retain
projection 0.5 with t = 0.1 or 0.5 leaves red at 0.5-0.72 (gate on or off alike).
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from ..adapters.base import ModelAdapter
from ..collect.activations import CollectOptions, collect_activations
from ..edits.patch import ConceptPatch, PatchEdit, check_runtime
from ..errors import UsageError
from ..estimate.subspace import shape_groups
from ..ops.batched_svd import subspace_basis

CATEGORY_ANCHORS = {"celebrity": "a person"}


@dataclass
class ActEraseOptions:
    """anchor: neutral phrase replacing the concept (None = the category default, see the docstring).
    forget_threshold / retain_threshold: cumulative-energy thresholds in (0, 1] (retain None = no
    protection). max_rank: rank cap per concept and layer. strength (0, 1], gate 'soft'/'off',
    gate_threshold [0, 1), mode 'replace'/'shift': the runtime patch (``edits.patch``)."""

    anchor: str | None = None
    forget_threshold: float = 0.9
    retain_threshold: float | None = None
    max_rank: int | None = 4
    strength: float = 1.0
    gate: str = "soft"
    gate_threshold: float = 0.5
    mode: str = "replace"
    category: str | None = None
    collect: CollectOptions = field(default_factory=CollectOptions)

    @classmethod
    def for_category(cls, category: str, **kw) -> "ActEraseOptions":
        return cls(category=category, **kw)

    def resolved_anchor(self) -> str:
        if self.anchor is not None:
            return self.anchor
        return CATEGORY_ANCHORS.get((self.category or "").lower(), "")

    def validate(self) -> None:
        if self.anchor is not None and not isinstance(self.anchor, str):
            raise UsageError(f"anchor={self.anchor!r} must be a string (\"\" for the category-free prompt)")
        for name in ("forget_threshold", "retain_threshold"):
            v = getattr(self, name)
            if name == "retain_threshold" and v is None:
                continue
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1):
                raise UsageError(f"{name}={v!r} is out of range; use a value in (0, 1]")
        if self.max_rank is not None and not (isinstance(self.max_rank, int) and 1 <= self.max_rank <= 4096):
            raise UsageError(f"max_rank={self.max_rank!r} is out of range; use an integer in [1, 4096] (or None)")
        check_runtime(self.strength, self.gate, self.gate_threshold, self.mode, err=UsageError)
        self.collect.validate()


OPTIONS = ActEraseOptions


# ---- prompt pairs -----------------------------------------------------------------------------------
def _surface_forms(concept: str) -> list[str]:
    try:
        from ..toy import world

        return world.surface_forms(concept, "all")
    except (KeyError, ImportError):
        return []


def _tidy(text: str) -> str:
    from ..toy.world import _fix_articles

    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(?=[,;:.])", "", text)
    text = text.strip(" ,;:")
    return _fix_articles(text) if text else text


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


# ---- the method -----------------------------------------------------------------------------------
def _means(acts, prompts: list[str], layer_idx: list[int]) -> torch.Tensor:
    """[L_g, n, d] mean pooled activation of each prompt at each layer of one shape group (float64)."""
    return torch.stack([torch.stack([acts.stats[f"p:{p}"][i].mean() for p in prompts]) for i in layer_idx])


def make_edit(adapter: ModelAdapter, forget, retain, f_prompts: dict[str, list[str]], r_prompts: list[str],
              options: ActEraseOptions | None = None, progress: bool = True) -> PatchEdit:
    """Build the ActErase patch. ``f_prompts``: concept -> anchor prompts; ``r_prompts``: retain anchors."""
    opts = options or ActEraseOptions()
    opts.validate()
    anchor = opts.resolved_anchor()
    timings = {}
    t0 = time.perf_counter()
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
    r_pairs = prompt_pairs(list(r_prompts), list(retain or []), anchor) if opts.retain_threshold else []
    r_list = list(dict.fromkeys(r_prompts))
    unique = list(dict.fromkeys([x for pp in pairs.values() for pq in pp for x in pq]
                                + [x for pq in r_pairs for x in pq] + r_list))
    acts = collect_activations(adapter, {f"p:{p}": [p] for p in unique}, opts.collect, progress=progress)
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    timings["collect_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers = acts.layers
    patches: dict[str, list[ConceptPatch]] = {l.name: [] for l in layers}
    ranks: dict[str, dict[str, int]] = {c: {} for c in pairs}
    presence: dict[str, dict[str, float]] = {c: {} for c in pairs}  # mean retain presence per layer
    gated: dict[str, torch.Tensor] = {c: torch.zeros(len(r_list), dtype=torch.float64) for c in pairs}
    for d, idx in shape_groups(layers).items():
        R = _means(acts, r_list, idx) if r_list else None
        V_R = None
        if r_pairs:
            RP = _means(acts, [p for p, _ in r_pairs], idx)
            RQ = _means(acts, [q for _, q in r_pairs], idx)
            V_R, _, _ = subspace_basis(RP - RQ, opts.retain_threshold)
        for c, pp in pairs.items():
            P = _means(acts, [p for p, _ in pp], idx)  # [L, n, d]
            Q = _means(acts, [q for _, q in pp], idx)
            D = P - Q
            if V_R is not None and V_R.shape[-1]:
                D = D - (D @ V_R) @ V_R.transpose(1, 2)
            V, r, _ = subspace_basis(D, opts.forget_threshold, max_rank=opts.max_rank)
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
    patches = {n: e for n, e in patches.items() if any(x.rank for x in e)}
    shapes = {l.name: (l.d_out, l.d_in) for l in layers if l.name in patches}
    if not patches:
        warnings.warn("ActErase found no difference between the forget prompts and their neutral twins; "
                      "the patch is empty", stacklevel=2)
    timings["estimate_s"] = time.perf_counter() - t0

    collect_opts = asdict(opts.collect)
    collect_opts["seeds"] = list(collect_opts["seeds"])
    options_meta = {k: v for k, v in asdict(opts).items() if k != "collect"}
    options_meta["anchor"] = anchor
    options_meta["collect"] = collect_opts
    options_meta["size"] = opts.collect.size or adapter.default_collect_size
    stats = {"timings": timings, "pairs": {c: len(pp) for c, pp in pairs.items()}, "retain_pairs": len(r_pairs),
             "prompts_collected": len(unique), "rank": ranks,
             "example_pairs": {c: list(pp[0]) for c, pp in pairs.items()}}
    if r_list:
        stats["retain_presence"] = presence
        n_layers = max(len(patches), 1)
        stats["retain_gated_fraction"] = {c: round(float(g.mean()) / n_layers, 4) for c, g in gated.items()}
        for c, frac in stats["retain_gated_fraction"].items():
            if opts.gate == "soft" and frac > 0.25:
                warnings.warn(f"ActErase: on the collection trajectory the gate of {c!r} opens for retain prompts at "
                              f"{frac:.0%} of (prompt, layer) pairs; raise gate_threshold (now "
                              f"{opts.gate_threshold}) or set retain_threshold to protect them", stacklevel=2)
    return PatchEdit(method="acterase", family=adapter.family,
                     concepts={"forget": list(pairs), "retain_prompts": list(r_prompts)},
                     options=options_meta, patches=patches, shapes=shapes, stats=stats)


__all__ = ["ActEraseOptions", "OPTIONS", "make_edit", "neutral_prompt", "prompt_pairs"]


# ---- measurement on the toy world ---------------------------------------------------------------------
def toy_colour_rates(adapter, colours, *, every: int = 3, seeds=(0, 1), steps: int = 10) -> dict[str, float]:
    """Fraction of images whose detected colour is the asked one, per colour: the colour's canonical
    prompts (every ``every``-th of the 25 shape x background combinations), ``seeds`` each, DDIM ``steps``."""
    import numpy as np

    from ..toy import world
    from ..toy.detectors import detect_colour

    out = {}
    for colour in colours:
        prompts = [p for p, _ in world.canonical_prompts(colour)][::every]
        cond = adapter.encode(prompts).repeat_interleave(len(seeds))
        with torch.no_grad():
            lat = adapter.denoise(cond, list(seeds) * len(prompts), steps=steps)
        labels, _ = detect_colour(adapter.decode_array(lat))
        out[colour] = round(float(np.mean([lab == colour for lab in labels])), 4)
    return out


def main(argv=None) -> int:
    """``python -m pure_fast.methods.acterase [--colour red] [KEY=VALUE ...]``: erase one toy colour
    (retaining the other five), print detector rates before / after as JSON."""
    import argparse
    import json

    from .. import api
    from ..adapters.toy import load_toy
    from ..edits.edit import revert_all
    from ..toy import world

    p = argparse.ArgumentParser(prog="python -m pure_fast.methods.acterase", description=main.__doc__.split("\n")[0])
    p.add_argument("--colour", default="red")
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="ActErase options (JSON values)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {}
    for item in args.options:
        k, _, v = item.partition("=")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    adapter = load_toy()
    others = [c for c in world.CATEGORIES["colour"] if c != args.colour]
    seeds = tuple(range(100, 100 + args.seeds))  # not the collection seeds
    before = toy_colour_rates(adapter, world.CATEGORIES["colour"], every=args.every, seeds=seeds)
    t0 = time.perf_counter()
    edit = api.erase(adapter, [args.colour], others, method="acterase", category="colour", progress=False, **kw)
    erase_s = time.perf_counter() - t0
    edit.apply(adapter)
    try:
        after = toy_colour_rates(adapter, world.CATEGORIES["colour"], every=args.every, seeds=seeds)
    finally:
        revert_all(adapter)
    print(json.dumps({"erased": args.colour, "options": kw, "erase_s": round(erase_s, 1),
                      "images_per_colour": len(seeds) * len(range(0, 25, args.every)),
                      "before": before, "after": after}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
