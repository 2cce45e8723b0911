"""``pure-fast bench-quality``: every method on the toy world's test concepts under the protocol.

What it measures (``evaluate/protocol.py`` holds the rules, ``toy_bench.py`` the per-concept numbers):

- **single concept**: every test concept erased alone by every method, each method twice: at its *tuned toy
  default* (``toy_presets.json``, written by ``bench/sweep_defaults.py`` from a sweep on dev concepts; a
  method without a preset uses its toy-category defaults, and the report says so) and at its *paper
  default* (``PAPER_OPTIONS``: the options class defaults; when both are the same options the method is
  measured once). Numbers per seed set (3 disjoint sets of 4 seeds), reported as mean ± half-range;
  FID per method pooled over the concepts' retention images (detector-CNN features, not Inception FID);
- **multi-concept**: ``protocol.multi_concept_sets`` (k members of one category in one edit, plus a mixed
  set) erased by every method at its tuned default: target rate on the erased concepts (anchor, held-out),
  retention of the not-erased test members of the category and of the other categories, quality, FID and
  erase time.

Order of work: the unedited model, every method's paper default, every method's tuned default (the presets
file is read once, at the start), then the multi-concept sets. Under torchrun the jobs are dealt over the ranks
and the document is the same as a single process's (plus ``world_size``).

``--quick`` measures one test concept per category with fewer prompts (same seed sets, no greedy search);
the full run every test concept with the greedy attack.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Sequence

import numpy as np

from . import protocol, toy_bench
from .protocol import WORLD as world
from .toy_bench import EvalSettings

# The paper default of every method: option fields over the options class defaults (no toy tuning). PURE's is
# its paper preset (``methods/pure.py: PAPER_PRESET``: uncentred, open loop, the paper's short trajectory).
PAPER_OPTIONS: dict[str, dict] = {"pure": {"preset": "paper"}, "uce": {}, "cure": {}, "space": {}, "acterase": {}}

FULL = EvalSettings(seed_sets=protocol.SEED_SETS, split="test", purpose="report", n_anchor=4, n_heldout=4,
                    n_attack=2, n_forget_canonical=4, n_neighbour=1, greedy_base=1, greedy_substitute=4,
                    greedy_insert=2, greedy_search_seeds=(1000, 1001))
QUICK = replace(FULL, n_anchor=2, n_heldout=2, n_attack=1, n_forget_canonical=1, greedy=False)
MULTI_FULL = replace(FULL, n_anchor=3, n_heldout=3)
MULTI_QUICK = replace(QUICK, n_anchor=1, n_heldout=1)
# Images (v1 world, 12 seeds per prompt): quick ~3.8k single + ~2.7k multi; full ~27k single + ~4.4k multi. At
# the ~12-15 images/s of the toy model on 2 idle cores (6 DDIM steps, CFG) plus the erase times that is about
# 10 and 45 minutes; on a loaded machine it is proportionally longer (bench/results/quality.md states the wall
# time of the run it holds).

SUMMARY_KEYS = toy_bench.SPREAD_KEYS
MULTI_KEYS = toy_bench.MULTI_SPREAD_KEYS


def bench_concepts(quick: bool) -> dict[str, list[str]]:
    test = protocol.split_concepts("test")
    return {cat: cs[:1] for cat, cs in test.items()} if quick else test


def variant_options(method: str, variant: str, category: str, presets: dict | None):
    """The options object of ``method`` for ``variant`` ('tuned' or 'paper') on a toy ``category``: tuned = the
    presets' values over the category's preset (``toy/presets.py``), paper = ``PAPER_OPTIONS`` over the class
    defaults (no category preset)."""
    from ..methods.base import build_options, get_method

    if variant == "tuned":
        knobs = ((presets or {}).get("methods") or {}).get(method, {}).get("options", {})
        return build_options(get_method(method), None, dict(knobs), category)
    return build_options(get_method(method), None, dict(PAPER_OPTIONS.get(method, {})), None)


def _per_set_mean(results: Sequence[dict], path: tuple, n_sets: int) -> list:
    vals = []
    for k in range(n_sets):
        got = [toy_bench._get(r["sets"][k] if "sets" in r else r, path) for r in results]
        got = [g for g in got if g is not None and g == g]
        vals.append(float(np.mean(got)) if got else None)
    return vals


def summarize(results: Sequence[dict], n_sets: int, keys: dict) -> dict:
    """{name: protocol.spread} of each number averaged over ``results`` per seed set, plus "fid"."""
    out = {name: protocol.spread(_per_set_mean(results, path, n_sets)) for path, name in keys.items()}
    fids = toy_bench.pooled_fid(results, n_sets)
    out["fid"] = protocol.spread([f["fid"] if f else None for f in fids])
    out["fid_floor"] = protocol.spread([f["floor"] if f else None for f in fids])
    return out


def bench_quality(adapter, methods: Sequence[str] | None = None, *, quick: bool = False,
                  settings: EvalSettings | None = None, multi_settings: EvalSettings | None = None,
                  presets: dict | None = None, multi: bool = True, progress: bool = True,
                  command: str | None = None, concepts: dict[str, list[str]] | None = None) -> dict:
    """Run the benchmark (see the module docstring) and return its JSON-ready document.

    ``concepts`` ({category: [test concepts]}) narrows the single-concept part (default: ``bench_concepts``).
    Inside a torch.distributed process group (``torchrun ... -m pure_fast bench-quality``) the jobs -- one per
    (row, concept) and one per (method, multi-concept set) -- are dealt over the ranks, each computed exactly as
    one process computes it (``distributed.map_jobs``), and gathered in job order: the same numbers as a
    single-process run, with ``world_size`` recorded."""
    from .. import distributed

    t0 = time.perf_counter()
    s = settings or (QUICK if quick else FULL)
    ms = multi_settings or (MULTI_QUICK if quick else MULTI_FULL)
    for st in (s, ms):
        st.validate()
        protocol.check_seed_sets(st.sets())
    concepts = {cat: list(cs) for cat, cs in (concepts or bench_concepts(quick)).items() if cs}
    protocol.check_split([c for cs in concepts.values() for c in cs], "test")
    sets = protocol.multi_concept_sets() if multi else []
    protocol.check_split([c for m in sets for c in m["forget"]], "test")
    if methods is None:
        methods, missing = toy_bench.available_methods()
    else:
        missing = {}
    methods = [m for m in methods if m != "none"]
    n_sets = len(s.sets())
    flat = [c for cs in concepts.values() for c in cs]
    if presets is None:
        presets = protocol.load_presets()

    # Rows in report order; every row's options per category are fixed before any work starts.
    rows = [{"method": "none", "variant": "unedited", "options": None}]
    for m in methods:
        rows += [{"method": m, "variant": "tuned"}, {"method": m, "variant": "paper"}]
    opts_of: dict[tuple[int, str], object] = {}
    for i, row in enumerate(rows):
        row.update(concepts={}, errors={}, erase_s={}, options_by_category={})
        if row["method"] != "none":
            row["preset"] = bool(presets and row["method"] in presets.get("methods", {}))
        for cat in concepts:
            o = None if row["method"] == "none" else variant_options(row["method"], row["variant"], cat, presets)
            opts_of[(i, cat)] = o
            row["options_by_category"][cat] = asdict(o) if o is not None else None
    # A tuned row whose options equal the paper default's (per category) is measured once, in the paper row.
    copy_from: dict[tuple[int, str], int] = {}
    for i, row in enumerate(rows):
        if row["variant"] == "tuned":
            j = i + 1  # its paper row
            for cat in concepts:
                if row["options_by_category"][cat] == rows[j]["options_by_category"][cat]:
                    copy_from[(i, cat)] = j
                    rows[j]["same_as"] = "tuned"

    # Jobs: the unedited model, every paper default, every tuned default, then the multi-concept sets.
    order = [0] + [i for i, r in enumerate(rows) if r["variant"] == "paper"] + \
            [i for i, r in enumerate(rows) if r["variant"] == "tuned"]
    jobs = [("single", i, c) for i in order for c in flat if (i, world.category_of(c)) not in copy_from]
    multi_methods = ["none"] + methods
    jobs += [("multi", m, k) for m in multi_methods for k in range(len(sets))]

    def run_job(job):
        if job[0] == "single":
            _, i, c = job
            row = rows[i]
            r = toy_bench.evaluate_method(adapter, row["method"], [c], None, s,
                                          options=opts_of[(i, world.category_of(c))], presets=presets)
        else:
            _, m, k = job
            st = sets[k]
            opts = None if m == "none" else variant_options(m, "tuned", world.category_of(st["forget"][0]), presets)
            r = toy_bench.evaluate_method(adapter, m, st["forget"], None, ms, options=opts, presets=presets,
                                          multi=True)
        return {key: v for key, v in r.items() if key != "edit"}

    results = dict(zip(jobs, distributed.map_jobs(jobs, run_job, "bench-quality", progress=progress)))

    for i, row in enumerate(rows):
        for c in flat:
            cat = world.category_of(c)
            r = results[("single", copy_from.get((i, cat), i), c)]
            if "error" in r:
                row["errors"][c] = r["error"]
            else:
                row["concepts"][c], row["erase_s"][c] = r["concepts"][c], r["erase_s"]
        got = list(row["concepts"].values())
        row["summary"] = summarize(got, n_sets, SUMMARY_KEYS) if got else None
        row["categories"] = {cat: protocol.spread(_per_set_mean(
            [row["concepts"][c] for c in cs if c in row["concepts"]], ("hmean",), n_sets))
            for cat, cs in concepts.items()}
        row["erase_s_mean"] = float(np.mean(list(row["erase_s"].values()))) if row["erase_s"] else None

    multi_rows = []
    for m in multi_methods:
        mrow = {"method": m, "variant": "unedited" if m == "none" else "tuned", "sets": {}, "errors": {},
                "preset": bool(presets and m in presets.get("methods", {}))}
        for k, st in enumerate(sets):
            r = results[("multi", m, k)]
            if "error" in r:
                mrow["errors"][st["name"]] = r["error"]
                continue
            res = r["multi"]
            mrow["sets"][st["name"]] = {"k": st["k"], "forget": st["forget"], "erase_s": r["erase_s"],
                                        "summary": summarize([res], len(ms.sets()), MULTI_KEYS),
                                        "kept_concepts": res["kept"]["concepts"],
                                        "other_concepts": res["other"]["concepts"], "result": res}
        multi_rows.append(mrow)

    return {
        "benchmark": "toy-world quality under the protocol (pure_fast.evaluate.quality_bench)",
        "quick": quick, "world": world.__name__, "methods": ["none"] + methods, "unavailable": missing,
        "protocol": {
            "seed_sets": [list(x) for x in s.sets()], "tuning_seeds": sorted(protocol.forbidden_seeds("report", presets)),
            "split": "test", "concepts": concepts, "multi_sets": sets,
            "presets": {k: v for k, v in (presets or {}).items() if k != "methods"} or None,
            "fid": "Fréchet distance on the toy detector CNN's 128-d unit-length penultimate features (not Inception "
                   "FID), Ledoit-Wolf shrunk covariances, generated retention images vs fresh renders of the same "
                   "labels; floor = two independent render sets of those labels",
        },
        "settings": s.to_json(), "multi_settings": ms.to_json(),
        "single": rows, "multi": multi_rows,
        "seconds": round(time.perf_counter() - t0, 1), "provenance": toy_bench.provenance(command),
        "world_size": distributed.processes(),
    }
