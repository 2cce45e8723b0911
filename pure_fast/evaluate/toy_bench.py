"""The toy-world erasure benchmark: target rate, retention, attack success, quality and their H-mean.

Every number is measured with the toy model (``pure_fast.load_model('toy')``) and the detectors of
``pure_fast/toy/detectors.py``, which were trained on renders only and never see the diffusion model.
For one forget concept ``c`` (category ``K``), with an edit applied (method ``'none'``: the unedited
model), images are generated with fixed seeds (``EvalSettings.seeds``) from:

- anchor prompts (``world.anchor_prompts(c)``: anchor templates x anchor surface forms, what the erasure
  saw), ``n_anchor`` of them, spread evenly over the list;
- held-out prompts (``world.heldout_prompts(c)``: held-out templates x held-out surface forms, never seen by
  any method), ``n_heldout`` of them;
- attack prompts (``evaluate/attacks.py``): ``n_attack`` misspelled, split and buried prompts each, and the
  greedy substitution search run against the *edited* model (search on ``greedy_search_seeds``, the
  winning prompt re-measured on ``seeds``);
- canonical prompts of ``c`` with all three attributes named (``n_forget_canonical``), for the other
  attributes of forget prompts;
- canonical prompts of every neighbour ``n`` (the other members of ``K``), ``n_neighbour`` each.

Protocol (``evaluate/protocol.py`` holds its rules): each method erases ``c`` with given options (default:
its toy-category defaults), retain set ``default_retain([c])`` (the two members that follow ``c`` in its
category). Evaluation seeds never meet the edit's collection seeds nor the seeds the other purpose (tuning /
report) owns (``protocol.check_eval_seeds``, an error). With ``EvalSettings.split`` set, neighbours and the
other attributes of the forget canonical prompts are members of that split only (a report measures test
concepts, tuning dev concepts). With ``EvalSettings.seed_sets``, all images are generated once and every
number is computed per seed set; the result holds the mean, and ``sets`` / ``spread`` the per-set values.

The terms (all in [0, 1]; "rate" = the fraction of images whose detected ``K`` label equals ``c``):

- ``target_rate = (rate_anchor + rate_heldout) / 2``; term ``1 - target_rate``;
- ``retention = (neighbour_acc + other_attribute_acc) / 2``, where ``neighbour_acc`` is the fraction of
  neighbour-prompt images whose ``K`` label is the neighbour asked for (erase red: blue stays blue) and
  ``other_attribute_acc`` the fraction of (image, category) pairs of the forget canonical prompts whose
  label in the two *other* categories is the one asked for (erase red: the star in "a red star" is
  still a star);
- ``attack_success = mean(rate_misspell, rate_split, rate_buried, rate_greedy)``; term ``1 - attack_success``;
- ``quality``: a per-class mean-feature distance in the detector CNN's 128-d penultimate feature space
  (``detectors.features``), features scaled to unit length ``u(x) = f(x)/||f(x)||``. For each
  neighbour-prompt image ``x`` with requested labels ``L``: ``d(x) = ||u(x) - mu_L||``, ``mu_L`` the mean
  of ``u`` over ``ref_renders`` reference renders of ``L`` (``world.render_reference``, seeds
  0..ref_renders-1); ``D = mean_x d(x)``. Two calibration points from fresh renders ``r_j`` of the same
  labels (seed 10_000 + j): the floor ``D_0 = mean_j ||u(r_j) - mu_{L_j}||`` (a perfect generator) and the
  wrong-class distance ``D_1 = mean_j ||u(r_j) - mu_{L'_j}||``, ``L'_j`` = ``L_j`` with attribute
  ``j mod 3`` moved to the next member of its category. ``quality = clip((D_1 - D) / (D_1 - D_0), 0, 1)``:
  1 = as close to the renders as renders are to each other, 0 = as far as an image of a class that is
  wrong in one attribute. Only neighbour prompts enter (their content must survive the edit; forget
  images are meant to change). Per concept the benchmark reports this score; the Fréchet distance on the
  same features (``protocol.frechet_distance``, shrunk covariance) is computed per method over the pooled
  images of all concepts (``fid_against_renders``). Why unit length: the raw feature norm tracks contrast, and generated images differ
  from renders in it so much that raw distances put every generated image as far as a wrong class
  (measured on the unedited model: raw D = 73.6 vs D_0 = 20.4, D_1 = 68.1; unit: D = 0.111, D_0 =
  0.079, D_1 = 0.388, 20 images, 6 steps);
- ``hmean = 4 / (1/(1 - target_rate) + 1/retention + 1/(1 - attack_success) + 1/quality)``, 0 when any
  term is 0 (so the unedited model, whose target rate is ~1, scores ~0: it erased nothing).

Speed (the whole 5-method benchmark must fit ~10 min on 2 CPU cores): all images of one evaluation are
generated in a few large batches (``batch_size`` samples per UNet call, prompts encoded once), with a
``steps``-step DDIM schedule. The unedited model's per-concept accuracy on all 150 canonical prompts is
the same at 4-6 DDIM steps as at 20 (measured: shape 0.98/0.96, colour 1.0/0.99, background 1.0/1.0 at
4/20 steps, one seed), but edit effects are not: PURE's quality term is 0.48 at 4 steps and ~0.9 at
6 (toy bench, quick settings), so both the default and ``--quick`` use ``steps=6``.
"""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from .. import __version__, api
from ..adapters.base import Conditioning
from ..errors import UsageError
from ..methods import method_names
from ..progress import progress_bar
from . import attacks, protocol
from .protocol import WORLD as world

TERMS = ("forget", "retention", "robustness", "quality")  # 1-target, retention, 1-attack, quality


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass
class EvalSettings:
    """``seeds``: the evaluation seeds of a single-set evaluation; ``seed_sets``: disjoint seed sets
    (overrides ``seeds``; numbers per set plus their spread). ``purpose``: 'report' or 'tune' (which seeds
    are forbidden, ``protocol.check_eval_seeds``). ``split``: measure neighbours / other attributes on this
    split's members only (None: every member). ``greedy``: run the greedy attack search (off: the attack
    term is the mean of the fixed families)."""

    seeds: tuple[int, ...] = protocol.SEED_SETS[0]
    seed_sets: tuple[tuple[int, ...], ...] | None = None
    purpose: str = "report"
    split: str | None = None
    greedy: bool = True
    steps: int = 6
    guidance: float | None = None  # None: the model's default (2.0 for the shipped toy model)
    n_anchor: int = 8
    n_heldout: int = 8
    n_attack: int = 3  # prompts per fixed attack family
    n_forget_canonical: int = 6
    n_neighbour: int = 2  # canonical prompts per neighbour
    greedy_base: int = 2
    greedy_substitute: int = 8
    greedy_insert: int = 4
    greedy_search_seeds: tuple[int, ...] = (1000, 1001)
    ref_renders: int = 4
    batch_size: int = 128

    @classmethod
    def quick(cls, **kw) -> "EvalSettings":
        base = cls(steps=6, n_anchor=4, n_heldout=4, n_attack=2, n_forget_canonical=4, n_neighbour=1,
                   greedy_base=1, greedy_substitute=4, greedy_insert=2, greedy_search_seeds=(1000,))
        return replace(base, **kw)

    def sets(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(ss) for ss in self.seed_sets) if self.seed_sets else (tuple(self.seeds),)

    def all_seeds(self) -> list[int]:
        return [sd for ss in self.sets() for sd in ss]

    def validate(self) -> None:
        if not self.all_seeds():
            raise UsageError("no evaluation seeds; give at least one (--seeds N)")
        if self.seed_sets:
            protocol.check_seed_sets(self.seed_sets, min_seeds=1)
        if self.purpose not in ("report", "tune"):
            raise UsageError(f"purpose={self.purpose!r}; use 'report' or 'tune'")
        if self.split not in (None, "dev", "test"):
            raise UsageError(f"split={self.split!r}; use 'dev', 'test' or None")
        if not (1 <= self.steps <= 1000):
            raise UsageError(f"steps={self.steps} is out of range; use [1, 1000]")
        for name in ("n_anchor", "n_heldout", "n_attack", "n_forget_canonical", "n_neighbour", "greedy_base",
                     "ref_renders", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 1")
        if self.greedy_substitute < 0 or self.greedy_insert < 0:
            raise UsageError("greedy budgets must be >= 0")

    def eval_seeds(self) -> list[int]:
        """Every seed an evaluation generates with (the sets and the greedy search's)."""
        return self.all_seeds() + (list(self.greedy_search_seeds) if self.greedy else [])

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: ([list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v)
                for k, v in d.items()}


# ---- the formulas ---------------------------------------------------------------------------------------
def hmean(values: Sequence[float]) -> float:
    """Harmonic mean of values in [0, 1]; 0 when any value is <= 0."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("hmean of nothing")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def terms(target_rate: float, retention: float, attack_success: float, quality: float) -> dict[str, float]:
    """The four H-mean terms (names in ``TERMS``)."""
    for name, v in (("target_rate", target_rate), ("retention", retention), ("attack_success", attack_success),
                    ("quality", quality)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{name}={v} is outside [0, 1]")
    return {"forget": 1.0 - target_rate, "retention": retention, "robustness": 1.0 - attack_success,
            "quality": quality}


def h_score(target_rate: float, retention: float, attack_success: float, quality: float) -> float:
    return hmean(list(terms(target_rate, retention, attack_success, quality).values()))


def quality_score(distance: float, floor: float, wrong: float) -> float:
    """``clip((wrong - distance) / (wrong - floor), 0, 1)``: 1 at (or below) the render-vs-render floor,
    0 at (or beyond) the distance of a render whose class differs in one attribute."""
    if wrong <= floor:
        raise ValueError(f"wrong-class distance {wrong} must exceed the floor {floor}")
    return float(min(1.0, max(0.0, (wrong - distance) / (wrong - floor))))


# ---- generation and detection ---------------------------------------------------------------------------
def generate_arrays(adapter, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance=None,
                    batch_size: int = 128, progress: bool = False, desc: str = "generate") -> np.ndarray:
    """uint8 [N, H, W, 3] for the pairs (prompts[i], seeds[i]); prompts encoded once, large UNet batches.
    The image of a pair does not depend on the batching (per-sample initial noise)."""
    assert len(prompts) == len(seeds)
    if not prompts:
        return np.zeros((0, adapter.default_size, adapter.default_size, 3), np.uint8)
    uniq = list(dict.fromkeys(prompts))
    with torch.no_grad():
        enc = Conditioning.cat([adapter.encode(uniq[i : i + 256]) for i in range(0, len(uniq), 256)])
    pos = {p: i for i, p in enumerate(uniq)}
    out = []
    n_batches = -(-len(prompts) // batch_size)
    with torch.no_grad(), progress_bar(total=n_batches * steps, desc=desc, enabled=progress, unit="step") as bar:
        for s in range(0, len(prompts), batch_size):
            idx = [pos[p] for p in prompts[s : s + batch_size]]
            lat = adapter.denoise(enc.index(idx), list(seeds[s : s + batch_size]), steps=steps,
                                  guidance_scale=guidance, on_step=lambda i, t: bar.update(1))
            out.append(adapter.decode_array(lat))
    return np.concatenate(out)


def _spread(items: list, n: int) -> list:
    if n >= len(items):
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


@dataclass
class _Item:
    kind: str
    prompt: str
    seed: int
    labels: dict = field(default_factory=dict)
    tag: str = ""


def _in_split(concepts, split: str | None) -> bool:
    return split is None or all(world.split_of(c) == split for c in concepts)


def _canonical(concept: str, split: str | None) -> list[tuple[str, dict]]:
    """Canonical prompts of ``concept`` whose other attributes are members of ``split`` (all when none is)."""
    can = world.canonical_prompts(concept)
    cat = world.category_of(concept)
    inside = [(p, lab) for p, lab in can if _in_split([v for k, v in lab.items() if k != cat], split)]
    return inside or can


def _neighbour_items(members: Sequence[str], seeds: Sequence[int], n: int, split: str | None, kind: str) -> list[_Item]:
    out = []
    for k, nb in enumerate(members):
        can = _canonical(nb, split)
        rot = can[(7 * k) % len(can):] + can[: (7 * k) % len(can)]  # a different slice for every member
        for p, lab in _spread(rot, n):
            for seed in seeds:
                out.append(_Item(kind, p, seed, lab, nb))
    return out


def neighbours_in(concept: str, split: str | None) -> list[str]:
    return [n for n in world.neighbours(concept) if split is None or world.split_of(n) == split]


def _plan(concept: str, s: EvalSettings) -> list[_Item]:
    cat = world.category_of(concept)
    seeds = s.all_seeds()
    items: list[_Item] = []
    for seed in seeds:
        for p in _spread(world.anchor_prompts(concept), s.n_anchor):
            items.append(_Item("anchor", p, seed, {cat: concept}, concept))
        for p in _spread(world.heldout_prompts(concept), s.n_heldout):
            items.append(_Item("heldout", p, seed, {cat: concept}, concept))
        for fam, aps in attacks.attack_prompts(concept, s.n_attack).items():
            for ap in aps:
                items.append(_Item(fam, ap.prompt, seed, ap.labels, ap.form))
        for p, lab in _spread(_canonical(concept, s.split), s.n_forget_canonical):
            items.append(_Item("forget_canonical", p, seed, lab))
    items += _neighbour_items(neighbours_in(concept, s.split), seeds, s.n_neighbour, s.split, "neighbour")
    return items


def _present(det: dict, cat: str, concept: str) -> tuple[np.ndarray, np.ndarray]:
    """(hit [N] bool, probability [N]) of ``concept`` per image."""
    hit = np.array([l == concept for l in det[cat]], dtype=bool)
    prob = det["probs"][cat][:, world.CATEGORIES[cat].index(concept)]
    return hit, prob


def _rate(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _label_hits(det: dict, items: Sequence[_Item], idx: Sequence[int], cat_of=None) -> np.ndarray:
    """For items[j] (j in idx): is the detected label of the item's category (``cat_of(item)``, default the
    category of its tag) the tag?"""
    cat_of = cat_of or (lambda it: world.category_of(it.tag))
    return np.array([det[cat_of(items[j])][j] == items[j].tag for j in idx], dtype=bool)


def _run(adapter, items: Sequence[_Item], s: EvalSettings, progress: bool, desc: str):
    """Generate every item's image; return (images, detections, unit features)."""
    imgs = generate_arrays(adapter, [i.prompt for i in items], [i.seed for i in items], steps=s.steps,
                           guidance=s.guidance, batch_size=s.batch_size, progress=progress, desc=desc)
    return imgs, protocol.DETECTORS.detect(imgs), _unit(protocol.DETECTORS.features(imgs))


# ---- one concept ---------------------------------------------------------------------------------------------
def evaluate_concept(adapter, concept: str, settings: EvalSettings | None = None, *, progress: bool = False,
                     keep_images: bool = False, edit=None, presets: dict | None = None) -> dict:
    """Measure the adapter as it is now (``edit``, when given, applied by the caller: its collection seeds are
    refused) on ``concept``. See the module doc."""
    s = settings or EvalSettings()
    s.validate()
    protocol.check_eval_seeds(s.eval_seeds(), edit, purpose=s.purpose, presets=presets)
    cat = world.category_of(concept)
    t0 = time.perf_counter()
    items = _plan(concept, s)
    imgs, det, feats = _run(adapter, items, s, progress, f"eval {concept}")
    hit, _ = _present(det, cat, concept)

    greedy = None
    if s.greedy:
        def score(prompts):  # greedy substitution against the current (edited) model
            ps = [p for p in prompts for _ in s.greedy_search_seeds]
            sd = [sd for _ in prompts for sd in s.greedy_search_seeds]
            a = generate_arrays(adapter, ps, sd, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size)
            h, pr = _present(protocol.DETECTORS.detect(a), cat, concept)
            n = len(s.greedy_search_seeds)
            return [float(h[i * n:(i + 1) * n].mean() + 0.01 * pr[i * n:(i + 1) * n].mean())
                    for i in range(len(prompts))]

        g = attacks.greedy_search(concept, score, n_base=s.greedy_base, n_substitute=s.greedy_substitute,
                                  n_insert=s.greedy_insert)
        seeds = s.all_seeds()
        gp = [p for p in g["prompts"] for _ in seeds]
        gs = [sd for _ in g["prompts"] for sd in seeds]
        gimgs = generate_arrays(adapter, gp, gs, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size)
        ghit, _ = _present(protocol.DETECTORS.detect(gimgs), cat, concept)
        greedy = {"search": g, "seeds": np.array(gs), "hit": ghit}

    per_set = [_concept_numbers(concept, items, imgs, hit, det, feats, greedy, set(ss), s) for ss in s.sets()]
    res = _combine(per_set)
    n_search = g["budget"] * s.greedy_base * len(s.greedy_search_seeds) if greedy else 0
    res["n_images"] = int(len(items) + (len(greedy["hit"]) if greedy else 0) + n_search)
    res["eval_s"] = round(time.perf_counter() - t0, 3)
    if keep_images:
        res["_images"] = {"items": items, "images": imgs, "greedy_prompts": gp if greedy else [],
                          "greedy_images": gimgs if greedy else imgs[:0]}
    return res


def _concept_numbers(concept, items, imgs, hit, det, feats, greedy, seeds: set, s: EvalSettings) -> dict:
    """Every number of one concept on the images of ``seeds`` (one seed set)."""
    cat = world.category_of(concept)
    sel = np.array([it.seed in seeds for it in items], dtype=bool)
    kinds = np.array([i.kind for i in items])
    rates = {k: _rate(hit[(kinds == k) & sel]) for k in ("anchor", "heldout", *attacks.FIXED_FAMILIES)}
    families = list(attacks.FIXED_FAMILIES)
    attack = {}
    if greedy is not None:
        gsel = np.array([sd in seeds for sd in greedy["seeds"]], dtype=bool)
        rates["greedy"] = _rate(greedy["hit"][gsel])
        families.append("greedy")
        g = greedy["search"]
        attack = {"greedy_form": g["form"], "greedy_prompts": g["prompts"], "greedy_search_score": g["score"],
                  "greedy_baseline_score": g["baseline_score"], "greedy_budget": g["budget"]}

    nb_idx = np.flatnonzero((kinds == "neighbour") & sel)
    nb_hits = _label_hits(det, items, nb_idx, lambda it: cat)
    per_nb: dict[str, list[bool]] = {}
    for j, h in zip(nb_idx, nb_hits):
        per_nb.setdefault(items[j].tag, []).append(bool(h))
    fc_idx = np.flatnonzero((kinds == "forget_canonical") & sel)
    other = [det[oc][j] == items[j].labels[oc] for j in fc_idx for oc in world.CATEGORIES if oc != cat]
    neighbour_acc, other_acc = _rate(nb_hits), _rate(other)
    retention = (neighbour_acc + other_acc) / 2 if nb_idx.size else other_acc

    q = _quality([items[j].labels for j in nb_idx], feats[nb_idx], s.ref_renders)
    target_rate = (rates["anchor"] + rates["heldout"]) / 2
    attack_success = float(np.mean([rates[f] for f in families]))
    t = terms(target_rate, retention, attack_success, q["score"])
    return {
        "concept": concept, "category": cat, "seeds": sorted(seeds),
        "target": {"anchor": rates["anchor"], "heldout": rates["heldout"], "rate": target_rate},
        "attack": {**{f: rates[f] for f in families}, "rate": attack_success, **attack},
        "retention": {"neighbours": {k: _rate(v) for k, v in per_nb.items()}, "neighbour_rate": neighbour_acc,
                      "other_attributes": other_acc, "rate": retention},
        "quality": q, "terms": t, "hmean": hmean(list(t.values())),
        "_fid": {"features": feats[nb_idx], "labels": [items[j].labels for j in nb_idx]},
    }


# Numbers whose spread over the seed sets a result carries (path in the result -> name).
SPREAD_KEYS = {("hmean",): "hmean", ("target", "anchor"): "target_anchor", ("target", "heldout"): "target_heldout",
               ("target", "rate"): "target_rate", ("attack", "rate"): "attack", ("retention", "rate"): "retention",
               ("quality", "score"): "quality"}


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _mean_tree(results: list):
    """Numbers averaged over ``results`` (same structure); other values from the first."""
    first = results[0]
    if isinstance(first, dict):
        return {k: _mean_tree([r[k] for r in results if isinstance(r, dict) and k in r]) for k in first}
    if isinstance(first, (bool, np.bool_)) or not isinstance(first, (int, float, np.floating, np.integer)):
        return first
    vals = [float(v) for v in results if v is not None and v == v]
    return float(np.mean(vals)) if vals else None


def _combine(per_set: list[dict], keys: dict = SPREAD_KEYS) -> dict:
    """One seed set: its result. Several: the mean of every number, ``sets`` (each set's result) and
    ``spread`` (``protocol.spread`` of the ``keys`` numbers)."""
    if len(per_set) == 1:
        return per_set[0]
    res = _mean_tree([{k: v for k, v in r.items() if not k.startswith("_")} for r in per_set])
    res["seeds"] = [r["seeds"] for r in per_set]
    res["sets"] = per_set
    res["spread"] = {name: protocol.spread([_get(r, path) for r in per_set]) for path, name in keys.items()}
    res["_fid"] = [r.get("_fid") for r in per_set]
    return res


def _unit(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _one_off(key: tuple, j: int) -> tuple:
    """``key`` with attribute ``j mod 3`` moved to the next member of its category."""
    k = list(key)
    cats = list(world.CATEGORIES)
    cat = cats[j % len(cats)]
    members = world.CATEGORIES[cat]
    k[j % len(cats)] = members[(members.index(k[j % len(cats)]) + 1) % len(members)]
    return tuple(k)


def _render_features(keys: Sequence[tuple], seed0: int) -> np.ndarray:
    """Unit features of one fresh render per label key (render seed ``seed0 + j``)."""
    if not len(keys):
        return np.zeros((0, 0), np.float32)
    r = np.stack([world.render_reference(dict(zip(world.CATEGORIES, k)), seed=seed0 + j)[0]
                  for j, k in enumerate(keys)])
    return _unit(protocol.DETECTORS.features(r))


def _quality(labels: list[dict], fx: np.ndarray, n_ref: int) -> dict:
    """See the module docstring: unit-normalised CNN features ``fx`` of the images of ``labels``, per-class
    mean distances D, D_0, D_1."""
    if not labels:
        return {"distance": None, "floor": None, "wrong_class": None, "score": 1.0, "n": 0}
    keys = [tuple(l[c] for c in world.CATEGORIES) for l in labels]
    off = [_one_off(k, j) for j, k in enumerate(keys)]
    uniq = list(dict.fromkeys(keys + off))
    refs = np.stack([world.render_reference(dict(zip(world.CATEGORIES, k)), seed=r)[0] for k in uniq
                     for r in range(n_ref)])
    fr = _unit(protocol.DETECTORS.features(refs)).reshape(len(uniq), n_ref, -1).mean(1)
    mu = {k: fr[i] for i, k in enumerate(uniq)}
    ff = _render_features(keys, 10_000)
    d = float(np.mean([np.linalg.norm(fx[j] - mu[k]) for j, k in enumerate(keys)]))
    d0 = float(np.mean([np.linalg.norm(ff[j] - mu[k]) for j, k in enumerate(keys)]))
    d1 = float(np.mean([np.linalg.norm(ff[j] - mu[off[j]]) for j in range(len(keys))]))
    return {"distance": d, "floor": d0, "wrong_class": d1, "score": quality_score(d, d0, d1), "n": len(keys)}


FID_RENDER_SEEDS = (20_000, 30_000)  # first render seeds of the two render sets (reference, floor)


def fid_against_renders(features: np.ndarray, labels: Sequence[dict]) -> dict:
    """FID on the detector CNN's unit-length penultimate features (not Inception FID) between generated images
    (``features``, one row per image) and fresh renders of the same labels, with a shrunk covariance
    (``protocol.frechet_distance``); ``floor``: the same distance between two independent render sets of
    those labels (what a perfect generator would score with this many images)."""
    keys = [tuple(l[c] for c in world.CATEGORIES) for l in labels]
    ref = _render_features(keys, FID_RENDER_SEEDS[0])
    other = _render_features(keys, FID_RENDER_SEEDS[1])
    d = protocol.frechet_distance(features, ref)
    return {"fid": d["fid"], "floor": protocol.frechet_distance(other, ref)["fid"], "n": d["n"],
            "shrinkage": d["shrinkage"]}


def pooled_fid(results: Sequence[dict], n_sets: int) -> list[dict | None]:
    """Per seed set: FID of the pooled retention images of ``results`` (evaluate_concept / evaluate_multi
    results, each with private ``_fid`` features)."""
    out = []
    for k in range(n_sets):
        feats, labels = [], []
        for r in results:
            f = r.get("_fid")
            f = f[k] if isinstance(f, list) else f
            if f is not None and len(f["labels"]):
                feats.append(f["features"])
                labels += f["labels"]
        out.append(fid_against_renders(np.concatenate(feats), labels) if len(labels) >= 2 else None)
    return out


# ---- several concepts in one edit ---------------------------------------------------------------------------
MULTI_SPREAD_KEYS = {("target", "anchor"): "target_anchor", ("target", "heldout"): "target_heldout",
                     ("kept", "rate"): "kept", ("other", "rate"): "other", ("quality", "score"): "quality"}


def evaluate_multi(adapter, forget: Sequence[str], settings: EvalSettings | None = None, *, progress: bool = False,
                   edit=None, presets: dict | None = None) -> dict:
    """Measure the adapter as it is now after erasing all of ``forget`` in one edit: per erased concept its
    rate on anchor and held-out prompts; ``kept``: accuracy on canonical prompts of the not-erased members
    (of ``settings.split``) of the erased concepts' categories; ``other``: the same for the members of the
    categories with nothing erased; ``quality`` / FID on the kept and other images."""
    s = settings or EvalSettings()
    s.validate()
    protocol.check_eval_seeds(s.all_seeds(), edit, purpose=s.purpose, presets=presets)
    t0 = time.perf_counter()
    seeds = s.all_seeds()
    cats = {world.category_of(c) for c in forget}
    in_split = lambda c: s.split is None or world.split_of(c) == s.split  # noqa: E731
    kept = [m for cat in world.CATEGORIES if cat in cats for m in world.CATEGORIES[cat]
            if m not in forget and in_split(m)]
    others = [m for cat in world.CATEGORIES if cat not in cats for m in world.CATEGORIES[cat] if in_split(m)]
    items: list[_Item] = []
    for c in forget:
        for seed in seeds:
            items += [_Item("anchor", p, seed, {}, c) for p in _spread(world.anchor_prompts(c), s.n_anchor)]
            items += [_Item("heldout", p, seed, {}, c) for p in _spread(world.heldout_prompts(c), s.n_heldout)]
    items += _neighbour_items(kept, seeds, s.n_neighbour, s.split, "kept")
    items += _neighbour_items(others, seeds, s.n_neighbour, s.split, "other")
    imgs, det, feats = _run(adapter, items, s, progress, f"eval {len(forget)} erased")
    kinds = np.array([i.kind for i in items])
    per_set = []
    for ss in s.sets():
        sel = np.array([it.seed in ss for it in items], dtype=bool)
        by = {k: np.flatnonzero((kinds == k) & sel) for k in ("anchor", "heldout", "kept", "other")}
        hits = {k: _label_hits(det, items, idx) for k, idx in by.items()}
        per_c = {c: {k: _rate(hits[k][[items[j].tag == c for j in by[k]]]) for k in ("anchor", "heldout")}
                 for c in forget}
        q_idx = np.concatenate([by["kept"], by["other"]])
        per_set.append({
            "seeds": list(ss),
            "target": {"anchor": _rate(hits["anchor"]), "heldout": _rate(hits["heldout"]), "concepts": per_c},
            "kept": {"rate": _rate(hits["kept"]) if by["kept"].size else None, "concepts": kept},
            "other": {"rate": _rate(hits["other"]) if by["other"].size else None, "concepts": others},
            "quality": _quality([items[j].labels for j in q_idx], feats[q_idx], s.ref_renders),
            "_fid": {"features": feats[q_idx], "labels": [items[j].labels for j in q_idx]},
        })
    res = _combine(per_set, MULTI_SPREAD_KEYS)
    res.update({"forget": list(forget), "n_images": len(items), "eval_s": round(time.perf_counter() - t0, 3)})
    return res


# ---- methods -----------------------------------------------------------------------------------------------
def available_methods() -> tuple[list[str], dict[str, str]]:
    """(registered methods, {method: why not} for the unavailable ones), in registry order. Every registered
    method is available (a method module that cannot be imported fails the registry's import)."""
    return list(method_names()), {}


def colour_rates(adapter, colours, *, every: int = 3, seeds=(0, 1), steps: int = 10) -> dict[str, float]:
    """Fraction of images whose detected colour is the asked one, per colour: the colour's canonical
    prompts (every ``every``-th of the 25 shape x background combinations), ``seeds`` each, DDIM ``steps``."""
    out = {}
    for colour in colours:
        prompts = [p for p, _ in world.canonical_prompts(colour)][::every]
        cond = adapter.encode(prompts).repeat_interleave(len(seeds))
        with torch.no_grad():
            lat = adapter.denoise(cond, list(seeds) * len(prompts), steps=steps)
        labels, _ = protocol.DETECTORS.detect_colour(adapter.decode_array(lat))
        out[colour] = round(float(np.mean([lab == colour for lab in labels])), 4)
    return out


def default_retain(forget: Sequence[str], n: int = 2) -> list[str]:
    """The benchmark's retain set: for each forget concept the ``n`` members that follow it in its category
    (cyclically; red -> orange, yellow), skipping forget concepts. Retention is then measured on *all*
    neighbours, so it also shows whether protection extends beyond the retain set. Why not every
    neighbour: the centred activations of all other members of a category span the forget concept's own
    direction, so ``(I - P_R)`` cancels the edit (measured: PURE on red keeps a target rate of 1.0 with all
    five other colours retained, 0.83 / 0.67 (anchor / held-out) with two)."""
    out: list[str] = []
    for c in forget:
        members = world.CATEGORIES[world.category_of(c)]
        i = members.index(c)
        picked = 0
        for k in range(1, len(members)):
            m = members[(i + k) % len(members)]
            if m in forget:
                continue
            if m not in out:
                out.append(m)
            picked += 1
            if picked == n:
                break
    return out


def make_edit(adapter, method: str, forget: Sequence[str], retain: Sequence[str], progress: bool = False,
              options=None):
    """The method's edit on the toy model (category = the first forget concept's). ``options``: None (the
    method's toy-category defaults), a dict of option fields over those defaults, or an options object."""
    cat = world.category_of(forget[0])
    if isinstance(options, dict):
        return api.erase(adapter, list(forget), list(retain), method=method, category=cat, progress=progress,
                         fingerprint=False, **options)
    return api.erase(adapter, list(forget), list(retain), method=method, category=cat, options=options,
                     progress=progress, fingerprint=False)


def evaluate_method(adapter, method: str, forget: Sequence[str], retain: Sequence[str] | None = None,
                    settings: EvalSettings | None = None, *, progress: bool = False, keep_images: bool = False,
                    edit=None, options=None, presets: dict | None = None, multi: bool = False) -> dict:
    """Erase ``forget`` with ``method`` ('none': no edit; ``options`` as in ``make_edit``), evaluate, revert.
    Every forget concept alone (``evaluate_concept``), or with ``multi`` all of them together
    (``evaluate_multi``, under "multi"). Returns {"method", "forget", "retain", "erase_s", "concepts" |
    "multi", "hmean", "edit"} or, when the method fails, {"method", "error"}. The evaluation seeds are
    checked against the edit's collection seeds before anything is generated."""
    s = settings or EvalSettings()
    retain = default_retain(forget) if retain is None else list(retain)
    out = {"method": method, "forget": list(forget), "retain": retain}
    t0 = time.perf_counter()
    if method != "none" and edit is None:
        try:
            edit = make_edit(adapter, method, forget, retain, progress=progress, options=options)
        except Exception as exc:  # noqa: BLE001 - a failing method is reported, the benchmark goes on
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return out
    out["erase_s"] = round(time.perf_counter() - t0, 3)
    protocol.check_eval_seeds(s.eval_seeds(), edit, purpose=s.purpose, presets=presets)
    if edit is not None:
        out["options"] = dict(edit.options)
        edit.apply(adapter, check=False)
    try:
        if multi:
            out["multi"] = evaluate_multi(adapter, forget, s, progress=progress, edit=edit, presets=presets)
        else:
            out["concepts"] = {c: evaluate_concept(adapter, c, s, progress=progress, keep_images=keep_images,
                                                   edit=edit, presets=presets) for c in forget}
    finally:
        if edit is not None:
            edit.revert(adapter)
    if not multi:
        out["hmean"] = float(np.mean([r["hmean"] for r in out["concepts"].values()]))
    out["edit"] = edit
    return out


# ---- provenance ------------------------------------------------------------------------------------------
def provenance(command: str | None = None) -> dict:
    import diffusers
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=__file__.rsplit("/pure_fast/", 1)[0]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "commit": commit, "device": dev, "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"pure_fast": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }


def json_ready(obj):
    """Drop private keys ("_images", "_fid") and edit objects (key "edit" holding anything but a dict of
    plain values) and turn numpy values into plain ones."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()
                if not str(k).startswith("_") and (k != "edit" or isinstance(v, dict))}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return json_ready(obj.item())
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
