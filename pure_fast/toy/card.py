"""The toy model's card: ``python -m pure_fast.toy.card`` measures the unedited model's concept accuracy
on canonical prompts (per the detectors) and rewrites ``model_card.json`` + ``MODEL_CARD.md``.

Accuracy of a concept = the fraction of images generated from its canonical prompts (the canonical
template with canonical names, the two other categories enumerated; ``--seeds`` seeds each) whose
detected label in the concept's category equals the concept. Required: >= 0.85 per concept.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..fileio import write_text
from . import world

REQUIRED = 0.85


def _load(weights_dir: Path) -> dict:
    p = weights_dir / "model_card.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write_card(weights_dir: Path, *, training: dict | None = None, unet_params: int | None = None,
               accuracy: dict | None = None, detectors: dict | None = None, evaluation: dict | None = None,
               extra: dict | None = None):
    """Merge the given sections into model_card.json and regenerate MODEL_CARD.md."""
    weights_dir = Path(weights_dir)
    card = _load(weights_dir)
    card.setdefault("model", "pure_fast toy text-to-image model (pixel-space UNet2DConditionModel + MiniLM)")
    cfg_path = weights_dir / "config.json"
    if cfg_path.exists():
        card["config"] = json.loads(cfg_path.read_text())
        card["config"].get("training", {}).pop("loss_log", None)
    if training is not None:
        card["training"] = {k: v for k, v in training.items() if k != "loss_log"}
    if unet_params is not None:
        card["unet_params"] = unet_params
    if detectors is not None:
        card["detectors"] = detectors
    if accuracy is not None:
        card["concept_accuracy"] = accuracy
    if evaluation is not None:
        card["concept_accuracy_eval"] = evaluation
    if detectors is None and (weights_dir / "detector.json").exists() and "detectors" not in card:
        card["detectors"] = json.loads((weights_dir / "detector.json").read_text())
    if extra:
        card.update(extra)
    write_text(weights_dir / "model_card.json", json.dumps(card, indent=1))
    write_text(weights_dir / "MODEL_CARD.md", _markdown(card))
    return card


def _markdown(card: dict) -> str:
    tr = card.get("training", {})
    cfg = card.get("config", {})
    lines = [
        "# pure_fast toy model",
        "",
        "A small pixel-space diffusers `UNet2DConditionModel` (16x16 RGB) conditioned on frozen "
        "all-MiniLM-L6-v2 token states (384-d), trained with DDPM (epsilon, cosine betas), 10 % caption "
        "dropout to \"\" for classifier-free guidance, EMA; sampled with DDIM. It renders the toy world "
        "(`pure_fast/toy/world.py`): shapes x colours x background patterns. Weights: EMA, fp16 safetensors.",
        "",
        "## Configuration",
        "",
        f"- UNet: `{json.dumps(cfg.get('unet', {}))}`",
        f"- parameters: {card.get('unet_params')}",
        f"- scheduler: `{json.dumps(cfg.get('scheduler', {}))}`",
        "",
        "## Training",
        "",
    ]
    for k in ("steps", "batch_size", "lr", "ema_decay", "caption_dropout", "seed", "size", "final_loss",
              "train_seconds", "threads", "device", "commit"):
        if k in tr:
            lines.append(f"- {k}: {tr[k]}")
    det = card.get("detectors")
    if det:
        lines += ["", "## Detectors (independent of the diffusion model)", ""]
        for k, v in det.items():
            lines.append(f"- {k}: {v}")
    acc = card.get("concept_accuracy")
    if acc:
        ev = card.get("concept_accuracy_eval", {})
        lines += ["", "## Unedited model: concept accuracy on canonical prompts", "",
                  f"Settings: `{json.dumps(ev)}`. Required >= {REQUIRED:.2f} per concept.", "",
                  "| category | concept | accuracy | n | ok |", "|---|---|---|---|---|"]
        for cat, members in world.CATEGORIES.items():
            for c in members:
                if c in acc:
                    a = acc[c]
                    lines.append(f"| {cat} | {c} | {a['accuracy']:.3f} | {a['n']} | {'yes' if a['accuracy'] >= REQUIRED else '**NO**'} |")
        failing = [c for c, a in acc.items() if a["accuracy"] < REQUIRED]
        lines += ["", "Below the requirement: " + (", ".join(f"{c} ({acc[c]['accuracy']:.3f})" for c in failing) if failing else "none") + "."]
    sweep = card.get("guidance_sweep")
    if sweep:
        lines += ["", "## Guidance sweep (1 seed, 20 DDIM steps, all 150 canonical prompts)", "",
                  "| guidance:steps | shape | colour | background | worst concept |", "|---|---|---|---|---|"]
        for k, v in sweep.items():
            lines.append(f"| {k} | {v['shape']} | {v['colour']} | {v['background']} | {v['worst']} |")
    for note in card.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def measure(adapter, *, seeds=(0, 1), steps: int = 20, guidance: float | None = None, batch_size: int = 75,
            progress: bool = True) -> dict:
    """Per-concept accuracy of ``adapter`` on canonical prompts. Every full (shape, colour, background)
    canonical prompt is generated once per seed; each image counts for its three concepts."""

    from .detectors import detect

    triples = [(s, c, b) for s in world.CATEGORIES["shape"] for c in world.CATEGORIES["colour"]
               for b in world.CATEGORIES["background"]]
    prompts = [world.canonical_prompt(*t) for t in triples]
    imgs = adapter.generate(prompts, list(seeds), steps=steps, guidance_scale=guidance, batch_size=batch_size,
                            progress=progress)
    arr = np.stack([np.asarray(imgs[i][j]) for i in range(len(prompts)) for j in range(len(seeds))])
    labels = [t for t in triples for _ in seeds]
    det = detect(arr)
    hits: dict[str, list[int]] = {}
    for k, (s, c, b) in enumerate(labels):
        for cat, want in (("shape", s), ("colour", c), ("background", b)):
            hits.setdefault(want, []).append(int(det[cat][k] == want))
    return {c: {"accuracy": round(float(np.mean(h)), 4), "n": len(h)} for c, h in hits.items()}


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(prog="python -m pure_fast.toy.card", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="print, do not write the card")
    p.add_argument("--set-default-guidance", type=float, default=None,
                   help="store this CFG scale as the model's default_guidance in config.json (and measure with it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..adapters.toy import load_toy
    from .model import WEIGHTS_DIR

    wd = Path(args.weights) if args.weights else WEIGHTS_DIR
    if args.set_default_guidance is not None and not args.dry_run:
        cfg = json.loads((wd / "config.json").read_text())
        cfg["default_guidance"] = args.set_default_guidance
        write_text(wd / "config.json", json.dumps(cfg, indent=1))
    adapter = load_toy(weights_dir=wd)
    t0 = time.time()
    acc = measure(adapter, seeds=tuple(range(args.seeds)), steps=args.steps, guidance=args.guidance)
    ev = {"seeds": args.seeds, "ddim_steps": args.steps,
          "guidance": adapter.default_guidance if args.guidance is None else args.guidance,
          "prompts": "canonical template, canonical names, all 150 triples", "seconds": round(time.time() - t0, 1)}
    for cat, members in world.CATEGORIES.items():
        print(cat, " ".join(f"{c}={acc[c]['accuracy']:.3f}" for c in members))
    failing = {c: a["accuracy"] for c, a in acc.items() if a["accuracy"] < REQUIRED}
    print("below", REQUIRED, ":", failing or "none")
    if not args.dry_run:
        write_card(wd, accuracy=acc, evaluation=ev)


if __name__ == "__main__":
    main()
