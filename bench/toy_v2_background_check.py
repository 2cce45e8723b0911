"""Does the v2 toy model draw the background it is asked for, or the one its starting noise suggests?
``python bench/toy_v2_background_check.py --weights DIR``.

One object and colour ("a blue triangle"), every background, the same ``--seeds`` for every background, at each
``--guidance`` scale (DDIM 20 steps). If the prompt decides the background, each column (one background) is
detected as that background for every seed; if the starting noise decides it, each *row* (one seed) shows the
same background across the columns. Writes a grid (top row: renders of the asked background; one row per
scale and seed, each tile labelled with the detected background) and a JSON with the detections and two
numbers per scale: ``prompt_accuracy`` (detected == asked) and ``seed_agreement`` (the fraction of tiles whose
detection equals the most common detection in its seed's row: 1/8 when the prompt decides every tile, eight
different backgrounds in each row; 1 when the seed decides them all).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="exported weights folder (config.json + unet.safetensors)")
    p.add_argument("--object", default="triangle")
    p.add_argument("--colour", default="blue")
    p.add_argument("--seeds", default="1000,1001,1002", help="comma-separated (the card's seeds start at 1000)")
    p.add_argument("--guidance", default="1.5,3", help="comma-separated CFG scales")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--png", default="bench/results/toy_v2_background_check.png")
    p.add_argument("--json", default="bench/results/toy_v2_background_check.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from PIL import Image, ImageDraw

    from pure_fast.adapters.toy import load_toy
    from pure_fast.evaluate.toy_bench import generate_arrays
    from pure_fast.fileio import atomic_path, write_text
    from pure_fast.toy.v2 import detectors, world

    seeds = [int(s) for s in a.seeds.split(",")]
    scales = [float(g) for g in a.guidance.split(",")]
    bgs = list(world.CATEGORIES["background"])
    ad = load_toy(weights_dir=a.weights)
    prompts = [world.canonical_prompt(a.object, a.colour, b) for b in bgs]
    runs = []
    for g in scales:
        imgs = generate_arrays(ad, [q for q in prompts for _ in seeds], seeds * len(bgs), steps=a.steps, guidance=g,
                               batch_size=8 * len(seeds))
        det = detectors.detect(imgs)["background"]
        grid = [[det[i * len(seeds) + s] for i in range(len(bgs))] for s in range(len(seeds))]  # [seed][bg]
        acc = float(np.mean([grid[s][i] == bgs[i] for s in range(len(seeds)) for i in range(len(bgs))]))
        agree = float(np.mean([Counter(row).most_common(1)[0][1] / len(row) for row in grid]))
        runs.append({"guidance": g, "detected": {str(sd): row for sd, row in zip(seeds, grid)},
                     "prompt_accuracy": round(acc, 4), "seed_agreement": round(agree, 4), "_imgs": imgs})
        print(f"CFG {g}: prompt accuracy {acc:.2f}, seed agreement {agree:.2f}")

    tile = 96
    refs = np.stack([world.render_reference(world.labels_of(a.object, a.colour, b), seed=5)[0] for b in bgs])
    n_rows = 1 + len(scales) * len(seeds)
    canvas = Image.new("RGB", (tile * len(bgs), tile * n_rows + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, b in enumerate(bgs):
        canvas.paste(Image.fromarray(refs[i]).resize((tile, tile), Image.NEAREST), (i * tile, 0))
        draw.text((i * tile + 2, tile * n_rows + 2), b, fill="black")
    r = 1
    for run in runs:
        for s, sd in enumerate(seeds):
            for i in range(len(bgs)):
                im = run["_imgs"][i * len(seeds) + s]
                canvas.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST), (i * tile, r * tile))
                draw.text((i * tile + 2, r * tile + 2), f"cfg {run['guidance']:g} s{sd}: {run['detected'][str(sd)][i]}",
                          fill="white")
            r += 1
    with atomic_path(a.png) as tmp:
        canvas.save(tmp, format="PNG")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    cfg = json.loads((Path(a.weights) / "config.json").read_text())
    doc = {"what": "v2 toy model: is the background decided by the prompt or by the starting noise?",
           "command": "python bench/toy_v2_background_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "weights": os.path.relpath(os.path.abspath(a.weights), REPO),
           "training_step": cfg.get("training", {}).get("step"), "object": a.object, "colour": a.colour,
           "seeds": seeds, "backgrounds": bgs, "ddim_steps": a.steps,
           "runs": [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs],
           "commit": commit, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__}}
    write_text(a.json, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.png} and {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
