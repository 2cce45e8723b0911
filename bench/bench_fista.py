"""Microbenchmarks of SPACE's FISTA: the fused step (native C++/OpenMP or CUDA) vs the same step in eager
torch, and whole iterations with ``Y M`` as the dense GEMM vs the factored ``λY + (Y Fᵀ) F``.

Verify, then time, then compare: the native result is checked against the torch reference before any
timing; both run in the same process on the same inputs; the figure is the ratio of medians.

Table ``fista_iteration``: ``fista_solve`` for a fixed number of iterations (tol unreachable) at SPACE's
K/V stack shape, M = λI + FᵀF with k token rows (k = 8: one concept and two retained ones with UCE's
default token selection; k = 64: ~20 concepts), once with M dense (the GEMM, what SPACE did before the
factored route) and once factored (``ops/shifted_low_rank.py``). Verified first: the two routes' solutions
agree to float32 rounding. CPU: one SD1.5 K/V group (32 x 1280 x 768); CUDA: SDXL's 140 K/V weights
(166,400 x 2048).

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


ITER_CASES = {
    "cpu": [("sd15 K/V 1280x768 x32", (32, 1280, 768), k, 10) for k in (8, 64)],
    "cuda": [("sdxl K/V 140 weights", (130, 1280, 2048), k, 50) for k in (8, 64)],  # 166,400 rows = 130 x 1280
}


def iteration_rows(device: str, reps: int = 5, cases=None) -> list[dict]:
    """Dense vs factored ``Y M`` inside ``fista_solve`` (verified against each other, then timed)."""
    from pure_fast.ops.fista import fista_solve
    from pure_fast.ops.shifted_low_rank import ShiftedLowRank

    rows = []
    for name, shape, k, iters in cases or ITER_CASES[device]:
        g = torch.Generator(device="cpu").manual_seed(k)
        d = shape[-1]
        F = (torch.randn(k, d, generator=g, dtype=torch.float64) / d**0.5).to(device)
        M = ShiftedLowRank.gram(0.5, F)
        Md = M.dense(torch.float32)
        W0 = (0.02 * torch.randn(shape, generator=g)).to(device)
        N = M.to(device, torch.float32).right_mm(W0) + 1e-3 * torch.randn(shape, generator=g).to(device)
        Mf = M.to(device, torch.float32)
        kw = dict(max_iter=iters, tol=1e-30, restart=True)
        # verified without restarts: the momentum schedule is then fixed, so the routes differ by rounding only
        # (with restarts, a test that sits at 0 could go either way and the paths legitimately part)
        check = dict(kw, restart=False)
        a = fista_solve(W0, Mf, N, 1e-3, **check)
        b = fista_solve(W0, Md, N, 1e-3, **check)
        err = float((a.W - b.W).abs().max() / b.W.abs().max().clamp_min(1e-30))
        if not (a.iterations == b.iterations == iters and err <= 1e-4):
            raise AssertionError(f"{name} k={k}: factored vs dense solutions differ ({err:.2e} of max |W|)")
        del a, b
        t = time_medians({"dense": lambda: fista_solve(W0, Md, N, 1e-3, **kw),
                          "factored": lambda: fista_solve(W0, Mf, N, 1e-3, **kw)}, device, warmup=1, reps=reps)
        rows_total = shape[0] * shape[1]
        for prov in ("dense", "factored"):
            flops = (2.0 * d if prov == "dense" else 4.0 * k) * rows_total * d * iters
            rows.append({
                "table": "fista_iteration", "case": f"{name}, k={k}, {iters} iterations", "dtype": "fp32",
                "provider": prov, "ms": round(t[prov], 2), "ratio": round(t["dense"] / t[prov], 2),
                "ms_per_iteration": round(t[prov] / iters, 3),
                "check": f"routes agree (no restart): max |dW| / max |W| = {err:.1e} (<= 1e-4)",
                "note": f"Y M {flops / iters / 1e9:.1f} GFLOP per iteration",
            })  # fmt: skip
        del W0, N, F, Md, Mf
    return rows


def run(device: str = "cpu", shapes: dict | None = None, reps: int = 7, iterations: bool = True) -> dict:
    """Verify and time every shape; returns {"bench": "fista_step", "device": ..., "rows": [...]} (step rows,
    then the ``fista_iteration`` rows when ``iterations``)."""
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
    if iterations:
        rows += iteration_rows(device, reps=max(5, reps // 2) if device == "cpu" else reps)
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
        if r.get("table") == "fista_iteration":
            continue
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['case']:<24}{shape:<18}{r['native_ms']:>11.2f}{r['eager_torch_ms']:>11.2f}"
              f"{r['speedup']:>8.2f}x{r['native_GBps']:>8.1f}")  # fmt: skip
    it = [r for r in result["rows"] if r.get("table") == "fista_iteration"]
    if it:
        print("\nfista_iteration: Y M dense GEMM vs factored (ratio = dense ms / this ms)")
        for r in it:
            print(f"{r['case']:<48}{r['provider']:<10}{r['ms']:>11.1f} ms{r['ratio']:>8.2f}x  {r['check']}")


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
