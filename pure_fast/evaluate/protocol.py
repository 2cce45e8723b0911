"""The toy-world benchmark protocol: the rules that make a reported number trustworthy.

- **The world.** ``WORLD`` / ``DETECTORS`` below are the only place the evaluation chooses the toy world
  (renderer, captions, dev/test split) and its detectors; a new world with the same module interface
  (``CATEGORIES``, ``DEV_CONCEPTS``, ``TEST_CONCEPTS``, ``split_of``, ``anchor_prompts``, ...) replaces it
  by changing these two imports.
- **Seeds.** Evaluation seeds are disjoint from collection seeds, enforced by :func:`check_eval_seeds`: it
  raises :class:`SeedOverlapError` when an evaluation would use a seed an edit collected its activations on
  (PURE and ActErase record theirs in ``edit.options['collect']['seeds']``) or a seed the other purpose
  owns: reported numbers never use the tuning seeds (``TUNING_SEEDS`` and any seed a presets file says
  tuning used), tuning never uses the report's ``SEED_SETS``. Reported numbers come from 3 disjoint seed
  sets of >= 4 seeds each and carry their spread (:func:`spread`: mean, half-range, the three values).
- **Concepts.** Reports show test concepts only and tuning uses dev concepts only
  (:func:`check_split`, :class:`SplitError`); retention is measured on members of the same split.
- **Multi-concept sets** (:func:`multi_concept_sets`): k concepts of one category erased in one edit, k
  from ``MULTI_K`` as far as the category's test members allow (one test member is always kept, so the
  retention of not-erased members is defined), plus one mixed set across categories.
- **FID** (:func:`frechet_distance`): the Fréchet distance between two feature sets, with a Ledoit-Wolf
  shrunk covariance (tens to hundreds of images cannot estimate a 128-d covariance; the shrinkage makes
  it well defined and lowers the small-sample bias). The benchmark computes it on the toy detector CNN's
  features, so it is *not* Inception FID and its values are not comparable to published FIDs.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

from ..errors import UsageError
from ..toy import detectors as DETECTORS  # noqa: F401, N812 - the detectors of the world below (re-exported)
from ..toy import world as WORLD  # noqa: N812 - the world the benchmark measures (v2: change this import)

# Three disjoint evaluation seed sets for reported numbers (4 seeds per prompt each) and the tuning seeds of
# bench/sweep_defaults.py; none of them is a collection seed of any method's defaults (0, 1).
SEED_SETS: tuple[tuple[int, ...], ...] = ((100, 101, 102, 103), (200, 201, 202, 203), (300, 301, 302, 303))
TUNING_SEEDS: tuple[int, ...] = (500, 501, 502, 503)
MIN_SEEDS_PER_SET = 4
MULTI_K: tuple[int, ...] = (1, 3, 10, 20)
PRESETS_PATH = os.path.join(os.path.dirname(__file__), "toy_presets.json")


class SeedOverlapError(UsageError):
    """An evaluation would use a seed an edit collected on or that the other purpose (tuning/report) owns."""


class SplitError(UsageError):
    """A report would show a dev concept, or tuning would use a test concept."""


# ---- seeds ------------------------------------------------------------------------------------------------
def _ints(seeds: Iterable) -> set[int]:
    return {int(s) for s in seeds}


def edit_collection_seeds(edit) -> set[int]:
    """The seeds an edit collected activations on (``options['collect']['seeds']``; empty for text-space
    methods, which generate nothing)."""
    if edit is None:
        return set()
    col = (getattr(edit, "options", None) or {}).get("collect") or {}
    return _ints(col.get("seeds") or ())


def forbidden_seeds(purpose: str, presets: dict | None = None) -> set[int]:
    """Seeds an evaluation for ``purpose`` ('report' or 'tune') may not use (besides collection seeds)."""
    if purpose == "report":
        out = set(TUNING_SEEDS)
        if presets:
            out |= _ints(presets.get("tuning_seeds") or ())
        return out
    if purpose == "tune":
        return {s for ss in SEED_SETS for s in ss}
    raise ValueError(f"purpose must be 'report' or 'tune', got {purpose!r}")


def check_eval_seeds(seeds: Iterable[int], edit=None, *, purpose: str = "report", presets: dict | None = None,
                     extra_forbidden: Iterable[int] = ()) -> None:
    """Raise :class:`SeedOverlapError` when ``seeds`` meet the edit's collection seeds or the seeds that
    ``purpose`` may not use (see the module docstring)."""
    seeds = _ints(seeds)
    collected = edit_collection_seeds(edit) & seeds
    if collected:
        raise SeedOverlapError(
            f"evaluation seed(s) {sorted(collected)} were used by the {getattr(edit, 'method', '?')} edit to collect "
            "its activations; evaluate on fresh seeds (pure_fast.evaluate.protocol.SEED_SETS)")
    other = (forbidden_seeds(purpose, presets) | _ints(extra_forbidden)) & seeds
    if other:
        owner = "tuning (bench/sweep_defaults.py)" if purpose == "report" else "the reported seed sets"
        raise SeedOverlapError(f"evaluation seed(s) {sorted(other)} belong to {owner}; a {purpose} evaluation "
                               "must use seeds disjoint from them")


def check_seed_sets(seed_sets: Sequence[Sequence[int]], min_seeds: int = MIN_SEEDS_PER_SET) -> None:
    """The seed sets of a report: pairwise disjoint, each with at least ``min_seeds`` seeds."""
    seen: set[int] = set()
    for ss in seed_sets:
        if len(set(ss)) < min_seeds:
            raise UsageError(f"seed set {list(ss)} has fewer than {min_seeds} distinct seeds")
        if seen & set(ss):
            raise SeedOverlapError(f"seed sets overlap on {sorted(seen & set(ss))}; they must be disjoint")
        seen |= set(ss)


# ---- concepts ---------------------------------------------------------------------------------------------
def check_split(concepts: Iterable[str], split: str, world=WORLD) -> None:
    """Raise :class:`SplitError` unless every concept is in ``split`` ('test' for reports, 'dev' for tuning)."""
    wrong = [c for c in concepts if world.split_of(c) != split]
    if wrong:
        what = "a report shows test concepts only" if split == "test" else "tuning uses dev concepts only"
        raise SplitError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a {split} concept; {what} "
                         f"(pure_fast/toy/world.py: DEV_CONCEPTS / TEST_CONCEPTS)")


def split_concepts(split: str, world=WORLD) -> dict[str, list[str]]:
    """{category: concepts of ``split``} in the world's order."""
    src = world.TEST_CONCEPTS if split == "test" else world.DEV_CONCEPTS
    return {cat: list(src[cat]) for cat in world.CATEGORIES}


def multi_concept_sets(world=WORLD, ks: Sequence[int] = MULTI_K, split: str = "test") -> list[dict]:
    """The multi-concept erasure sets: k members of the category with the most ``split`` members (the first k in
    the world's order; at least one member stays unerased) for every k in ``ks`` that fits, then one mixed
    set (the first member of every category but the last, so another category stays untouched).
    Returns [{"name", "category" (None when mixed), "k", "forget"}]."""
    members = split_concepts(split, world)
    cat = max(members, key=lambda c: len(members[c]))  # first category among equals
    out = [{"name": f"{cat}-{k}", "category": cat, "k": k, "forget": members[cat][:k]}
           for k in ks if k <= len(members[cat]) - 1]
    cats = [c for c in members if members[c]]
    mixed = [members[c][0] for c in cats[:-1]] if len(cats) > 2 else [members[c][0] for c in cats[:1]]
    out.append({"name": "mixed", "category": None, "k": len(mixed), "forget": mixed})
    return out


# ---- numbers ----------------------------------------------------------------------------------------------
def spread(values: Sequence[float | None]) -> dict:
    """Mean, half-range and the values of one number over the seed sets (None values are skipped)."""
    vals = [float(v) for v in values if v is not None and v == v]
    if not vals:
        return {"mean": None, "half_range": None, "values": list(values)}
    return {"mean": float(np.mean(vals)), "half_range": float((max(vals) - min(vals)) / 2), "values": vals}


def _shrunk_cov(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf covariance (shrunk toward a scaled identity) of rows ``x`` [n, d] and the shrinkage."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    target = mu * np.eye(d)
    delta = float(np.sum((s - target) ** 2))
    # beta = sum_k ||x_k x_k^T - S||_F^2 / n^2 = (sum_k ||x_k||^4 / n - ||S||_F^2) / n
    beta = float((np.sum(np.sum(xc**2, axis=1) ** 2) / n - np.sum(s**2)) / n)
    shrink = 0.0 if delta <= 0 else min(1.0, beta / delta)
    return shrink * target + (1 - shrink) * s, shrink


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray, *, covariance: str = "shrunk") -> dict:
    """Fréchet distance ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)`` between feature rows
    ``x`` [n, d] and ``y`` [m, d]. ``covariance``: 'shrunk' (Ledoit-Wolf), 'diag' or 'full' (sample).
    Returns {"fid", "mean_term", "cov_term", "n", "m", "d", "covariance", "shrinkage"}."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ValueError(f"need two [n>=2, d] feature sets of equal d, got {x.shape} and {y.shape}")
    mean_term = float(np.sum((x.mean(0) - y.mean(0)) ** 2))
    shrink = None
    if covariance == "diag":
        cov_term = float(np.sum((np.sqrt(x.var(0)) - np.sqrt(y.var(0))) ** 2))
    elif covariance in ("shrunk", "full"):
        if covariance == "shrunk":
            sx, a = _shrunk_cov(x)
            sy, b = _shrunk_cov(y)
            shrink = [a, b]
        else:
            sx, sy = np.cov(x, rowvar=False, bias=True), np.cov(y, rowvar=False, bias=True)
        rx = _sqrtm_psd(sx)
        cross = np.trace(_sqrtm_psd(rx @ sy @ rx))
        cov_term = float(max(0.0, np.trace(sx) + np.trace(sy) - 2 * cross))
    else:
        raise ValueError(f"covariance must be 'shrunk', 'diag' or 'full', got {covariance!r}")
    return {"fid": mean_term + cov_term, "mean_term": mean_term, "cov_term": cov_term, "n": len(x), "m": len(y),
            "d": x.shape[1], "covariance": covariance, "shrinkage": shrink}


# ---- presets (the tuned toy defaults, written by bench/sweep_defaults.py) ---------------------------------
def load_presets(path: str | None = None, world=WORLD) -> dict | None:
    """The tuned toy defaults (``toy_presets.json``), or None when there is none for this world."""
    path = path or PRESETS_PATH
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("world") != world.__name__:
        return None
    return doc
