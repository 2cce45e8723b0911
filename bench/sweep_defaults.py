"""Tune every method's toy-world defaults on DEV concepts only, with the same budget for every method.

    python bench/sweep_defaults.py [--method M ...] [--budget 6] [--out-dir bench/results] [--threads N]
                                   [--presets pure_fast/evaluate/toy_presets.json] [--dry-run]

Every method gets ``--budget`` configurations of its main knobs (``SWEEP``: a grid per method, from which
``budget`` points are drawn deterministically; the paper default's values come first when they lie in the
grid; or a list of explicit points, taken in order). Each configuration erases every dev concept of the world alone (``protocol.split_concepts('dev')``)
and is scored on the tuning seeds (``protocol.TUNING_SEEDS``, disjoint from the report's seed sets: the
evaluation refuses anything else) by the mean H-mean of (1 - target rate, retention on dev neighbours,
1 - attack success of the fixed attack families, quality). The best configuration of each method becomes
its tuned toy default in ``pure_fast/evaluate/toy_presets.json`` (the one source ``pure-fast
bench-quality`` reads), and ``bench/results/sweep_defaults.{json,md,png}`` record every configuration.

Adding a knob is one line in ``SWEEP`` (a method's option field and the values to try), e.g.
``"pure": {..., "closed_loop_rounds": [0, 1, 2]}``; collection options (``steps``, ``record_steps``,
``seeds``...) are accepted like any option field.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pure_fast.evaluate import protocol, report, toy_bench  # noqa: E402
from pure_fast.evaluate.quality_bench import PAPER_OPTIONS  # noqa: E402

BUDGET = 6  # configurations per method: the same for every method
# PURE: explicit points (its knobs depend on the basis: retain_weight only acts with 'contrast'), chosen after
# bench/explore_pure_basis.py compared the constructions and the loop on the same dev concepts and tuning seeds
# (exploration runs, not kept: extra dev budget for PURE, stated in the README).
_PURE_POINT = {"basis": "variance", "forget_threshold": 0.98, "retain_threshold": 0.5, "retain_weight": 30.0,
               "rounds": 3}
SWEEP: dict[str, dict[str, list] | list[dict]] = {
    "pure": [_PURE_POINT, {**_PURE_POINT, "basis": "specific"},
             {**_PURE_POINT, "basis": "contrast", "rounds": 1},
             {**_PURE_POINT, "basis": "contrast"},
             {**_PURE_POINT, "basis": "contrast", "retain_weight": 100.0, "rounds": 1},
             {**_PURE_POINT, "basis": "contrast", "retain_weight": 100.0}],
    "uce": {"erase_scale": [1.0, 2.0, 4.0], "preserve_scale": [None, 0.1, 1.0], "guide": ["", "something"]},
    "cure": {"alpha": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]},
    "space": {"target_sparsity": [0.05, 0.1, 0.2, 0.35, 0.5, 0.85]},
    "acterase": {"gate_threshold": [0.3, 0.5, 0.7], "strength": [0.5, 1.0], "max_rank": [2, 4, 8]},
}
TUNE = toy_bench.EvalSettings(seeds=protocol.TUNING_SEEDS, purpose="tune", split="dev", greedy=False, n_anchor=2,
                              n_heldout=2, n_attack=1, n_forget_canonical=1, n_neighbour=1)
PRESETS_PATH = protocol.PRESETS_PATH


def configurations(method: str, budget: int = BUDGET, sweep: dict | None = None) -> list[dict]:
    """``budget`` points of the method's grid: the paper default's values and the method's current toy-category
    default's first (when in the grid), then a fixed random draw (numpy seed 0) of the others. Fewer only when
    the grid is smaller. A grid given as a list of points is taken in its order."""
    grid = (sweep or SWEEP)[method]
    if isinstance(grid, list):
        return [dict(p) for p in grid[:budget]]
    names = list(grid)
    points = [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]
    starts = [_values(method, names, None), _values(method, names, protocol.WORLD.category_of(
        protocol.split_concepts("dev")[next(iter(protocol.WORLD.CATEGORIES))][0]))]
    first = [p for p in points if p in starts]
    rest = [p for p in points if p not in starts]
    order = np.random.default_rng(0).permutation(len(rest))
    return (first + [rest[i] for i in order])[:budget]


def _values(method: str, names, category: str | None) -> dict:
    """The knob values of the paper default (``category`` None) or of the toy-category default."""
    from pure_fast.methods.base import build_options, get_method

    opts = build_options(get_method(method), None, dict(PAPER_OPTIONS.get(method, {})) if category is None else {},
                         category)
    return {n: getattr(opts, n, None) for n in names}


def kv_digest(adapter) -> tuple:
    """A digest of every cross-attention K/V weight (float64 sum and sum of squares per weight): equal for the
    same weights, different once an edit is applied."""
    import torch

    out = []
    with torch.no_grad():
        for layer in adapter.cross_attention_layers():
            for proj in (layer.module.to_k, layer.module.to_v):
                w = proj.weight.detach().double()
                out += [float(w.sum()), float((w * w).sum())]
    return tuple(out)


@contextlib.contextmanager
def reuse_collections():
    """Within the block, methods that collect activations (PURE, ActErase) reuse a collection they already ran
    with the same prompts and collection options: collection reads the unedited model (every evaluation
    reverts its edit), so configurations that differ only in estimation or runtime knobs (thresholds, gate,
    strength, rank) need it once. A knob that changes the collection options gets its own collection, and so
    does a model whose cross-attention K/V weights differ (PURE's closed loop collects again with its edit
    applied: serving it the unedited model's collection would silently turn every loop into one round)."""
    from pure_fast.collect import activations

    original = activations.collect_activations
    cache: dict = {}

    def cached(adapter, prompt_groups, options=None, progress=True):
        key = (id(adapter), kv_digest(adapter), json.dumps({k: list(v) for k, v in prompt_groups.items()}, sort_keys=True),
               repr(options))
        if key not in cache:
            cache[key] = original(adapter, prompt_groups, options, progress=progress)
        return cache[key]

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("pure_fast.methods") and getattr(m, "collect_activations", None) is original]
    for m in patched:
        m.collect_activations = cached
    try:
        yield cache
    finally:
        for m in patched:
            m.collect_activations = original


def score_configuration(adapter, method: str, config: dict, concepts: list[str], settings) -> dict:
    per = {}
    for c in concepts:
        r = toy_bench.evaluate_method(adapter, method, [c], None, settings, options=dict(config))
        if "error" in r:
            per[c] = {"error": r["error"], "hmean": 0.0}
            continue
        cr = r["concepts"][c]
        per[c] = {"hmean": cr["hmean"], "target_anchor": cr["target"]["anchor"], "target_heldout": cr["target"]["heldout"],
                  "retention": cr["retention"]["rate"], "attack": cr["attack"]["rate"],
                  "quality": cr["quality"]["score"], "erase_s": r["erase_s"]}
    return {"options": config, "concepts": per, "objective": float(np.mean([v["hmean"] for v in per.values()]))}


def markdown(doc: dict) -> str:
    prov = doc["provenance"]
    lines = ["# Toy-world defaults tuned on dev concepts (`bench/sweep_defaults.py`)", "",
             f"Command: `{prov['command']}`  ", f"Date: {prov['date']}, commit `{prov['commit']}`, device {prov['device']} "
             f"({prov['torch_threads']} torch threads), wall time {doc['seconds']:.0f} s  ",
             f"World `{doc['world']}`; dev concepts: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in doc["dev_concepts"].items())
             + f"; tuning seeds {doc['tuning_seeds']} (disjoint from the report's seed sets); budget {doc['budget']} "
             "configurations per method. Objective: mean H-mean over the dev concepts (each erased alone; fixed "
             "attack families, no greedy search). Chosen = highest objective (first on ties). Erase s: PURE and ActErase "
             "collect once per dev concept (first configuration) and reuse it (`reuse_collections`), so later rows "
             "show the estimation time only; a method without its section was not run.", ""]
    for m, res in doc["methods"].items():
        when = f"Tuned by `{res['command']}` on {res['date']}." if res.get("command") else ""
        lines += [f"## {m}", "", *([when, ""] if when else []), "| options | objective | target anchor | target held-out | retention | quality | erase s |",
                  "|---|---|---|---|---|---|---|"]
        for k, cfg in enumerate(res["configurations"]):
            vals = [v for v in cfg["concepts"].values() if "error" not in v]
            mean = lambda key: float(np.mean([v[key] for v in vals])) if vals else None  # noqa: E731
            mark = " **(chosen)**" if k == res["chosen"] else ""
            f = lambda v, nd=2: "—" if v is None else f"{v:.{nd}f}"  # noqa: E731
            lines.append(f"| `{cfg['options']}`{mark} | {cfg['objective']:.3f} | {f(mean('target_anchor'))} | "
                         f"{f(mean('target_heldout'))} | {f(mean('retention'))} | {f(mean('quality'))} | "
                         f"{f(mean('erase_s'), 1)} |")
        lines.append("")
    return "\n".join(lines)


def chart(doc: dict, path: str) -> str:
    plt = report._plt()
    ms = list(doc["methods"])
    fig, axes = plt.subplots(1, len(ms), figsize=(3.2 * len(ms), 3.4), squeeze=False)
    for ax, m in zip(axes[0], ms):
        res = doc["methods"][m]
        y = [c["objective"] for c in res["configurations"]]
        ax.bar(range(len(y)), y, color=["C2" if k == res["chosen"] else "C0" for k in range(len(y))])
        ax.set_xticks(range(len(y)), ["\n".join(f"{k[:8]}={v}" for k, v in c["options"].items())
                                      for c in res["configurations"]], fontsize=5)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{m} (green: chosen)", fontsize=9)
    axes[0][0].set_ylabel("dev objective: mean H-mean")
    return report._save_fig(fig, path)


def _document(out: dict, dev: dict, budget: int, t0: float, command: str, provenance) -> dict:
    return {"sweep": "toy-world defaults on dev concepts (bench/sweep_defaults.py)", "world": protocol.WORLD.__name__,
            "dev_concepts": dev, "tuning_seeds": list(TUNE.seeds), "budget": budget, "settings": TUNE.to_json(),
            "methods": out, "seconds": round(time.perf_counter() - t0, 1), "provenance": provenance(command)}


def _resumable(path: str, dev: dict, budget: int) -> dict:
    """Methods of an earlier run's JSON that can be kept (same world, dev concepts, seeds, settings, budget)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    same = (doc.get("world") == protocol.WORLD.__name__ and doc.get("dev_concepts") == dev and doc.get("budget") == budget
            and doc.get("tuning_seeds") == list(TUNE.seeds) and doc.get("settings") == json.loads(json.dumps(TUNE.to_json())))
    return doc.get("methods", {}) if same else {}


def _write_reports(doc: dict, out_dir: str, presets_path: str) -> None:
    """sweep_defaults.md/.png from the result document, and the presets file (every finished method's choice)."""
    report.write_text(os.path.join(out_dir, "sweep_defaults.md"), markdown(doc))
    chart(doc, os.path.join(out_dir, "sweep_defaults.png"))
    old = protocol.load_presets(presets_path) or {}
    methods_presets = dict(old.get("methods", {}))
    for m, r in doc["methods"].items():
        best = r["configurations"][r["chosen"]]
        methods_presets[m] = {"options": best["options"], "objective": best["objective"]}
    presets = {"world": protocol.WORLD.__name__, "source": "bench/sweep_defaults.py -> bench/results/sweep_defaults.json",
               "date": doc["provenance"]["date"], "commit": doc["provenance"]["commit"],
               "tuning_seeds": sorted(set(doc["tuning_seeds"]) | set(old.get("tuning_seeds", []))),
               "budget": doc["budget"], "dev_concepts": doc["dev_concepts"], "methods": methods_presets}
    report.write_json(presets_path, presets)


def main(argv=None) -> int:
    import torch

    from pure_fast.adapters import load_model
    from pure_fast.evaluate.toy_bench import available_methods, provenance, json_ready
    from pure_fast.progress import progress_bar

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", action="append", default=None, help="methods to tune (default: all available)")
    p.add_argument("--budget", type=int, default=BUDGET, help="configurations per method (the same for all)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--presets", default=PRESETS_PATH, help="where the chosen defaults are written")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="tune on the first N dev concepts of each category (default: all; for a loaded machine)")
    p.add_argument("--resume", action="store_true", help="keep the methods an earlier run of the same sweep finished")
    p.add_argument("--from-json", action="store_true", help="run nothing: rewrite the .md/.png and the presets from "
                   "the methods sweep_defaults.json holds (e.g. while a sweep is still running)")
    p.add_argument("--dry-run", action="store_true", help="print the configurations and exit")
    args = p.parse_args(argv)
    methods = args.method or available_methods()[0]
    if args.budget < 1:
        p.error("--budget must be >= 1")
    unknown = [m for m in methods if m not in SWEEP]
    if unknown:
        p.error(f"no sweep for {', '.join(unknown)}; known: {', '.join(SWEEP)}")
    dev = protocol.split_concepts("dev")
    if args.per_category is not None:
        if args.per_category < 1:
            p.error("--per-category must be >= 1")
        dev = {cat: cs[: args.per_category] for cat, cs in dev.items()}
    concepts = [c for cs in dev.values() for c in cs]
    protocol.check_split(concepts, "dev")
    plan = {m: configurations(m, args.budget) for m in methods}
    if args.dry_run:
        for m, cfgs in plan.items():
            print(m, *cfgs, sep="\n  ")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    command = ("python bench/sweep_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "sweep_defaults.json")
    done = _resumable(json_path, dev, args.budget) if args.resume else {}
    if args.from_json:
        if not _resumable(json_path, dev, args.budget):
            p.error(f"{json_path} holds no finished method of this sweep")
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
        _write_reports(doc, args.out_dir, args.presets)
        return 0
    out: dict = {m: done[m] for m in plan if m in done and [c["options"] for c in done[m]["configurations"]] == plan[m]}
    # methods this run does not tune keep their earlier records (same world, dev concepts, seeds and budget)
    out = {**{m: r for m, r in _resumable(json_path, dev, args.budget).items() if m not in plan}, **out}
    adapter = load_model("toy")
    import pure_fast.methods.acterase  # noqa: F401 - loaded before reuse_collections patches them
    import pure_fast.methods.pure  # noqa: F401
    todo = [m for m in plan if m not in out]
    with reuse_collections(), progress_bar(total=sum(len(plan[m]) for m in todo) * len(concepts), desc="sweep") as bar:
        for m in todo:
            t1 = time.perf_counter()
            res = []
            for cfg in plan[m]:
                res.append(score_configuration(adapter, m, cfg, concepts, TUNE))
                bar.update(len(concepts))
            chosen = int(np.argmax([r["objective"] for r in res]))
            out[m] = {"knobs": SWEEP[m], "configurations": res, "chosen": chosen, "seconds": round(time.perf_counter() - t1, 1),
                      "command": command, "date": provenance(command)["date"]}
            doc = _document(out, dev, args.budget, t0, command, provenance)
            report.write_json(json_path, doc)  # after every method: a later failure loses nothing
    doc = _document(out, dev, args.budget, t0, command, provenance)
    report.write_json(json_path, doc)
    _write_reports(json_ready(doc), args.out_dir, args.presets)
    for m, r in out.items():
        best = r["configurations"][r["chosen"]]
        print(f"{m:>9}: chosen {best['options']} (dev objective {best['objective']:.3f}; {r['seconds']:.0f} s)")
    print(f"wrote sweep_defaults.json/.md/.png to {args.out_dir} and {args.presets} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
