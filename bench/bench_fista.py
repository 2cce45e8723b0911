"""Microbenchmark: the fused FISTA step (native C++/OpenMP or CUDA) vs the same step in eager torch.

Verify, then time, then compare: the native result is checked against the torch reference before any
timing; both run in the same process on the same inputs; the figure is the ratio of medians.

    python bench/bench_fista.py --device cpu [--json bench/results/fista_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pure_fast.ops import backend
from pure_fast.ops.fista import fista_step, fista_step_reference

# SD1.5 cross-attention K/V stacks: the six (1280, 768) layers' K and V, and the (320, 768) group
SHAPES = {
    "sd15_kv_1280x768_x32": (32, 1280, 768),
    "sd15_kv_320x768_x10": (10, 320, 768),
}
STEP, TAU, BETA = 0.37, 0.05, 0.61


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_medians(fns: dict, device: str, warmup: int = 2, reps: int = 7) -> dict:
    """Median wall time (ms) of each callable, after warm-up. The providers take turns rep by rep, so load
    from other processes falls on all of them alike (CUDA: synchronised around each call)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _verify(native, ref, n: int) -> None:
    w, y, nnz, dsq, nsq = native
    rw, ry, rnnz, rdsq, rnsq = ref
    scale_w = float(rw.abs().max()) if n else 0.0
    if not torch.allclose(w, rw, rtol=0, atol=4 * torch.finfo(torch.float32).eps * (scale_w + 1)):
        raise AssertionError("native W differs from the torch reference")
    if not torch.allclose(y, ry, rtol=0, atol=8 * torch.finfo(torch.float32).eps * (float(ry.abs().max()) + 1)):
        raise AssertionError("native Y_next differs from the torch reference")
    if abs(nnz - rnnz) > max(1, n // 10**6):
        raise AssertionError(f"nnz {nnz} vs reference {rnnz}")
    for a, b, what in ((dsq, rdsq, "diff_sq"), (nsq, rnsq, "norm_sq")):
        if abs(a - b) > 1e-4 * abs(b) + 1e-12:
            raise AssertionError(f"{what} {a} vs reference {b}")


def run(device: str = "cpu", shapes: dict | None = None, reps: int = 7) -> dict:
    """Verify and time every shape; returns {"bench": "fista_step", "device": ..., "rows": [...]}."""
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, shape in (shapes or SHAPES).items():
        Y, YM, N, Wp = (torch.randn(shape, generator=g).to(device) for _ in range(4))
        W_out, Y_out = torch.empty_like(Y), torch.empty_like(Y)
        with backend.force("native"):
            native = fista_step(Y, YM, N, Wp, STEP, TAU, BETA, W_out=W_out, Y_out=Y_out)
        ref = fista_step_reference(Y, YM, N, Wp, STEP, TAU, BETA)
        _verify(native, ref, Y.numel())

        def native_fn():
            with backend.force("native"):
                fista_step(Y, YM, N, Wp, STEP, TAU, BETA, W_out=W_out, Y_out=Y_out)

        def eager_fn():
            fista_step_reference(Y, YM, N, Wp, STEP, TAU, BETA)

        t = time_medians({"native": native_fn, "eager": eager_fn}, device, reps=reps)
        t_native, t_eager = t["native"], t["eager"]
        gbytes = 6 * Y.numel() * 4 / 1e9  # 4 reads + 2 writes of fp32
        rows.append({
            "case": name, "shape": list(shape), "dtype": "float32", "verified": True,
            "native_ms": round(t_native, 3), "eager_torch_ms": round(t_eager, 3),
            "speedup": round(t_eager / t_native, 2), "native_GBps": round(gbytes / (t_native / 1e3), 1),
        })  # fmt: skip
        del Y, YM, N, Wp, W_out, Y_out, native, ref
    return {
        "bench": "fista_step", "device": device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "rows": rows,
    }  # fmt: skip


def print_table(result: dict) -> None:
    print(f"fista_step on {result['device']} (torch {result['torch']}, {result['threads']} threads)")
    head = f"{'case':<24}{'shape':<18}{'native ms':>11}{'eager ms':>11}{'speedup':>9}{'GB/s':>8}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['case']:<24}{shape:<18}{r['native_ms']:>11.2f}{r['eager_torch_ms']:>11.2f}"
              f"{r['speedup']:>8.2f}x{r['native_GBps']:>8.1f}")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per provider (median; >= 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.reps < 5:
        ap.error("--reps must be >= 5")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    result = run(args.device, reps=args.reps)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
