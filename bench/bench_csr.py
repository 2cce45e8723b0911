"""Microbenchmark: CSR export (native dense_to_csr) vs torch.Tensor.to_sparse_csr, and the validating
native reader (csr_to_dense) vs torch's sparse_csr_tensor(...).to_dense() (which does not validate).

Verify, then time, then compare: every native result is checked against the torch reference and
to_sparse_csr before timing; providers take turns rep by rep; the figure is the ratio of medians.

    python bench/bench_csr.py --device cpu [--json bench/results/csr_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from pure_fast.ops import backend
from pure_fast.ops.csr import csr_to_dense, dense_to_csr, dense_to_csr_reference

SPARSITY = 0.85
# SD1.5 attn2 to_k and to_v: (320,768)x5, (640,768)x5, (1280,768)x6, each for K and V -> 32 matrices
SD15_STACK = [(320, 768)] * 10 + [(640, 768)] * 10 + [(1280, 768)] * 12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_medians(fns: dict, device: str, warmup: int = 2, reps: int = 7) -> dict:
    """Median wall time (ms) of each callable after warm-up; providers alternate rep by rep."""
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


def _matrices(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, c in shapes:
        W = torch.randn(r, c, generator=g)
        W = W * (torch.rand(r, c, generator=g) >= SPARSITY)
        out.append(W.to(dtype).to(device))
    return out


def _verify(mats, index_dtype) -> None:
    for W in mats:
        with backend.force("native"):
            p, i, v = dense_to_csr(W, index_dtype)
            D = csr_to_dense(p, i, v, *W.shape)
        rp, ri, rv = dense_to_csr_reference(W, index_dtype)
        S = W.to_sparse_csr()
        ok = (torch.equal(p, rp) and torch.equal(i, ri) and torch.equal(v, rv) and torch.equal(p, S.crow_indices())
              and torch.equal(i.long(), S.col_indices()) and torch.equal(v, S.values()) and torch.equal(D, W))
        if not ok:
            raise AssertionError(f"native CSR differs from the references for shape {tuple(W.shape)}")


def run(device: str = "cpu", reps: int = 7) -> dict:
    """Verify and time; returns {"bench": "csr", "device": ..., "rows": [...]}."""
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    cases = {
        "1280x2048": [(1280, 2048)],
        "sd15_kv_stack_x32": SD15_STACK,
    }
    rows = []
    for dtype in (torch.float32, torch.float16):
        for case, shapes in cases.items():
            mats = _matrices(shapes, dtype, device)
            index_dtype = torch.int16  # every width here is < 32768
            _verify(mats, index_dtype)
            csrs = [W.to_sparse_csr() for W in mats]
            ours = []
            with backend.force("native"):
                ours = [dense_to_csr(W, index_dtype) for W in mats]

            def export_native():
                with backend.force("native"):
                    for W in mats:
                        dense_to_csr(W, index_dtype)

            def export_torch():
                for W in mats:
                    W.to_sparse_csr()

            def read_native():
                with backend.force("native"):
                    for (p, i, v), W in zip(ours, mats):
                        csr_to_dense(p, i, v, *W.shape)

            def read_torch():
                for S in csrs:
                    S.to_dense()

            t = time_medians({"export_native": export_native, "export_torch": export_torch,
                              "read_native": read_native, "read_torch": read_torch}, device, reps=reps)  # fmt: skip
            nnz = sum(int(v.numel()) for _, _, v in ours)
            numel = sum(W.numel() for W in mats)
            base = {"case": case, "matrices": len(mats), "dtype": str(dtype).replace("torch.", ""),
                    "index_dtype": "int16", "zero_fraction": round(1 - nnz / numel, 4), "verified": True}  # fmt: skip
            rows.append({**base, "op": "export", "native_ms": round(t["export_native"], 3),
                         "torch_ms": round(t["export_torch"], 3), "torch_op": "Tensor.to_sparse_csr",
                         "speedup": round(t["export_torch"] / t["export_native"], 2)})  # fmt: skip
            rows.append({**base, "op": "read", "native_ms": round(t["read_native"], 3),
                         "torch_ms": round(t["read_torch"], 3), "torch_op": "sparse_csr.to_dense (no validation)",
                         "speedup": round(t["read_torch"] / t["read_native"], 2)})  # fmt: skip
    return {"bench": "csr", "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "sparsity": SPARSITY, "rows": rows}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"CSR on {result['device']} (torch {result['torch']}, {result['threads']} threads, "
          f"~{result['sparsity']:.0%} zeros)")  # fmt: skip
    head = f"{'op':<8}{'case':<20}{'dtype':<10}{'native ms':>11}{'torch ms':>11}{'speedup':>9}  torch op"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['op']:<8}{r['case']:<20}{r['dtype']:<10}{r['native_ms']:>11.2f}{r['torch_ms']:>11.2f}"
              f"{r['speedup']:>8.2f}x  {r['torch_op']}")  # fmt: skip


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
