"""Cross-attention with the spatial mean fused in: the PURE collection hook op.

PURE reads ``h = softmax(Q Kᵀ · scale) V`` (before ``to_out``) at every ``attn2`` layer and its mean over
the spatial (query) axis. This module computes both in one pass.

Three faces, as every op here:

* :func:`pooled_attention_reference` — plain torch: ``F.scaled_dot_product_attention`` then the mean over
  the query axis accumulated in fp32. The ground truth in tests.
* :func:`pooled_attention_triton` — ONE Triton kernel. Each program handles one ``(batch, head)`` and a
  block of ``BLOCK_N`` queries; the whole key set (``T <= MAX_T`` text tokens, padded to a power of two
  with masking) is one tile, so the softmax is exact in one pass (fp32 logits, max-subtracted). The
  kernel writes the output block and, in the same program, the column sums of that block (of the values
  actually stored, i.e. after rounding to the output dtype, accumulated in fp32) into a per-block partial
  buffer ``[B, H, cdiv(N, BLOCK_N), hd]``. A fixed-order ``sum`` over the block axis and a division by N
  finish the mean. This is bitwise deterministic run to run (no atomics; ``tl.atomic_add`` on fp32 would
  make the result depend on the order in which blocks finish) and costs one tiny extra reduction.
* :func:`pooled_attention` — the dispatch through :mod:`pure_fast.ops.backend`: the kernel only when it is
  asked for (``PURE_FAST_BACKEND=triton`` / ``backend.force("triton")``: CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``), else the reference. Measured on an H100 (``bench/bench_hook.py``, 2026-11-22,
  ``bench/results/nvidia-h100-80gb-hbm3.json``): the kernel takes ~0.15 ms at SD1.5's and SDXL's attn2 shapes
  where SDPA (flash) + the mean takes 0.06-0.09 ms, i.e. 0.40-0.58x, so ``auto`` uses SDPA + mean on CUDA
  too (the target was >= 1.3x; the kernel is kept, tested and selectable, for the work that makes it win).
  Cases the kernel does not cover fall back to the reference (see :func:`triton_supported`).

Shapes: ``q`` is ``[B, H, N, hd]``, ``k`` and ``v`` are ``[B, H, T, hd]``. Returns ``(out, pooled)`` with
``out`` ``[B, H, N, hd]`` in the input dtype (values as ``F.scaled_dot_product_attention(q, k, v)``) and
``pooled`` ``[B, H*hd]`` float32 equal to ``out.transpose(1, 2).reshape(B, N, H*hd).mean(1)`` (the channel
layout of the ``to_out`` input). The kernel's ``out`` is laid out in memory as ``[B, N, H, hd]`` (a
transposed view, as flash attention returns it) so that the diffusers processor's
``out.transpose(1, 2).reshape(B, N, H*hd)`` is free; any layout of q, k, v is accepted (strides are passed).

Triton is imported only when the Triton path runs: importing this module never imports triton.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend

#: Largest number of key/value tokens the kernel holds in one tile (padded to a power of two).
MAX_T = 128
#: Largest head dim (padded to a power of two) the kernel handles.
MAX_HD = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pooled_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA, then the mean over the query axis accumulated in fp32. Returns ``(out, pooled)``."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    b, h, _, d = out.shape
    pooled = torch.mean(out, dim=2, dtype=torch.float32).reshape(b, h * d)
    return out, pooled


def triton_supported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> str | None:
    """``None`` when the kernel covers this call, else the reason it does not."""
    if attn_mask is not None:
        return "attention mask"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-d [B, H, N|T, hd]"
    b, h, n, d = q.shape
    if k.shape != (b, h, k.shape[2], d) or v.shape != k.shape:
        return "k, v must be [B, H, T, hd] with q's B, H, hd (no broadcasting)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (kernel: one of fp32, fp16, bf16)"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    t = k.shape[2]
    if t == 0 or n == 0 or b * h == 0 or d == 0:
        return "empty dimension"
    if t > MAX_T:
        return f"T={t} > MAX_T={MAX_T}"
    if d > MAX_HD:
        return f"hd={d} > {MAX_HD}"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "autograd (the kernel has no backward)"
    return None


def backend_for(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> str:
    """The implementation :func:`pooled_attention` will run for these arguments: "triton" or "torch".
    The kernel runs only when the Triton backend is requested (module docstring: slower than SDPA + mean on
    an H100 as it stands)."""
    if backend.requested() != "triton" or backend.choose(q.device.type, triton=True) != "triton":
        return "torch"
    return "triton" if triton_supported(q, k, v, attn_mask) is None else "torch"


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its fp32 mean over the query axis: ``(out [B,H,N,hd], pooled [B,H*hd])``."""
    if backend_for(q, k, v, attn_mask) == "triton":
        return pooled_attention_triton(q, k, v, scale=scale)
    return pooled_attention_reference(q, k, v, attn_mask=attn_mask, scale=scale)


# ----------------------------------------------------------------------------------------------- Triton

_KERNEL = None
_INTERPRETED = False


def _kernel():
    """Build the Triton kernel on first use (so that importing this module never imports triton).

    Whether it runs compiled or in the interpreter is fixed by TRITON_INTERPRET at that first build.
    """
    global _KERNEL, _INTERPRETED
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _pooled_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_ptr,
        H, N, T, D,
        sq_b, sq_h, sq_n, sq_d,
        sk_b, sk_h, sk_t, sk_d,
        sv_b, sv_h, sv_t, sv_d,
        so_b, so_h, so_n, so_d,
        sp_bh, sp_blk,
        scale,
        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, IS_BF16: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < N
        mask_t = offs_t < T
        mask_d = offs_d < D

        q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        k_base = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
        o_base = out_ptr + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h

        q = tl.load(q_base + offs_n[:, None].to(tl.int64) * sq_n + offs_d[None, :] * sq_d,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(k_base + offs_t[:, None] * sk_t + offs_d[None, :] * sk_d,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + offs_t[:, None] * sv_t + offs_d[None, :] * sv_d,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0)

        if UPCAST_DOT:
            # interpreter only: its tl.dot mishandles bf16 (numpy has no bf16); bf16 products are exact
            # in fp32, so this changes only the accumulation order
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        # logits and softmax in fp32
        if IEEE or UPCAST_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        s = tl.where(mask_t[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        l = tl.sum(p, axis=1)
        # P in the value dtype for the second product (as flash attention does), fp32 accumulation
        if IS_BF16:
            # round to the nearest bf16 (ties to even) in fp32 bits, so that the later cast is exact.
            # Hardware converts with RTNE anyway; the interpreter truncates (biased), so rounding
            # explicitly keeps the compiled and interpreted paths identical. (Inline: the interpreter
            # does not see helper functions defined in this closure.)
            pb = p.to(tl.uint32, bitcast=True)
            pb = (pb + 0x7FFF + ((pb >> 16) & 1)) & 0xFFFF0000
            p = pb.to(tl.float32, bitcast=True)
        if UPCAST_DOT:
            acc = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc = tl.dot(p, v, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v)
        o = acc / l[:, None]
        if IS_BF16:
            ob = o.to(tl.uint32, bitcast=True)
            ob = (ob + 0x7FFF + ((ob >> 16) & 1)) & 0xFFFF0000
            o = ob.to(tl.float32, bitcast=True)
        o = o.to(out_ptr.dtype.element_ty)

        mask_o = mask_n[:, None] & mask_d[None, :]
        tl.store(o_base + offs_n[:, None].to(tl.int64) * so_n + offs_d[None, :] * so_d, o, mask=mask_o)

        # column sums of the stored (rounded) values, fp32; padded rows/columns contribute 0
        colsum = tl.sum(tl.where(mask_o, o.to(tl.float32), 0.0), axis=0)
        tl.store(part_ptr + pid_bh.to(tl.int64) * sp_bh + pid_n * sp_blk + offs_d, colsum, mask=mask_d)

    from triton.runtime.jit import JITFunction

    _INTERPRETED = not isinstance(_pooled_attention_kernel, JITFunction)
    _KERNEL = _pooled_attention_kernel
    return _KERNEL


def _next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(x) - 1).bit_length())


def _block_n(block_d: int, block_t: int) -> int:
    # keep the [BLOCK_N, BLOCK_D] q/out tile and the [BLOCK_N, BLOCK_T] logits tile at <= 16K fp32 values
    bn = 128
    while bn > 16 and (bn * block_d > 16384 or bn * block_t > 16384):
        bn //= 2
    return bn


def pooled_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel. Raises ``ValueError`` for a case it does not cover (see :func:`triton_supported`)."""
    why = triton_supported(q, k, v)
    if why is not None:
        raise ValueError(f"pooled_attention_triton does not cover this call: {why}")
    b, h, n, d = q.shape
    t = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    block_t = _next_pow2(t)
    block_d = _next_pow2(d)
    block_n = block_n or _block_n(block_d, block_t)
    n_blocks = (n + block_n - 1) // block_n

    # [B, N, H, hd] storage seen as [B, H, N, hd]: the processor's transpose(1, 2).reshape is then free
    out = torch.empty((b, n, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    partial = torch.empty((b, h, n_blocks, d), device=q.device, dtype=torch.float32)

    kernel = _kernel()
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"pooled_attention_triton on {q.device.type} tensors needs TRITON_INTERPRET=1 set before the "
            "kernel is first built; use pooled_attention() to fall back to the reference"
        )
    grid = (b * h, n_blocks)
    num_warps = 4 if block_n * max(block_d, block_t) <= 8192 else 8
    kernel[grid](
        q, k, v, out, partial,
        h, n, t, d,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        n_blocks * d, d,
        float(scale),
        BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d,
        IEEE=q.dtype == torch.float32,
        IS_BF16=q.dtype == torch.bfloat16,
        UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=num_warps,
    )
    pooled = partial.sum(dim=2).div_(n).reshape(b, h * d)
    return out, pooled
