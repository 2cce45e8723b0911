"""PURE stage timings (collect / estimate / edit / fingerprint / save) on the tiny pipeline and on the
SD1.5 architecture with random weights. CPU: a reduced setting (256 px, 1 seed, 4-step schedule, 2 recorded
steps) so it finishes in minutes; CUDA: bf16, 512 px, the defaults.

    python bench/bench_pure_stages.py --device cpu [--arch sd15] [--concepts 1] [--size PX]
                                      [--compare]   # today's open loop vs the current default, same run
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# PURE as it shipped before the closed loop (one open-loop round, variance basis): the erase-time baseline
OPEN_LOOP = {"rounds": 1, "basis": "variance"}


def run_one(arch: str, device: str, concepts: int, size: int | None = None, extra: dict | None = None,
            label: str = "default") -> dict:
    import pure_fast
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.testing import build_architecture_pipeline, build_tiny_pipeline

    os.environ["PURE_FAST_PROGRESS"] = "0"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    if arch == "toy":  # the shipped toy model, its own collection defaults, a dev concept
        ad = pure_fast.load_model("toy", device=device)
        build_s = time.perf_counter() - t0
        edit = pure_fast.erase(ad, ["orange"], ["yellow", "green"], category="colour", progress=False, **(extra or {}))
        t = dict(edit.stats["timings"])
        t["erase_s"] = sum(v for k, v in t.items() if k in ("collect_s", "estimate_s", "edit_s", "loop_collect_s",
                                                              "loop_estimate_s"))
        return {"name": "pure_stages_toy_1c", "variant": label, "rounds": edit.stats.get("rounds"),
                "residual": edit.stats.get("residual"), "arch": arch, "device": device, "build_s": build_s, **t}
    pipe = build_tiny_pipeline("sd1") if arch == "tiny" else build_architecture_pipeline(arch, dtype=dtype)
    ad = wrap_pipeline(pipe, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    names = ["Van Gogh", "Claude Monet", "Pablo Picasso", "Frida Kahlo", "Salvador Dali", "Andy Warhol",
             "Rembrandt", "Hokusai", "Edvard Munch", "Gustav Klimt"]
    forget = [names[i % len(names)] + ("" if i < len(names) else f" {i}") for i in range(concepts)]
    if device == "cpu":
        opts = dict(size=size or (32 if arch == "tiny" else 256), seeds=(0,), steps=4, record_steps=2)
    else:
        opts = dict(size=size) if size else {}
    opts.update(extra or {})
    edit = pure_fast.erase(ad, forget, ["a photograph", "a watercolor"], category="style", progress=False, **opts)
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        edit.save(os.path.join(d, "e.safetensors"))
        save_s = time.perf_counter() - t1
        size = os.path.getsize(os.path.join(d, "e.safetensors"))
    t = dict(edit.stats["timings"])
    t["save_s"] = save_s
    t["erase_s"] = sum(v for k, v in t.items() if k in ("collect_s", "estimate_s", "edit_s", "loop_collect_s",
                                                          "loop_estimate_s"))
    return {"name": f"pure_stages_{arch}_{concepts}c", "variant": label, "rounds": edit.stats.get("rounds"),
            "residual": edit.stats.get("residual"), "arch": arch, "device": device, "dtype": str(dtype),
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
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--compare", action="store_true",
                    help="time the open-loop PURE of before the closed loop and the current default in one run")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.compare:
        rows = []
        for arch in ([a.arch] if a.arch else ["toy", "sd15"]):
            rows += [run_one(arch, a.device, a.concepts, a.size, OPEN_LOOP, "open-loop (before)"),
                     run_one(arch, a.device, a.concepts, a.size, {}, "default (now)")]
        for before, now in zip(rows[::2], rows[1::2]):
            print(f"{before['arch']}: erase {before['erase_s']:.2f} s -> {now['erase_s']:.2f} s "
                  f"({now['erase_s'] / before['erase_s']:.2f}x; {now['rounds']} round(s), residual {now['residual']})")
    else:
        rows = [run_one(a.arch, a.device, a.concepts, a.size)] if a.arch else run(a.device)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
