"""``make demo`` / ``pure-fast demo``: the whole flow end to end.

With the shipped toy model: erase one colour with PURE, write before/after grids of forget, paraphrase and
retain prompts, the edit file, and a one-screen summary of the measurement. Without it (or ``--tiny``):
the same flow on a tiny random SD1-like pipeline built in-process, with activation-level measurements
(random weights draw noise, so the images only show that the flow runs).
"""
from __future__ import annotations

import json
import os
import time


def _toy_available() -> bool:
    try:
        from .adapters.toy import weights_available

        return weights_available()
    except Exception:
        return False


def run_demo(args) -> int:
    if not args.tiny and _toy_available():
        from .evaluate.toy_demo import run_toy_demo

        return run_toy_demo(args)
    return run_tiny_demo(args)


def run_tiny_demo(args) -> int:
    from . import api
    from .adapters import wrap_pipeline
    from .collect.activations import CollectOptions
    from .evaluate.metrics import edit_effect
    from .fileio import atomic_dir
    from .images import grid
    from .prompts import anchor_sets
    from .testing import build_tiny_pipeline

    out = os.path.abspath(args.out_dir)
    if os.path.exists(out) and os.listdir(out):
        import shutil

        shutil.rmtree(out)  # the demo owns its output folder
    from .testing import has_clip_vocabulary

    vocabulary = "clip" if has_clip_vocabulary() else "bytes"
    tokens = "CLIP BPE tokens" if vocabulary == "clip" else "byte tokens (open-clip-torch, the CLIP BPE, is not installed)"
    print(f"demo: tiny random SD1-like pipeline (no pretrained weights here, {tokens}); erasing 'Van Gogh' with PURE")
    t0 = time.perf_counter()
    ad = wrap_pipeline(build_tiny_pipeline("sd1", vocabulary=vocabulary))
    forget, retain = ["Van Gogh"], ["Claude Monet", "Pablo Picasso"]
    opts = dict(size=32, seeds=(0,), steps=6, record_steps=3)
    edit = api.erase(ad, forget, retain, category="style", progress=not args.quiet, **opts)
    f_prompts, r_prompts = anchor_sets(forget, retain, "style")
    effect = edit_effect(ad, edit, f_prompts, r_prompts, opts=CollectOptions(size=32, seeds=(0,), steps=6, record_steps=3))
    prompts = ["a painting in the style of Van Gogh", "a starry night painted by Van Gogh",
               "a painting in the style of Claude Monet", "a portrait by Pablo Picasso"]
    seeds = [0, 1]
    before = ad.generate(prompts, seeds, steps=10, size=32, progress=not args.quiet)
    edit.apply(ad)
    after = ad.generate(prompts, seeds, steps=10, size=32, progress=not args.quiet)
    edit.revert(ad)
    if os.path.isdir(out):
        os.rmdir(out)
    with atomic_dir(out) as tmp:
        edit.save(os.path.join(tmp, "edit.safetensors"))
        rows = [before[i] + after[i] for i in range(len(prompts))]
        grid(rows, prompts, ["before"] * 2 + ["after"] * 2, split_after=2).save(
            os.path.join(tmp, "before_after.png"))
        summary = {"model": "tiny-random-sd1", "forget": forget, "retain": retain, "prompts": prompts,
                   "forget_signal_kept": effect["forget_energy_kept"], "retain_change": effect["retain_change"],
                   "timings": edit.stats["timings"], "seconds": time.perf_counter() - t0}
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(f"forget-specific activation signal kept: {effect['forget_energy_kept']:.3f} (0 = erased)")
    print(f"retain activations changed by:          {effect['retain_change']:.3f} (relative)")
    print("stage times: " + ", ".join(f"{k} {v:.2f}s" for k, v in edit.stats["timings"].items()))
    print(f"wrote {out}/edit.safetensors, before_after.png, summary.json in {time.perf_counter() - t0:.0f} s")
    return 0
