"""PURE's forget constructions side by side on DEV concepts (tuning seeds only): the tuned 'variance' default
against 'specific' and the ridge 'contrast' basis at a few retain weights, each concept erased alone, plus the
dev multi-concept sets. An exploration that decides what enters ``bench/sweep_defaults.py``'s PURE grid; it
chooses no default itself and never touches test concepts or evaluation seeds.

    python bench/explore_pure_basis.py [--threads N] [--out-dir bench/results] [--config JSON ...]

Writes ``pure_basis_dev.{json,md}`` (``--name``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sweep_defaults import TUNE, reuse_collections, score_configuration  # noqa: E402

from pure_fast.evaluate import protocol, report, toy_bench  # noqa: E402

_BASE = {"forget_threshold": 0.98, "retain_threshold": 0.5}  # the thresholds the earlier sweep chose
CONFIGS = [
    {**_BASE, "basis": "variance"},
    {**_BASE, "basis": "specific"},
    {**_BASE, "basis": "contrast", "retain_weight": 10.0},
    {**_BASE, "basis": "contrast", "retain_weight": 30.0},
    {**_BASE, "basis": "contrast", "retain_weight": 100.0},
    {**_BASE, "basis": "contrast", "retain_weight": 300.0},
]


def multi_scores(adapter, config: dict, sets: list[dict]) -> dict:
    out = {}
    for st in sets:
        r = toy_bench.evaluate_method(adapter, "pure", st["forget"], None, TUNE, options=dict(config), multi=True)
        if "error" in r:
            out[st["name"]] = {"error": r["error"]}
            continue
        m = r["multi"]
        out[st["name"]] = {"forget": st["forget"], "erase_s": r["erase_s"],
                           "target_anchor": m["target"]["anchor"], "target_heldout": m["target"]["heldout"],
                           "kept": m["kept"]["rate"], "other": m["other"]["rate"],
                           "quality": m["quality"]["score"]}
    return out


def markdown(doc: dict) -> str:
    lines = [f"# PURE forget constructions on dev concepts ({doc['world']})", "",
             f"Command: `{doc['provenance']['command']}`  ",
             f"Date: {doc['provenance']['date']}, commit `{doc['provenance']['commit']}`, {doc['seconds']:.0f} s  ",
             f"Dev concepts {', '.join(doc['concepts'])}; tuning seeds {doc['tuning_seeds']} (never a report's seeds). "
             "Options over PURE's class defaults (closed loop, 3 rounds); erase s is 0 where the "
             "collection was cached from an earlier row; objective = mean H-mean over the dev concepts erased alone.", "",
             "| options | objective | target anchor | target held-out | retention | attack | quality | erase s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["configurations"]:
        per = r["concepts"].values()
        mean = lambda k: float(np.mean([v.get(k, np.nan) for v in per]))  # noqa: E731
        lines.append(f"| `{json.dumps(r['options'])}` | **{r['objective']:.3f}** | {mean('target_anchor'):.2f} | "
                     f"{mean('target_heldout'):.2f} | {mean('retention'):.2f} | {mean('attack'):.2f} | "
                     f"{mean('quality'):.2f} | {mean('erase_s'):.1f} |")
    lines += ["", "Dev multi-concept sets (one edit each):", "",
              "| options | set | erased anchor | erased held-out | kept | other | quality |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for r in doc["configurations"]:
        for name, m in r["multi"].items():
            if "error" in m:
                lines.append(f"| `{json.dumps(r['options'])}` | {name} | error: {m['error']} | | | | |")
                continue
            lines.append(f"| `{json.dumps(r['options'])}` | {name} ({', '.join(m['forget'])}) | {fmt(m['target_anchor'])} | "
                         f"{fmt(m['target_heldout'])} | {fmt(m['kept'])} | {fmt(m['other'])} | {fmt(m['quality'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    from pure_fast.adapters import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--config", action="append", default=None, help="a JSON dict of PURE options (repeatable)")
    p.add_argument("--no-multi", action="store_true")
    p.add_argument("--name", default="pure_basis_dev", help="results file name (without .json / .md)")
    args = p.parse_args(argv)
    configs = [{**_BASE, **json.loads(c)} for c in args.config] if args.config else CONFIGS
    if args.threads:
        torch.set_num_threads(args.threads)
    concepts = [c for cs in protocol.split_concepts("dev").values() for c in cs]
    protocol.check_split(concepts, "dev")
    sets = [] if args.no_multi else protocol.multi_concept_sets(split="dev")
    for st in sets:
        protocol.check_split(st["forget"], "dev")
    command = ("python bench/explore_pure_basis.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    t0 = time.perf_counter()
    adapter = load_model("toy")
    import pure_fast.methods.pure  # noqa: F401 - loaded before reuse_collections patches it
    res = []
    with reuse_collections():
        for cfg in configs:
            t1 = time.perf_counter()
            r = score_configuration(adapter, "pure", cfg, concepts, TUNE)
            r["multi"] = multi_scores(adapter, cfg, sets)
            r["seconds"] = round(time.perf_counter() - t1, 1)
            print(f"{json.dumps(cfg)}: objective {r['objective']:.3f} ({r['seconds']:.0f} s)", flush=True)
            res.append(r)
    doc = {"world": protocol.WORLD.__name__, "concepts": concepts, "tuning_seeds": list(TUNE.seeds),
           "settings": TUNE.to_json(), "multi_sets": sets, "configurations": res,
           "seconds": round(time.perf_counter() - t0, 1), "provenance": toy_bench.provenance(command)}
    os.makedirs(args.out_dir, exist_ok=True)
    report.write_json(os.path.join(args.out_dir, args.name + ".json"), toy_bench.json_ready(doc))
    report.write_text(os.path.join(args.out_dir, args.name + ".md"), markdown(toy_bench.json_ready(doc)))
    print(markdown(toy_bench.json_ready(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
