"""Does ``torch.compile`` (and, on CUDA, CUDA graphs) speed up PURE's collection?

Table ``compile`` — one UNet forward pass of a CFG batch at the collection shape, plain (default attention
processors) and hooked (PURE's recording processors installed and recording), each eager vs compiled:

* ``eager`` (baseline), ``compile default`` (``torch.compile``, inductor);
* CUDA only: ``compile reduce-overhead`` (inductor with CUDA graphs), plain and hooked. The hooked pass
  records through the deferred recorder (``collect/compiled.py``: each processor stores its pooled tensor in
  a per-layer slot, flushed after the pass), so it compiles without graph breaks and CUDA graphs capture it.

Every compiled provider is verified against the eager output first (fp32: 1e-4 relative; bf16: 2e-2, the
rounding of a different kernel order through the whole UNet), the hooked one also on the recorded
statistics; its first call (compilation) is reported separately from the steady-state median.

PURE end to end with compiled collection: ``bench_compile_e2e.py``.

CPU (measured before the deferred recorder, SD1.5 architecture, batch 12 x2 CFG at 64 px, fp32, 2 cores,
two runs): compilation 106 s cold (12 s with inductor's cache warm), then 0.62-0.73x eager (plain) and
0.21-0.24x (hooked: the old recorder recompiled per call): it does not hold up, so collection stays eager on
CPU. CUDA: SD1.5 and SDXL architectures in bf16 at the collection defaults (256 / 512 px), batch 16 x2 CFG:
pending a GPU (``bash bench/gpu/session.sh compile``); left out of a default CPU run.
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
    """``BENCH_COMPILE_ARCHS=sdxl`` (comma list) and ``BENCH_COMPILE_HOOKED=0`` narrow a run (device time)."""
    if device == "cuda":
        cfg = {"archs": {"sd15": 256, "sdxl": 512}, "batch": 16, "dtype": torch.bfloat16, "rtol": 2e-2,
               "timing": dict(warmup=2, repeats=10)}
    else:
        cfg = {"archs": {"sd15": 64}, "batch": 12, "dtype": torch.float32, "rtol": 1e-4,
               "timing": dict(warmup=0, repeats=3, min_runs=3)}
    only = [a.strip() for a in os.environ.get("BENCH_COMPILE_ARCHS", "").split(",") if a.strip()]
    if only:
        cfg["archs"] = {a: s for a, s in cfg["archs"].items() if a in only}
    cfg["hooked"] = (False, True) if os.environ.get("BENCH_COMPILE_HOOKED", "1") != "0" else (False,)
    return cfg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _stats_snapshot(rec) -> list[torch.Tensor]:
    rec.flush()
    return [s.matrix().clone() for s in rec.stats["a"]]


def run(device: str = "cpu") -> list[dict]:
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.collect.activations import PooledCrossAttnProcessor, Recorder, installed_processors
    from pure_fast.testing import build_architecture_pipeline

    os.environ["PURE_FAST_PROGRESS"] = "0"
    device = torch.device(device).type
    cfg = _settings(device)
    rows = []
    for arch, size in cfg["archs"].items():
        pipe = build_architecture_pipeline(arch, dtype=cfg["dtype"])
        ad = wrap_pipeline(pipe, device=device, dtype=cfg["dtype"])
        unet = ad.unet
        n = cfg["batch"]
        cond = ad.encode(["a painting of a harbour at dusk"] * n)
        neg = ad.encode_negative(n)
        from pure_fast.adapters.base import Conditioning

        both = Conditioning.cat([neg, cond]).to(device, cfg["dtype"])
        c, h, w = ad.latent_shape(size)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2 * n, c, h, w, generator=g).to(device, cfg["dtype"])
        t = torch.tensor(500, device=device)

        added = dict(both.added)
        if hasattr(ad, "time_ids"):  # SDXL: the size conditioning the adapter adds in unet_forward
            added.setdefault("time_ids", ad.time_ids(x.shape[0], size))

        def forward(u):
            kw = {"added_cond_kwargs": added} if added else {}
            with torch.no_grad():
                return u(x, t, encoder_hidden_states=both.embeds, return_dict=False, **kw)[0]

        case = f"{arch} UNet pass, batch {n} x2 CFG, {size} px"
        base = {"bench": "compile", "dtype": str(cfg["dtype"]).replace("torch.", "")}
        layers = ad.cross_attention_layers()
        for hooked in cfg["hooked"]:
            rec = Recorder(layers, 10**9)
            ctx = installed_processors(layers, lambda i, l: PooledCrossAttnProcessor(i, rec)) if hooked else None
            if ctx is not None:
                ctx.__enter__()
            try:
                rec.active, rec.groups, rec.cond_slice = hooked, ["a"] * n, slice(n, None)
                ref = forward(unet)
                ref_stats = _stats_snapshot(rec) if hooked else None
                label = f"{case}, {'hooked (recording)' if hooked else 'plain'}"
                t_eager = common.time_fn(lambda: forward(unet), device, **cfg["timing"])
                rows.append({**base, "case": label, "provider": "eager", **t_eager, "ratio": 1.0,
                             "check": "reference"})
                modes = ["default"] + (["reduce-overhead"] if device == "cuda" else [])
                for mode in modes:
                    torch._dynamo.reset()
                    compiled = torch.compile(unet, mode=None if mode == "default" else mode)

                    def cu(*a, _c=compiled, _clone=mode == "reduce-overhead", **kw):
                        out = _c(*a, **kw)  # deferred recorder: slots filled in the graph, added here
                        rec.flush(clone=_clone)
                        return out

                    rec.deferred = hooked
                    rec.stats.clear()
                    t0 = time.perf_counter()
                    out = forward(cu)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    err = _rel(out, ref)
                    if not err <= cfg["rtol"]:
                        raise AssertionError(f"{label}: compiled ({mode}) output differs from eager: {err:.2e}")
                    check = f"output rel err {err:.1e} <= {cfg['rtol']:g}"
                    if hooked:
                        got = _stats_snapshot(rec)
                        serr = max(_rel(a, b) for a, b in zip(got, ref_stats))
                        if not serr <= cfg["rtol"]:
                            raise AssertionError(f"{label}: recorded statistics differ: {serr:.2e}")
                        check += f"; recorded stats rel err {serr:.1e}"
                    t_c = common.time_fn(lambda: forward(cu), device, **cfg["timing"])
                    rows.append({**base, "case": label, "provider": f"compile {mode}", **t_c,
                                 "ratio": t_eager["ms"] / t_c["ms"], "check": check,
                                 "note": f"first call (compilation) {first_s:.1f} s"})
                    common.log(f"   {label}: compile {mode} {t_eager['ms'] / t_c['ms']:.2f}x eager")
                    rec.deferred = False
                    del cu, compiled
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
        torch._dynamo.reset()
        del ad, pipe, unet
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)
