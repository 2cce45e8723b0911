"""PURE stage timings (collect / estimate / edit / fingerprint / save) on the tiny pipeline and on the
SD1.5 architecture with random weights. CPU: a reduced setting (256 px, 1 seed, 4-step schedule, 2 recorded
steps) so it finishes in minutes; CUDA: bf16, 512 px, the defaults.

    python bench/bench_pure_stages.py --device cpu [--arch sd15] [--concepts 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_one(arch: str, device: str, concepts: int) -> dict:
    import pure_fast
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.testing import build_architecture_pipeline, build_tiny_pipeline

    os.environ["PURE_FAST_PROGRESS"] = "0"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    pipe = build_tiny_pipeline("sd1") if arch == "tiny" else build_architecture_pipeline(arch, dtype=dtype)
    ad = wrap_pipeline(pipe, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    names = ["Van Gogh", "Claude Monet", "Pablo Picasso", "Frida Kahlo", "Salvador Dali", "Andy Warhol",
             "Rembrandt", "Hokusai", "Edvard Munch", "Gustav Klimt"]
    forget = [names[i % len(names)] + ("" if i < len(names) else f" {i}") for i in range(concepts)]
    if device == "cpu":
        opts = dict(size=32 if arch == "tiny" else 256, seeds=(0,), steps=4, record_steps=2)
    else:
        opts = {}
    edit = pure_fast.erase(ad, forget, ["a photograph", "a watercolor"], category="style", progress=False, **opts)
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        edit.save(os.path.join(d, "e.safetensors"))
        save_s = time.perf_counter() - t1
        size = os.path.getsize(os.path.join(d, "e.safetensors"))
    t = dict(edit.stats["timings"])
    t["save_s"] = save_s
    return {"name": f"pure_stages_{arch}_{concepts}c", "arch": arch, "device": device, "dtype": str(dtype),
            "concepts": concepts, "options": opts or "defaults", "build_s": build_s, **t, "edit_bytes": size,
            "rows": edit.stats["rows"]}


def run(device: str):
    rows = [run_one("tiny", device, 1), run_one("sd15", device, 1)]
    if device == "cuda":
        rows += [run_one("sd15", device, 10), run_one("sdxl", device, 1), run_one("sdxl", device, 10),
                 run_one("sdxl", device, 50)]
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--concepts", type=int, default=1)
    a = ap.parse_args()
    rows = [run_one(a.arch, a.device, a.concepts)] if a.arch else run(a.device)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
