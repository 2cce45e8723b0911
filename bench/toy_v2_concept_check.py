"""A closer look at a few v2 concepts than the card's sample: more prompts and seeds per concept, and what the
detector sees when it does not see the concept (to tell a real miss from the card's sampling noise).

    python bench/toy_v2_concept_check.py --weights out/toy_v2/vpred_export --concepts circle,square \\
        [--prompts 16] [--seeds 8] [--guidance 1.5] [--steps 20] [--threads 2] [--json PATH]

Canonical prompts (spread over the concept's list) and held-out paraphrases, each on seeds 1000.. (the card's
seeds and more); accuracy = fraction of images whose detected label in the concept's category is the concept.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--concepts", required=True, help="comma-separated")
    p.add_argument("--prompts", type=int, default=16, help="canonical and held-out prompts per concept")
    p.add_argument("--seeds", type=int, default=8, help="seeds 1000 .. 1000+N-1")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from pure_fast.adapters.toy import load_toy
    from pure_fast.evaluate.toy_bench import generate_arrays
    from pure_fast.fileio import write_text
    from pure_fast.toy.v2 import card, world
    from pure_fast.toy.v2.detectors import detect

    concepts = args.concepts.split(",")
    unknown = [c for c in concepts if c not in world.all_concepts()]
    if unknown:
        raise SystemExit(f"unknown concept(s) {', '.join(unknown)}; use the v2 world's (pure_fast/toy/v2/world.py)")
    t0 = time.perf_counter()
    ad = load_toy(weights_dir=args.weights)
    seeds = list(range(1000, 1000 + args.seeds))
    out = {}
    for c in concepts:
        cat = world.category_of(c)
        canon = [pr for pr, _ in card._spread(world.canonical_prompts(c), args.prompts)]
        res = {}
        for kind, ps in (("canonical", canon), ("heldout", world.heldout_prompts(c, args.prompts))):
            prompts = [pr for pr in ps for _ in seeds]
            imgs = generate_arrays(ad, prompts, [s for _ in ps for s in seeds], steps=args.steps,
                                   guidance=args.guidance, batch_size=256)
            labels = collections.Counter(detect(imgs)[cat])
            res[kind] = {"n": len(prompts), "accuracy": round(labels[c] / len(prompts), 4),
                         "labels": dict(labels.most_common())}
        out[c] = res
        print(c, json.dumps(res), flush=True)
    doc = {"command": "python bench/toy_v2_concept_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "weights": args.weights, "seeds": seeds, "steps": args.steps,
           "guidance": args.guidance if args.guidance is not None else ad.default_guidance,
           "card_requires": {"canonical": card.REQUIRED_CANONICAL, "heldout": card.REQUIRED_HELDOUT},
           "concepts": out, "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        write_text(args.json, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
