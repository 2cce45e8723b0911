"""Where a v2 toy-model training run stands, from its checkpoint: ``python bench/toy_v2_progress.py --run DIR``.

Two measurements that need no card run (minutes instead of the card's tens of minutes on CPU):

- **denoising error per timestep** of the EMA weights on one fixed batch of fresh renders (data seed 7, a step
  index no training run reaches): epsilon MSE and the implied x0 MSE, next to the x0 variance (the error of
  predicting the mean image: a model is useful at timestep t only when its x0 MSE is below it);
- **a small generation check**: 17 canonical prompts (every third glyph, every other shape; colour and
  background cycling), DDIM 20 steps at the given CFG scales, seeds from 1000 (the card's seeds), scored by
  the v2 detectors (object, colour, background accuracy), and a grid picture of the last scale.

Appends one record (step, loss, rate, the numbers above, commit, date) to ``--json`` (default
``bench/results/toy_v2_training_cpu.json``, key ``progress``) and writes the grid to ``--png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TIMESTEPS = (10, 50, 100, 250, 500, 750, 950)


def denoising_errors(unet, cfg: dict, n: int = 64, kind: str = "epsilon") -> list[dict]:
    """``kind``: what the UNet predicts (the run's ``prediction_type``); errors are of the implied eps and x0."""
    from pure_fast.toy.v2 import model as M, train as T

    x0, caps, noise, _ = T.step_batch(7, 10**9, n, 0.0, "cpu", M.latent_of(cfg)["factor"])
    cond = T.encode_captions(caps, "cpu")
    alphas = M.train_scheduler().alphas_cumprod
    out = []
    with torch.no_grad():
        for t in TIMESTEPS:
            a = alphas[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = unet(xt, torch.full((n,), t), encoder_hidden_states=cond).sample
            eps = T.eps_from_prediction(xt, pred, a, kind)
            x0_hat = T.x0_from_prediction(xt, pred, a, kind)
            out.append({"t": t, "eps_mse": round(float(((eps - noise) ** 2).mean()), 4),
                        "x0_mse": round(float(((x0_hat - x0) ** 2).mean()), 4),
                        "x0_variance": round(float(x0.var()), 4)})
    return out


def generation_check(weights_dir: Path, guidances: list[float], png: str | None) -> list[dict]:
    from pure_fast.adapters.toy import load_toy
    from pure_fast.evaluate.toy_bench import generate_arrays
    from pure_fast.toy.v2 import world
    from pure_fast.toy.v2.detectors import detect

    adapter = load_toy(weights_dir=weights_dir)
    objs = world.CATEGORIES["glyph"][::3] + world.CATEGORIES["shape"][::2]
    cols, bgs = world.CATEGORIES["colour"], world.CATEGORIES["background"]
    labels = [(o, cols[i % len(cols)], bgs[i % len(bgs)]) for i, o in enumerate(objs)]
    prompts = [world.canonical_prompt(*lab) for lab in labels]
    seeds = [1000 + i for i in range(len(prompts))]
    rows, imgs = [], None
    for g in guidances:
        imgs = generate_arrays(adapter, prompts, seeds, steps=20, guidance=g)
        det = detect(imgs)
        acc = {slot: round(float(np.mean([det[slot][i] == lab[j] for i, lab in enumerate(labels)])), 3)
               for j, slot in enumerate(("object", "colour", "background"))}
        rows.append({"guidance": g, "accuracy": acc, "n": len(prompts)})
    if png and imgs is not None:
        from PIL import Image

        from pure_fast.fileio import atomic_path

        per_row = 9
        pad = np.zeros((-len(imgs) % per_row, *imgs.shape[1:]), np.uint8)
        tiles = np.concatenate([imgs, pad])
        grid = np.concatenate([np.concatenate(list(tiles[r * per_row:(r + 1) * per_row]), 1)
                               for r in range(len(tiles) // per_row)], 0)
        with atomic_path(png, ".png") as tmp:
            Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(tmp, format="PNG")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a pure_fast.toy.v2.train --out folder (state.json + ema.safetensors)")
    ap.add_argument("--guidance", default="1,2,4", help="CFG scales of the generation check")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "toy_v2_training_cpu.json"))
    ap.add_argument("--png", default=str(REPO / "bench" / "results" / "toy_v2_progress.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file, save_file

    from pure_fast.fileio import write_text
    from pure_fast.toy.v2 import model as M

    run = Path(args.run)
    if not (run / "state.json").is_file() or not (run / "ema.safetensors").is_file():
        raise SystemExit(f"{run}: no training checkpoint (state.json + ema.safetensors); pass a train --out folder")
    state = json.loads((run / "state.json").read_text())
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in state["unet_config"].items()}
    ema = load_file(str(run / "ema.safetensors"))
    unet = M.build_unet(cfg)
    unet.load_state_dict(ema)
    unet.eval()
    kind = state.get("prediction_type") or "epsilon"  # runs before the option trained epsilon
    errors = denoising_errors(unet, cfg, kind=kind)
    with tempfile.TemporaryDirectory() as tmp:  # the EMA weights as an exported folder (fp16, as shipped)
        wd = Path(tmp)
        save_file({k: v.half().contiguous() for k, v in ema.items()}, str(wd / "unet.safetensors"))
        (wd / "config.json").write_text(json.dumps({
            "unet": state["unet_config"], "scheduler": dict(M.SCHEDULER_CONFIG, prediction_type=kind),
            "text_encoder": {"max_tokens": 32},
            "size": 32, "latent": M.latent_of(cfg), "null_caption": ""}))
        gen = generation_check(wd, [float(g) for g in args.guidance.split(",")], args.png)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=str(REPO)).stdout.strip()
    rec = {"run": str(run), "step": state["step"], "total_steps": state.get("total_steps"),
           "batch_size": state.get("batch_size"), "samples": state["step"] * int(state.get("batch_size") or 0),
           "running_loss": round(float(state.get("running_loss") or float("nan")), 4),
           "steps_per_second": state.get("steps_per_second"), "elapsed_s": round(float(state.get("elapsed", 0)), 1),
           "threads": state.get("threads"), "total_changes": state.get("total_changes"), "prediction_type": kind,
           "denoising_error": errors, "generation_check": gen, "grid": os.path.relpath(args.png, REPO),
           "command": "python bench/toy_v2_progress.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": commit, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("progress", []).append(rec)
    write_text(path, json.dumps(doc, indent=1))
    for e in errors:
        print(f"t={e['t']:>3}: eps MSE {e['eps_mse']:.4f}, x0 MSE {e['x0_mse']:.4f} (mean-image baseline {e['x0_variance']:.4f})")
    for g in gen:
        print(f"CFG {g['guidance']}: object {g['accuracy']['object']:.2f}, colour {g['accuracy']['colour']:.2f}, "
              f"background {g['accuracy']['background']:.2f} ({g['n']} canonical prompts)")
    print(f"step {rec['step']}/{rec['total_steps']}; appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
