"""The v2 toy model's card: ``python -m pure_fast.toy.v2.card --weights DIR`` measures the unedited model's
per-concept accuracy with the v2 detectors and rewrites ``model_card.json`` + ``MODEL_CARD.md`` in DIR.

- canonical accuracy of concept c: the fraction of images generated from c's canonical prompts (the
  canonical template with canonical names; the two other slots enumerated, ``--canonical-per-concept`` of
  them spread evenly, default all) whose detected label in c's category is c. Every prompt is generated once
  per seed and each image counts for the three concepts it names. Required >= 0.95 per concept.
- held-out accuracy of c: the same on ``world.heldout_prompts(c, n)`` (held-out templates and surface
  forms; the other slots random); only c's category is checked. Required >= 0.90 per concept.

Seeds: ``--seeds`` seeds from 1000 on (disjoint from the collection seeds 0, 1 of the erasure methods).
``--guidance-sweep G,G,...`` first picks the CFG scale on DEV concepts only (mean canonical accuracy,
``--sweep-per-concept`` prompts, one seed), stores it as the model's ``default_guidance`` in config.json,
then measures every concept with it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ...fileio import write_text
from . import world
from .model import WEIGHTS_DIR

REQUIRED_CANONICAL = 0.95
REQUIRED_HELDOUT = 0.90
SEED_BASE = 1000


def _load(weights_dir: Path) -> dict:
    p = weights_dir / "model_card.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write_card(weights_dir, *, training: dict | None = None, accuracy: dict | None = None,
               evaluation: dict | None = None, extra: dict | None = None) -> dict:
    """Merge the given sections into model_card.json (with the shape summary and the v2 detectors'
    held-out accuracy) and regenerate MODEL_CARD.md."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    card = _load(weights_dir)
    card["model"] = "pure_fast toy model v2 (SD-shaped UNet2DConditionModel on space-to-depth latents + MiniLM)"
    cfg_path = weights_dir / "config.json"
    unet_cfg = None
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg.get("training", {}).pop("loss_log", None)
        card["config"] = cfg
        unet_cfg = cfg.get("unet")
    card["shape"] = _shape(unet_cfg)
    det = WEIGHTS_DIR / "detector.json"
    if det.exists():
        d = json.loads(det.read_text())
        card["detectors"] = {"heldout_category_accuracy": d["heldout"]["category_accuracy"],
                             "worst_concept": d["heldout"]["worst_concept"], "none_accuracy": d["heldout"]["none_accuracy"],
                             "heldout_n": d["heldout"]["n"], "train_steps": d["train_steps"],
                             "colour_rule": d["colour_rule"], "command": d.get("command")}
    if training is not None:
        card["training"] = training
    if accuracy is not None:
        card["concept_accuracy"] = accuracy
    if card.get("concept_accuracy"):
        card["concept_accuracy_summary"] = accuracy_summary(card["concept_accuracy"])
    if evaluation is not None:
        card["concept_accuracy_eval"] = evaluation
    if extra:
        card.update(extra)
    write_text(weights_dir / "model_card.json", json.dumps(card, indent=1))
    write_text(weights_dir / "MODEL_CARD.md", _markdown(card))
    return card


def accuracy_summary(acc: dict) -> dict:
    """What the card's table says in numbers: how many concepts meet both bars, which do not (a concept not
    measured does not), and the mean accuracies overall and per category."""
    failing, per_cat = [], {}
    for cat, members in world.CATEGORIES.items():
        got = [acc[c] for c in members if c in acc]
        failing += [c for c in members if c not in acc or acc[c]["canonical"] < REQUIRED_CANONICAL
                    or acc[c]["heldout"] < REQUIRED_HELDOUT]
        per_cat[cat] = {"canonical": round(sum(a["canonical"] for a in got) / len(got), 4) if got else None,
                        "heldout": round(sum(a["heldout"] for a in got) / len(got), 4) if got else None,
                        "n_pass": sum(1 for c in members if c not in failing), "n": len(members)}
    vals = list(acc.values())
    n = len(world.all_concepts())
    return {"n_concepts": n, "n_pass": n - len(failing), "failing": failing,
            "canonical_mean": round(sum(a["canonical"] for a in vals) / len(vals), 4),
            "heldout_mean": round(sum(a["heldout"] for a in vals) / len(vals), 4), "categories": per_cat,
            "required": {"canonical": REQUIRED_CANONICAL, "heldout": REQUIRED_HELDOUT}}


def _shape(unet_cfg: dict | None) -> dict:
    import torch

    from .model import UNET_CONFIG, build_unet, sd_shape_violations, shape_summary

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in (unet_cfg or UNET_CONFIG).items()}
    with torch.device("meta"):
        unet = build_unet(cfg)
    return {**shape_summary(unet), "violations": sd_shape_violations(unet)}


def _markdown(card: dict) -> str:
    sh = card["shape"]
    ref = sh["sd_reference"]
    lines = [
        "# pure_fast toy model v2", "",
        "A diffusers `UNet2DConditionModel` shaped like Stable Diffusion's, on the latents of an exact fixed "
        f"\"VAE\" (space-to-depth by {sh['latent']['factor']}: a 32x32x3 image is a {32 // sh['latent']['factor']}x"
        f"{32 // sh['latent']['factor']}x{3 * sh['latent']['factor'] ** 2} latent, bit for bit), conditioned on frozen "
        "all-MiniLM-L6-v2 token states (384-d); DDPM (epsilon, cosine betas), 10 % caption dropout for CFG, "
        "EMA, sampled with DDIM. World: `pure_fast/toy/v2/world.py` (36 glyphs A-Z 0-9, 10 shapes, 10 colours, "
        "8 backgrounds; one glyph or shape per image). Weights: EMA, fp16 safetensors.", "",
        "## Shape", "",
        f"- resolution levels: {sh['levels']} (latent {', '.join(str(32 // sh['latent']['factor'] >> i) for i in range(sh['levels']))}), block widths {sh['block_out_channels']}; "
        f"cross-attention in every down, mid and up block ({sh['cross_attention_layers']} `attn2` layers), each "
        "in a transformer block with self- and cross-attention",
        f"- cross-attention K/V output widths: {sh['kv_widths']}; head channels: {sh['head_channels']}",
        f"- parameters: {sh['parameters']:,} (fp16: {sh['parameters'] * 2 / 1e6:.1f} MB)",
        f"- SD1.5: levels {list(ref['SD1.5']['levels'])}, K/V {ref['SD1.5']['kv'][0]}-{ref['SD1.5']['kv'][1]}, "
        f"heads of {ref['SD1.5']['head_channels'][0]}-{ref['SD1.5']['head_channels'][1]} ch; SDXL: levels "
        f"{list(ref['SDXL']['levels'])} (no cross-attention at 320), K/V {ref['SDXL']['kv'][0]}-{ref['SDXL']['kv'][1]}, "
        f"heads of 64 ch. Ours: K/V {min(sh['kv_widths'])}-{max(sh['kv_widths'])} = "
        f"{min(sh['kv_widths']) / 320:.2f}-{max(sh['kv_widths']) / 1280:.2f}x SD1.5's range ends and "
        f"{min(sh['kv_widths']) / 640:.2f}-{max(sh['kv_widths']) / 1280:.2f}x SDXL's.",
        "- shape requirements (>= 3 levels, cross-attention everywhere, K/V >= 128, heads >= 32 ch): "
        + ("met" if not sh["violations"] else "NOT met: " + "; ".join(sh["violations"])),
    ]
    det = card.get("detectors")
    if det:
        lines += ["", "## Detectors (trained on renders only, never on the diffusion model)", "",
                  "| category | held-out accuracy | worst concept |", "|---|---|---|"]
        for cat, acc in det["heldout_category_accuracy"].items():
            w = det["worst_concept"][cat]
            lines.append(f"| {cat} | {acc:.4f} | {w['concept']} ({w['accuracy']:.4f}) |")
        lines += ["", f"Held-out renders: {det['heldout_n']} (seed 12345); no-object renders detected as 'none': "
                  f"{det['none_accuracy']}. Colour: {det['colour_rule']}. Command: `{det.get('command')}`."]
    tr = card.get("training")
    lines += ["", "## Training", ""]
    if tr:
        for k, v in tr.items():
            lines.append(f"- {k}: {v}")
    else:
        lines.append("- not trained yet (see the plan below)")
    acc = card.get("concept_accuracy")
    if acc:
        ev = card.get("concept_accuracy_eval", {})
        lines += ["", "## Unedited model: per-concept accuracy", "",
                  f"Settings: `{json.dumps(ev)}`. Required: canonical >= {REQUIRED_CANONICAL:.2f}, held-out >= "
                  f"{REQUIRED_HELDOUT:.2f}.", "",
                  "| category | concept | split | canonical | n | held-out | n | ok |", "|---|---|---|---|---|---|---|---|"]
        summary = accuracy_summary(acc)
        failing = summary["failing"]
        for cat, members in world.CATEGORIES.items():
            for c in members:
                a = acc.get(c)
                if a is None:
                    lines.append(f"| {cat} | {c} | {world.split_of(c)} | - | 0 | - | 0 | **not measured** |")
                    continue
                lines.append(f"| {cat} | {c} | {world.split_of(c)} | {a['canonical']:.3f} | {a['n_canonical']} | "
                             f"{a['heldout']:.3f} | {a['n_heldout']} | {'**NO**' if c in failing else 'yes'} |")
        lines += ["", f"Below the requirement: {', '.join(failing) if failing else 'none'} "
                  f"({len(failing)} of {summary['n_concepts']}). Mean accuracy {summary['canonical_mean']:.3f} "
                  f"canonical, {summary['heldout_mean']:.3f} held-out; per category (canonical / held-out, concepts "
                  "meeting both bars): " + "; ".join(
                      f"{cat} {v['canonical']:.3f} / {v['heldout']:.3f}, {v['n_pass']} of {v['n']}"
                      for cat, v in summary["categories"].items() if v["canonical"] is not None) + "."]
    for note in card.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _spread(items: list, n: int | None) -> list:
    if n is None or n >= len(items):
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def measure(adapter, concepts=None, *, seeds=tuple(range(SEED_BASE, SEED_BASE + 4)), steps: int = 20,
            guidance: float | None = None, canonical_per_concept: int | None = None, heldout_per_concept: int = 8,
            batch_size: int = 256, progress: bool = True) -> dict:
    """Per-concept canonical and held-out accuracy of ``adapter`` (see the module doc)."""
    from ...evaluate.toy_bench import generate_arrays
    from .detectors import detect

    concepts = list(concepts or world.all_concepts())
    canon: dict[str, dict] = {}
    for c in concepts:
        for p, lab in _spread(world.canonical_prompts(c), canonical_per_concept):
            canon[p] = lab
    held = [(c, p) for c in concepts for p in world.heldout_prompts(c, heldout_per_concept)]
    prompts = [p for p in canon for _ in seeds] + [p for _, p in held for _ in seeds]
    sds = [s for _ in canon for s in seeds] + [s for _ in held for s in seeds]
    imgs = generate_arrays(adapter, prompts, sds, steps=steps, guidance=guidance, batch_size=batch_size,
                           progress=progress, desc="card")
    det = detect(imgs)
    hits: dict[str, dict[str, list[int]]] = {c: {"canonical": [], "heldout": []} for c in concepts}
    k = 0
    for lab in canon.values():
        for _ in seeds:
            for cat, want in lab.items():
                if want in hits:
                    hits[want]["canonical"].append(int(det[cat][k] == want))
            k += 1
    for c, _ in held:
        for _ in seeds:
            hits[c]["heldout"].append(int(det[world.category_of(c)][k] == c))
            k += 1
    return {c: {"canonical": round(float(np.mean(h["canonical"])), 4) if h["canonical"] else float("nan"),
                "n_canonical": len(h["canonical"]),
                "heldout": round(float(np.mean(h["heldout"])), 4), "n_heldout": len(h["heldout"])}
            for c, h in hits.items()}


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(prog="python -m pure_fast.toy.v2.card", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(WEIGHTS_DIR), help="weights folder (config.json + unet.safetensors)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--guidance-sweep", default=None, help="comma-separated CFG scales to choose from on dev concepts")
    p.add_argument("--sweep-per-concept", type=int, default=6)
    p.add_argument("--canonical-per-concept", type=int, default=None, help="default: every canonical prompt")
    p.add_argument("--heldout-per-concept", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="print, do not write the card")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ...adapters.toy import load_toy

    wd = Path(args.weights)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    adapter = load_toy(device=args.device, weights_dir=wd)
    t0 = time.time()
    sweep = None
    if args.guidance_sweep:
        dev = [c for cat in world.CATEGORIES for c in world.DEV_CONCEPTS[cat]]
        sweep = {}
        for g in [float(x) for x in args.guidance_sweep.split(",")]:
            r = measure(adapter, dev, seeds=(SEED_BASE + 100,), steps=args.steps, guidance=g,
                        canonical_per_concept=args.sweep_per_concept, heldout_per_concept=2,
                        batch_size=args.batch_size, progress=False)
            sweep[g] = round(float(np.mean([v["canonical"] for v in r.values()] + [v["heldout"] for v in r.values()])), 4)
            print(f"guidance {g}: dev mean accuracy {sweep[g]}", flush=True)
        best = max(sweep, key=sweep.get)
        args.guidance = best
        if not args.dry_run:
            cfg = json.loads((wd / "config.json").read_text())
            cfg["default_guidance"] = best
            write_text(wd / "config.json", json.dumps(cfg, indent=1))
            adapter.default_guidance = best
    seeds = tuple(range(SEED_BASE, SEED_BASE + args.seeds))
    acc = measure(adapter, seeds=seeds, steps=args.steps, guidance=args.guidance,
                  canonical_per_concept=args.canonical_per_concept, heldout_per_concept=args.heldout_per_concept,
                  batch_size=args.batch_size)
    ev = {"seeds": list(seeds), "ddim_steps": args.steps,
          "guidance": adapter.default_guidance if args.guidance is None else args.guidance,
          "guidance_sweep_on_dev": sweep, "canonical_per_concept": args.canonical_per_concept or "all",
          "heldout_per_concept": args.heldout_per_concept, "device": args.device, "seconds": round(time.time() - t0, 1)}
    for cat, members in world.CATEGORIES.items():
        print(cat, " ".join(f"{c}={acc[c]['canonical']:.2f}/{acc[c]['heldout']:.2f}" for c in members))
    failing = [c for c, a in acc.items() if not (a["canonical"] >= REQUIRED_CANONICAL and a["heldout"] >= REQUIRED_HELDOUT)]
    print(f"below the requirement ({REQUIRED_CANONICAL}/{REQUIRED_HELDOUT}): {failing or 'none'}")
    if not args.dry_run:
        write_card(wd, accuracy=acc, evaluation=ev)


if __name__ == "__main__":
    main()
