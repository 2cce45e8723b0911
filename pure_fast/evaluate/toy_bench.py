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

Protocol: each method erases ``c`` with its own defaults (the toy categories' presets: ``toy/presets.py``), retain set
``default_retain([c])`` (the two members that follow ``c`` in its category); retention is measured on all
neighbours.

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
  images are meant to change). Why not a Fréchet distance: tens of images per run cannot estimate a
  128-d covariance. Why unit length: the raw feature norm tracks contrast, and generated images differ
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
from ..toy import world
from ..toy.detectors import detect, detect_colour, features
from . import attacks

TERMS = ("forget", "retention", "robustness", "quality")  # 1-target, retention, 1-attack, quality
BENCH_CONCEPTS = {
    "shape": ["square", "triangle", "star"],
    "colour": ["red", "green", "blue"],
    "background": ["stripes", "checker", "dots"],
}


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass
class EvalSettings:
    seeds: tuple[int, ...] = (0, 1)
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
        base = cls(seeds=(0,), steps=6, n_anchor=4, n_heldout=4, n_attack=2, n_forget_canonical=4, n_neighbour=1,
                   greedy_base=1, greedy_substitute=4, greedy_insert=2, greedy_search_seeds=(1000,))
        return replace(base, **kw)

    def validate(self) -> None:
        if not self.seeds:
            raise UsageError("no evaluation seeds; give at least one (--seeds N)")
        if not (1 <= self.steps <= 1000):
            raise UsageError(f"steps={self.steps} is out of range; use [1, 1000]")
        for name in ("n_anchor", "n_heldout", "n_attack", "n_forget_canonical", "n_neighbour", "greedy_base",
                     "ref_renders", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 1")
        if self.greedy_substitute < 0 or self.greedy_insert < 0:
            raise UsageError("greedy budgets must be >= 0")

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


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


def _plan(concept: str, s: EvalSettings) -> list[_Item]:
    cat = world.category_of(concept)
    items: list[_Item] = []
    for seed in s.seeds:
        for p in _spread(world.anchor_prompts(concept), s.n_anchor):
            items.append(_Item("anchor", p, seed, {cat: concept}))
        for p in _spread(world.heldout_prompts(concept), s.n_heldout):
            items.append(_Item("heldout", p, seed, {cat: concept}))
        for fam, aps in attacks.attack_prompts(concept, s.n_attack).items():
            for ap in aps:
                items.append(_Item(fam, ap.prompt, seed, ap.labels, ap.form))
        for p, lab in _spread(world.canonical_prompts(concept), s.n_forget_canonical):
            items.append(_Item("forget_canonical", p, seed, lab))
        for k, nb in enumerate(world.neighbours(concept)):
            can = world.canonical_prompts(nb)
            # a different slice of the other attributes for every neighbour
            rot = can[(7 * k) % len(can):] + can[: (7 * k) % len(can)]
            for p, lab in _spread(rot, s.n_neighbour):
                items.append(_Item("neighbour", p, seed, lab, nb))
    return items


def _present(det: dict, cat: str, concept: str) -> tuple[np.ndarray, np.ndarray]:
    """(hit [N] bool, probability [N]) of ``concept`` per image."""
    hit = np.array([l == concept for l in det[cat]], dtype=bool)
    prob = det["probs"][cat][:, world.CATEGORIES[cat].index(concept)]
    return hit, prob


def _rate(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


# ---- one concept ---------------------------------------------------------------------------------------------
def evaluate_concept(adapter, concept: str, settings: EvalSettings | None = None, *, progress: bool = False,
                     keep_images: bool = False) -> dict:
    """Measure the adapter as it is now (apply an edit before calling) on ``concept``. See the module doc."""
    s = settings or EvalSettings()
    s.validate()
    cat = world.category_of(concept)
    t0 = time.perf_counter()
    items = _plan(concept, s)
    imgs = generate_arrays(adapter, [i.prompt for i in items], [i.seed for i in items], steps=s.steps,
                           guidance=s.guidance, batch_size=s.batch_size, progress=progress, desc=f"eval {concept}")
    det = detect(imgs)
    hit, _ = _present(det, cat, concept)
    kinds = np.array([i.kind for i in items])
    rates = {k: _rate(hit[kinds == k]) for k in ("anchor", "heldout", *attacks.FIXED_FAMILIES)}

    # greedy substitution against the current (edited) model
    def score(prompts):
        ps = [p for p in prompts for _ in s.greedy_search_seeds]
        sd = [sd for _ in prompts for sd in s.greedy_search_seeds]
        a = generate_arrays(adapter, ps, sd, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size)
        h, pr = _present(detect(a), cat, concept)
        n = len(s.greedy_search_seeds)
        return [float(h[i * n:(i + 1) * n].mean() + 0.01 * pr[i * n:(i + 1) * n].mean()) for i in range(len(prompts))]

    g = attacks.greedy_search(concept, score, n_base=s.greedy_base, n_substitute=s.greedy_substitute,
                              n_insert=s.greedy_insert)
    gp = [p for p in g["prompts"] for _ in s.seeds]
    gs = [sd for _ in g["prompts"] for sd in s.seeds]
    gimgs = generate_arrays(adapter, gp, gs, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size)
    ghit, _ = _present(detect(gimgs), cat, concept)
    rates["greedy"] = _rate(ghit)

    # retention
    nb_mask = kinds == "neighbour"
    nb_items = [i for i in items if i.kind == "neighbour"]
    nb_hits = np.array([det[cat][j] == it.tag for j, it in zip(np.flatnonzero(nb_mask), nb_items)])
    per_nb = {}
    for it, h in zip(nb_items, nb_hits):
        per_nb.setdefault(it.tag, []).append(bool(h))
    fc_idx = np.flatnonzero(kinds == "forget_canonical")
    other = [det[oc][j] == items[j].labels[oc] for j in fc_idx for oc in world.CATEGORIES if oc != cat]
    neighbour_acc, other_acc = _rate(nb_hits), _rate(other)
    retention = (neighbour_acc + other_acc) / 2

    # quality on neighbour images
    q = _quality([it.labels for it in nb_items], imgs[nb_mask], s.ref_renders, features)

    target_rate = (rates["anchor"] + rates["heldout"]) / 2
    attack_success = float(np.mean([rates[f] for f in attacks.FAMILIES]))
    t = terms(target_rate, retention, attack_success, q["score"])
    res = {
        "concept": concept, "category": cat,
        "target": {"anchor": rates["anchor"], "heldout": rates["heldout"], "rate": target_rate},
        "attack": {**{f: rates[f] for f in attacks.FAMILIES}, "rate": attack_success, "greedy_form": g["form"],
                   "greedy_prompts": g["prompts"], "greedy_search_score": g["score"],
                   "greedy_baseline_score": g["baseline_score"], "greedy_budget": g["budget"]},
        "retention": {"neighbours": {k: _rate(v) for k, v in per_nb.items()}, "neighbour_rate": neighbour_acc,
                      "other_attributes": other_acc, "rate": retention},
        "quality": q,
        "terms": t,
        "hmean": hmean(list(t.values())),
        "n_images": int(len(items) + len(gp) + g["budget"] * s.greedy_base * len(s.greedy_search_seeds)),
        "eval_s": round(time.perf_counter() - t0, 3),
    }
    if keep_images:
        res["_images"] = {"items": items, "images": imgs, "greedy_prompts": gp, "greedy_images": gimgs}
    return res


def _unit(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _one_off(key: tuple, j: int) -> tuple:
    """``key`` with attribute ``j mod 3`` moved to the next member of its category."""
    k = list(key)
    cat = list(world.CATEGORIES)[j % 3]
    members = world.CATEGORIES[cat]
    k[j % 3] = members[(members.index(k[j % 3]) + 1) % len(members)]
    return tuple(k)


def _quality(labels: list[dict], imgs: np.ndarray, n_ref: int, features) -> dict:
    """See the module docstring: unit-normalised CNN features, per-class mean distances D, D_0, D_1."""
    keys = [tuple(l[c] for c in world.CATEGORIES) for l in labels]
    off = [_one_off(k, j) for j, k in enumerate(keys)]
    uniq = list(dict.fromkeys(keys + off))
    refs = np.stack([world.render_reference(dict(zip(world.CATEGORIES, k)), seed=r)[0] for k in uniq
                     for r in range(n_ref)])
    fr = _unit(features(refs)).reshape(len(uniq), n_ref, -1).mean(1)
    mu = {k: fr[i] for i, k in enumerate(uniq)}
    fx = _unit(features(imgs))
    fresh = np.stack([world.render_reference(dict(zip(world.CATEGORIES, k)), seed=10_000 + j)[0]
                      for j, k in enumerate(keys)])
    ff = _unit(features(fresh))
    d = float(np.mean([np.linalg.norm(fx[j] - mu[k]) for j, k in enumerate(keys)]))
    d0 = float(np.mean([np.linalg.norm(ff[j] - mu[k]) for j, k in enumerate(keys)]))
    d1 = float(np.mean([np.linalg.norm(ff[j] - mu[off[j]]) for j in range(len(keys))]))
    return {"distance": d, "floor": d0, "wrong_class": d1, "score": quality_score(d, d0, d1), "n": len(keys)}


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
        labels, _ = detect_colour(adapter.decode_array(lat))
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


def make_edit(adapter, method: str, forget: Sequence[str], retain: Sequence[str], progress: bool = False):
    """The method's edit on the toy model with its defaults (category = the first forget concept's)."""
    return api.erase(adapter, list(forget), list(retain), method=method, category=world.category_of(forget[0]),
                     progress=progress, fingerprint=False)


def evaluate_method(adapter, method: str, forget: Sequence[str], retain: Sequence[str] | None = None,
                    settings: EvalSettings | None = None, *, progress: bool = False, keep_images: bool = False,
                    edit=None) -> dict:
    """Erase ``forget`` with ``method`` ('none': no edit), evaluate every forget concept, revert.
    Returns {"method", "forget", "retain", "erase_s", "concepts": {c: result}, "hmean"} or, when the method
    fails, {"method", "error"}."""
    retain = default_retain(forget) if retain is None else list(retain)
    out = {"method": method, "forget": list(forget), "retain": retain}
    t0 = time.perf_counter()
    if method != "none" and edit is None:
        try:
            edit = make_edit(adapter, method, forget, retain, progress=progress)
        except Exception as exc:  # noqa: BLE001 - a failing method is reported, the benchmark goes on
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return out
    out["erase_s"] = round(time.perf_counter() - t0, 3)
    if edit is not None:
        edit.apply(adapter, check=False)
    try:
        out["concepts"] = {c: evaluate_concept(adapter, c, settings, progress=progress, keep_images=keep_images)
                           for c in forget}
    finally:
        if edit is not None:
            edit.revert(adapter)
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
    """Drop private keys ("_images", edits) and turn numpy scalars into floats."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items() if not str(k).startswith("_") and k != "edit"}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


# ---- the benchmark --------------------------------------------------------------------------------------
def bench_quality(adapter, methods: Sequence[str] | None = None, concepts: dict[str, list[str]] | None = None,
                  settings: EvalSettings | None = None, *, progress: bool = True, command: str | None = None) -> dict:
    """Every method (plus 'none' first) on every concept (each erased alone, retain = its neighbours).

    In a torch.distributed process group the (method, concept) jobs are dealt over the ranks, each computed
    exactly as here, and gathered in order on every rank (``distributed.map_jobs``): the same numbers."""
    from .. import distributed

    t0 = time.perf_counter()
    s = settings or EvalSettings()
    concepts = concepts or BENCH_CONCEPTS
    if methods is None:
        methods, missing = available_methods()
    else:
        missing = {}
    methods = ["none"] + [m for m in methods if m != "none"]
    jobs = [(m, c) for m in methods for cat in concepts for c in concepts[cat]]
    rows: dict[str, dict] = {m: {"concepts": {}, "errors": {}, "erase_s": 0.0} for m in methods}

    def job(mc):
        r = evaluate_method(adapter, mc[0], [mc[1]], None, s)
        return {k: v for k, v in r.items() if k != "edit"}

    for (m, c), r in zip(jobs, distributed.map_jobs(jobs, job, "bench-quality", progress=progress)):
        if "error" in r:
            rows[m]["errors"][c] = r["error"]
        else:
            rows[m]["concepts"][c] = r["concepts"][c]
            rows[m]["erase_s"] += r["erase_s"]
    for row in rows.values():
        row["categories"] = {}
        for cat, cs in concepts.items():
            got = [row["concepts"][c] for c in cs if c in row["concepts"]]
            row["categories"][cat] = {
                "hmean": float(np.mean([g["hmean"] for g in got])) if got else None,
                **{t: float(np.mean([g["terms"][t] for g in got])) if got else None for t in TERMS},
            }
        allc = list(row["concepts"].values())
        row["hmean"] = float(np.mean([g["hmean"] for g in allc])) if allc else None
        row["terms"] = {t: float(np.mean([g["terms"][t] for g in allc])) if allc else None for t in TERMS}
        row["erase_s"] = round(row["erase_s"], 2)
    return {
        "benchmark": "toy-world quality (pure_fast.evaluate.toy_bench)",
        "settings": s.to_json(), "concepts": concepts, "methods": methods, "unavailable": missing,
        "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "provenance": provenance(command),
        "world_size": distributed.processes(),
    }
