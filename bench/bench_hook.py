"""The PURE collection hook: cross-attention output + its spatial mean, fused vs eager.

Providers (each verified against an fp64 reference before it is timed):

* ``eager``     ``F.scaled_dot_product_attention`` then ``mean`` over the spatial axis in fp32 (what a
                plain-torch hook does; the baseline, ratio 1.0)
* ``sdpa_only`` SDPA alone, no pooling: what the layer costs when nothing is collected (a floor for the
                hook; its ratio shows how much of the eager hook is the extra mean)
* ``triton``    ``pooled_attention_triton``: one kernel writes the output and the per-block column sums

Shapes are the attn2 (cross-attention) calls of SD1.5's highest-resolution blocks (B4 H8 N4096 T77 hd40,
batch 4 = 2 prompts x CFG) and SDXL's 64x64-latent middle resolution (B4 H20 N1024 T77 hd64), in the
diffusers processor's layout ([B, N, H, hd] memory viewed as [B, H, N, hd]). On CPU a batch-1 variant in
fp32 runs in seconds; without CUDA the fused kernel does not exist (the Triton interpreter is a
correctness tool, not a timing), so only the torch providers are timed there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from pure_fast.ops import pooled_attention as pa  # noqa: E402

GPU_CASES = {"sd15_attn2": (4, 8, 4096, 77, 40), "sdxl_attn2": (4, 20, 1024, 77, 64)}
GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_CASES = {"sd15_attn2": (1, 8, 4096, 77, 40), "sdxl_attn2": (1, 20, 1024, 77, 64)}
CPU_DTYPES = (torch.float32,)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _inputs(shape, dtype, device, seed=0):
    b, h, n, t, d = shape
    g = torch.Generator(device="cpu").manual_seed(seed)

    def make(rows):  # diffusers: to_q(x).view(B, rows, H, hd).transpose(1, 2)
        return torch.randn(b, rows, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)

    return make(n), make(t), make(t)


def _verify(name, q, k, v, out, pooled) -> str:
    """Derived tolerance: error vs fp64 <= 2 x the error of torch's SDPA at this dtype + 1 fp32 ulp."""
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    b, h, _, d = ref.shape
    ref_pooled = ref.mean(2).reshape(b, h * d)
    t_out, t_pooled = pa.pooled_attention_reference(q, k, v)
    eps = torch.finfo(torch.float32).eps
    problems = []
    for what, got, want, torch_got in (("out", out, ref, t_out), ("pooled", pooled, ref_pooled, t_pooled)):
        err = common.max_abs_err(got, want)
        bound = 2 * common.max_abs_err(torch_got, want) + eps * float(want.abs().max())
        if not err <= bound:
            problems.append(f"{what}: max|err| {err:.3g} > {bound:.3g}")
        if what == "out":
            summary = f"max|err| {err:.2g} <= {bound:.2g}"
    if problems:
        raise AssertionError(f"{name} does not match the fp64 reference: " + "; ".join(problems))
    return summary


def run(device: str = "cpu") -> list[dict]:
    device = torch.device(device).type
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    cases, dtypes = (GPU_CASES, GPU_DTYPES) if cuda else (CPU_CASES, CPU_DTYPES)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    fused_available = cuda or interpret
    rows: list[dict] = []
    for name, shape in cases.items():
        b, h, n, t, d = shape
        case = f"{name} B{b} H{h} N{n} T{t} hd{d}"
        for dtype in dtypes:
            q, k, v = _inputs(shape, dtype, device)
            base = {"bench": "hook", "case": case, "dtype": DTYPE_NAMES[dtype], "layout": "diffusers [B,N,H,hd]"}

            with torch.no_grad():
                eager_out, eager_pooled = pa.pooled_attention_reference(q, k, v)
                eager_check = "reference: max|err| %.2g vs fp64" % common.max_abs_err(
                    eager_out, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
                eager = common.time_fn(lambda: pa.pooled_attention_reference(q, k, v), device)
                rows.append({**base, "provider": "eager", **eager, "ratio": 1.0, "check": eager_check})

                sdpa = common.time_fn(lambda: F.scaled_dot_product_attention(q, k, v), device)
                rows.append({**base, "provider": "sdpa_only", **sdpa, "ratio": eager["ms"] / sdpa["ms"],
                             "check": "same op as eager", "note": "no pooling: the floor for a hook"})

                if not fused_available:
                    rows.append({**base, "provider": "triton", "ms": None, "ratio": None, "check": None,
                                 "note": "fused kernel needs CUDA (CPU: only the reference exists)"})
                    continue
                out, pooled = pa.pooled_attention_triton(q, k, v)
                check = _verify("triton", q, k, v, out, pooled)
                if not cuda:
                    rows.append({**base, "provider": "triton", "ms": None, "ratio": None, "check": check,
                                 "note": "Triton interpreter: verified, not timed"})
                    continue
                fused = common.time_fn(lambda: pa.pooled_attention_triton(q, k, v), device)
                rows.append({**base, "provider": "triton", **fused, "ratio": eager["ms"] / fused["ms"],
                             "check": check})
            del q, k, v
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)
