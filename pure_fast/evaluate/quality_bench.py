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

Order of work: the unedited model, every method's paper default, then per method its tuned default, the
presets file being read again just before (so the benchmark may start while ``bench/sweep_defaults.py``
still tunes the later methods; each row records the options it ran with).

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

# The paper default of every method: option fields over the options class defaults (no toy tuning).
# PURE's paper preset goes here when the method grows one (e.g. {"preset": "paper"}).
PAPER_OPTIONS: dict[str, dict] = {"pure": {}, "uce": {}, "cure": {}, "space": {}, "acterase": {}}

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
                  command: str | None = None) -> dict:
    """Run the benchmark (see the module docstring) and return its JSON-ready document."""
    from ..progress import progress_bar

    t0 = time.perf_counter()
    s = settings or (QUICK if quick else FULL)
    ms = multi_settings or (MULTI_QUICK if quick else MULTI_FULL)
    for st in (s, ms):
        st.validate()
        protocol.check_seed_sets(st.sets())
    concepts = bench_concepts(quick)
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

    fixed = presets is not None
    current = {"presets": presets if fixed else protocol.load_presets()}

    def presets_now() -> dict | None:
        """The presets as they are now: a given dict, else re-read (per method, just before its tuned rows, so a
        sweep still running when the benchmark starts can finish the later methods first)."""
        if not fixed:
            current["presets"] = protocol.load_presets()
        return current["presets"]

    rows = [{"method": "none", "variant": "unedited", "options": None}]
    for m in methods:
        rows += [{"method": m, "variant": "tuned"}, {"method": m, "variant": "paper"}]
    for row in rows:
        row.update(concepts={}, errors={}, erase_s={}, options_by_category={})
    row_of = {(r["method"], r["variant"]): r for r in rows}
    work = len(rows) * len(flat) + (len(methods) + 1) * len(sets)

    def run_row(row, bar, other=None):
        """Evaluate ``row`` on every concept; a concept whose options equal ``other``'s is copied from it."""
        for c in flat:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{row['method']}/{row['variant']}:{c}")
            cat = world.category_of(c)
            opts = None if row["method"] == "none" else variant_options(row["method"], row["variant"], cat,
                                                                         current["presets"])
            row["options_by_category"][cat] = asdict(opts) if opts is not None else None
            if other is not None and other["options_by_category"].get(cat) == row["options_by_category"][cat] \
                    and c in other["concepts"]:
                row_of[(row["method"], "paper")]["same_as"] = "tuned"
                row["concepts"][c], row["erase_s"][c] = other["concepts"][c], other["erase_s"][c]
                bar.update(1)
                continue
            r = toy_bench.evaluate_method(adapter, row["method"], [c], None, s, options=opts,
                                          presets=current["presets"])
            if "error" in r:
                row["errors"][c] = r["error"]
            else:
                row["concepts"][c] = r["concepts"][c]
                row["erase_s"][c] = r["erase_s"]
            bar.update(1)
        got = list(row["concepts"].values())
        row["summary"] = summarize(got, n_sets, SUMMARY_KEYS) if got else None
        row["categories"] = {cat: protocol.spread(_per_set_mean(
            [row["concepts"][c] for c in cs if c in row["concepts"]], ("hmean",), n_sets))
            for cat, cs in concepts.items()}
        row["erase_s_mean"] = float(np.mean(list(row["erase_s"].values()))) if row["erase_s"] else None

    def run_multi(m, bar):
        mrow = {"method": m, "variant": "unedited" if m == "none" else "tuned", "sets": {}, "errors": {},
                "preset": bool(current["presets"] and m in current["presets"].get("methods", {}))}
        for st in sets:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{m}:{st['name']}")
            cat = world.category_of(st["forget"][0])
            opts = None if m == "none" else variant_options(m, "tuned", cat, current["presets"])
            r = toy_bench.evaluate_method(adapter, m, st["forget"], None, ms, options=opts,
                                          presets=current["presets"], multi=True)
            if "error" in r:
                mrow["errors"][st["name"]] = r["error"]
            else:
                res = r["multi"]
                mrow["sets"][st["name"]] = {"k": st["k"], "forget": st["forget"], "erase_s": r["erase_s"],
                                            "summary": summarize([res], len(ms.sets()), MULTI_KEYS),
                                            "kept_concepts": res["kept"]["concepts"],
                                            "other_concepts": res["other"]["concepts"], "result": res}
            bar.update(1)
        return mrow

    # Order: the unedited model, every paper default, then per method its tuned default (presets read then).
    multi_rows = []
    with progress_bar(total=work, desc="bench-quality", enabled=progress) as bar:
        run_row(rows[0], bar)
        multi_rows.append(run_multi("none", bar))
        for m in methods:
            run_row(row_of[(m, "paper")], bar)
        for m in methods:
            p = presets_now()
            row_of[(m, "tuned")]["preset"] = bool(p and m in p.get("methods", {}))
            run_row(row_of[(m, "tuned")], bar, other=row_of[(m, "paper")])
            multi_rows.append(run_multi(m, bar))
    presets = current["presets"]

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
    }
