"""PURE end to end with compiled collection (``PURE_FAST_COMPILE_COLLECT``) vs eager: the issue's targets.

Table ``pure_compiled``: ``pure_fast.erase`` (PURE, PURE's default collection, the style category's 8
templates, as ``bench_end_to_end``) on the SDXL and SD1.5 architectures in bf16 (random weights), with
1 and 50 concepts, eager vs compiled collection (mode ``reduce-overhead``: inductor + CUDA graphs; ``1``:
inductor alone, with ``BENCH_COMPILE_MODES=reduce-overhead,1``). The first compiled run (compilation, with
inductor's on-disk cache as it is: ``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``) is
reported apart (``first_run_s``, ``compile_s`` = first - warm) from the warm run (``ms``). Verified before
the timing counts: the compiled edit's ΔW equals the eager edit's within rounding (max over weights of the
relative Frobenius distance <= 5e-2 in bf16, where the UNet's kernels round differently; 1e-3 in fp32).

Targets (H100, bf16): SDXL 1 concept <= 2.5 s, 50 concepts <= 25 s; SD1.5 50 concepts <= 8 s (end to end,
``pure_fast.erase`` with its fingerprints; the save, a few ms, is timed by ``bench_end_to_end``).

Narrowing (device time): ``BENCH_COMPILE_ARCHS=sdxl`` (comma list), ``BENCH_COMPILE_CONCEPTS=1,50`` (per
arch: ``sdxl:1,50;sd15:50`` form also accepted). CPU: skipped by default (compiling the SD1.5 UNet on 2 cores
takes minutes and measured slower than eager); ``--only compile_e2e`` runs SD1.5 with 1 concept at the CPU
settings of ``bench_end_to_end``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


def _settings(device: str) -> dict:
    cuda = device == "cuda"
    cfg = {"dtype": torch.bfloat16 if cuda else torch.float32,
           "archs": ("sdxl", "sd15") if cuda else ("sd15",),
           "concepts": {"sdxl": (1, 50), "sd15": (50,)} if cuda else {"sd15": (1,)},
           "e2e_modes": tuple(m for m in os.environ.get("BENCH_COMPILE_MODES", "reduce-overhead" if cuda else "1")
                              .split(",") if m)}
    only = [a.strip() for a in os.environ.get("BENCH_COMPILE_ARCHS", "").split(",") if a.strip()]
    if only:
        cfg["archs"] = tuple(a for a in cfg["archs"] if a in only)
    spec = os.environ.get("BENCH_COMPILE_CONCEPTS", "").strip()
    if spec:
        if ":" in spec:
            cfg["concepts"] = {a: tuple(int(c) for c in cs.split(",") if c)
                               for a, cs in (part.split(":") for part in spec.split(";") if part)}
        else:
            cfg["concepts"] = {a: tuple(int(c) for c in spec.split(",") if c) for a in cfg["archs"]}
    return cfg


def _delta_distance(a, b) -> float:
    """max over weights of ||ΔW_a - ΔW_b||_F / ||ΔW_b||_F (low-rank edits: up @ down)."""
    worst = 0.0
    for name, (ub, db) in b.factors.items():
        ua, da = a.factors[name]
        wa, wb = ua.double() @ da.double(), ub.double() @ db.double()
        worst = max(worst, float((wa - wb).norm() / wb.norm().clamp_min(1e-30)))
    return worst


def pure_compiled_rows(arch, adapter, device, cfg) -> list[dict]:
    """Table ``pure_compiled`` (module docstring): PURE end to end, eager vs compiled collection."""
    import pure_fast
    from bench_end_to_end import RETAIN, concepts, settings

    e2e = settings(device)
    rows = []
    tol = 5e-2 if cfg["dtype"] == torch.bfloat16 else 1e-3
    for n in cfg["e2e_concepts"]:
        kw = dict(category="style", progress=False, templates=e2e["templates"], **e2e["collect"])
        os.environ.pop("PURE_FAST_COMPILE_COLLECT", None)
        case = f"{arch} PURE {n} concept(s), erase end to end"
        base = {"bench": "compile", "table": "pure_compiled", "case": case,
                "dtype": str(cfg["dtype"]).replace("torch.", "")}
        if n == cfg["e2e_concepts"][0]:
            pure_fast.erase(adapter, concepts(n), RETAIN, **kw)  # warm-up (allocator, cuDNN, eager kernels)
        common.sync(device)
        t0 = time.perf_counter()
        ref = pure_fast.erase(adapter, concepts(n), RETAIN, **kw)
        common.sync(device)
        t_eager = time.perf_counter() - t0
        col = ref.stats.get("timings", {}).get("collect_s")
        rows.append({**base, "provider": "eager", "ms": 1e3 * t_eager, "ratio": 1.0, "check": "reference",
                     "note": f"collect {col:.3g} s" if col else ""})
        for mode in cfg["e2e_modes"]:
            os.environ["PURE_FAST_COMPILE_COLLECT"] = mode
            try:
                torch._dynamo.reset()
                t0 = time.perf_counter()
                pure_fast.erase(adapter, concepts(n), RETAIN, **kw)  # first run: compiles
                common.sync(device)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                edit = pure_fast.erase(adapter, concepts(n), RETAIN, **kw)
                common.sync(device)
                warm = time.perf_counter() - t0
            finally:
                os.environ.pop("PURE_FAST_COMPILE_COLLECT", None)
                torch._dynamo.reset()
            dist = _delta_distance(edit, ref)
            if not dist <= tol:
                raise AssertionError(f"{case}: compiled ({mode}) edit differs from eager: {dist:.3g} > {tol:g}")
            col = edit.stats.get("timings", {}).get("collect_s")
            rows.append({**base, "provider": f"compiled {mode}", "ms": 1e3 * warm, "ratio": t_eager / warm,
                         "first_run_s": first, "compile_s": first - warm,
                         "check": f"ΔW vs eager: rel {dist:.1e} <= {tol:g}",
                         "note": f"collect {col:.3g} s; first run (compiling) {first:.1f} s"})
            common.log(f"   {case}: compiled {mode} {t_eager / warm:.2f}x eager, first run {first:.1f} s")
    return rows


def run(device: str = "cpu") -> list[dict]:
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.testing import build_architecture_pipeline

    os.environ["PURE_FAST_PROGRESS"] = "0"
    device = torch.device(device).type
    cfg = _settings(device)
    rows = []
    for arch in cfg["archs"]:
        pipe = build_architecture_pipeline(arch, dtype=cfg["dtype"])
        ad = wrap_pipeline(pipe, device=device, dtype=cfg["dtype"])
        rows += pure_compiled_rows(arch, ad, device, {**cfg, "e2e_concepts": cfg["concepts"].get(arch, ())})
        del ad, pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)
