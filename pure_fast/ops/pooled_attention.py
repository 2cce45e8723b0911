"""Cross-attention with the spatial mean fused in: the PURE collection hook op.

PURE reads ``h = softmax(Q Kᵀ · scale) V`` (before ``to_out``) at every ``attn2`` layer and its mean over
the spatial (query) axis. This module computes both in one pass.

Faces, as every op here:

* :func:`pooled_attention_reference` — plain torch: ``F.scaled_dot_product_attention`` then the mean over
  the query axis accumulated in fp32. The ground truth in tests.
* :func:`pooled_attention_triton` — ONE Triton kernel. Cross-attention has at most 77 keys, so each
  program keeps one ``(batch, head)``'s K and V in registers/SRAM for its whole life (one tile of
  ``BLOCK_T`` = T padded to a power of two >= 16, masked) and loops over its share of the query blocks:
  per block of ``BLOCK_N`` queries it computes the logits on tensor cores (``tl.dot``, fp32 accumulation),
  an exact one-pass softmax (fp32, max-subtracted, ``exp2`` with the scale folded in), ``P V`` (P rounded
  to the value dtype, fp32 accumulation, as flash attention does), writes the block's output once and adds
  the column sums of the *stored* (rounded) values to an fp32 accumulator in registers. The output is
  never read back (SDPA + ``mean`` reads it again: one full pass more).
  Grid: ``(B*H, SPLIT)``. When ``B*H`` programs already fill the GPU (>= ``PROGRAMS_PER_SM`` per SM), SPLIT
  is 1 and each program writes its head's mean straight into ``pooled``: one launch, no partial buffer.
  Otherwise the query blocks are split over SPLIT programs per head, each writes its partial sum to a
  ``[B, SPLIT, H*hd]`` fp32 buffer and a fixed-order ``sum`` over SPLIT finishes the mean. No atomics:
  the result is bitwise deterministic run to run.
* ``torch.ops.pure_fast.pooled_attention`` — the kernel as a ``torch.library`` custom op with a fake
  (meta) implementation, so ``torch.compile(fullgraph=True)`` keeps it in the graph and CUDA graphs
  capture it. On CPU tensors the op runs the reference (into the kernel's output layout) unless the
  Triton interpreter is on.
* :func:`pooled_attention` — the dispatch through :mod:`pure_fast.ops.backend`: ``PURE_FAST_BACKEND=triton``
  (or ``backend.force("triton")``) selects the kernel for CUDA tensors (CPU tensors under
  ``TRITON_INTERPRET=1``); ``torch`` selects the reference; ``auto`` takes the kernel on a CUDA device only
  when a measurement on that GPU model says it wins (:func:`measured_default`, written by
  ``bench/bench_hook.py --device cuda`` into ``pooled_attention_tuned.json`` beside this file), else SDPA +
  mean. History: the first kernel (one program per query block, K/V reloaded per block, a partial buffer
  always) measured 0.40-0.58x SDPA + mean on an H100 (``bench/results/nvidia-h100-80gb-hbm3.json``,
  2026-11-22, batch 4, host overhead included). This kernel is not yet measured on a GPU.
  Cases the kernel does not cover fall back to the reference (see :func:`triton_supported`).

Shapes: ``q`` is ``[B, H, N, hd]``, ``k`` and ``v`` are ``[B, H, T, hd]``. Returns ``(out, pooled)`` with
``out`` ``[B, H, N, hd]`` in the input dtype (values as ``F.scaled_dot_product_attention(q, k, v)``) and
``pooled`` ``[B, H*hd]`` float32 equal to ``out.transpose(1, 2).reshape(B, N, H*hd).mean(1)`` (the channel
layout of the ``to_out`` input). The kernel's ``out`` is laid out in memory as ``[B, N, H, hd]`` (a
transposed view, as flash attention returns it) so that the diffusers processor's
``out.transpose(1, 2).reshape(B, N, H*hd)`` is free; any layout of q, k, v is accepted (strides are passed).

Error of ``pooled`` against the exact mean of the stored outputs: a tree sum inside each block, a
sequential sum over a program's blocks and a tree sum over SPLIT, all in fp32, so at most
``(log2(BLOCK_N) + blocks per program + log2(SPLIT) + 1) eps32 max|o|`` (tests use ``ceil(N/16)`` blocks).

Triton is imported only when the Triton path runs: importing this module never imports triton.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

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


#: The measured decision file (``bench/bench_hook.py --device cuda`` writes it): GPU name -> result.
TUNED_FILE = Path(__file__).with_name("pooled_attention_tuned.json")


@functools.lru_cache(maxsize=None)
def _tuned_entry(device_name: str) -> dict:
    try:
        data = json.loads(TUNED_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entry = data.get("devices", {}).get(device_name, {})
    return entry if isinstance(entry, dict) else {}


#: CUDA device index -> measured decision, filled on first use (and by ``collect/compiled.py`` before it
#: compiles: a plain dict lookup traces without a graph break, the device-name query does not)
_DECISIONS: dict[int, str] = {}


def measured_default(device: torch.device) -> str:
    """``"triton"`` when the kernel measured faster than SDPA + mean on this GPU model (every case of
    ``bench_hook``'s decision set at >= ``bench_hook.WIN_RATIO``), else ``"torch"``; never triton off CUDA."""
    if device.type != "cuda":
        return "torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    decision = _DECISIONS.get(index)
    if decision is None:
        entry = _tuned_entry(torch.cuda.get_device_name(index))
        decision = _DECISIONS[index] = "triton" if entry.get("default") == "triton" else "torch"
    return decision


@functools.lru_cache(maxsize=None)
def _launch_config(device_name: str, block_d: int) -> dict:
    """Measured launch parameters for this GPU model and padded head dim (empty: the built-in heuristic)."""
    cfg = _tuned_entry(device_name).get("configs", {}).get(str(block_d), {})
    return {k: int(cfg[k]) for k in ("block_n", "num_warps", "num_stages", "programs_per_sm") if k in cfg}


def backend_for(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> str:
    """The implementation :func:`pooled_attention` will run for these arguments: "triton" or "torch".

    Forced ``triton``: the kernel wherever Triton can run these tensors. ``auto``: the kernel only on a CUDA
    GPU model where it measured faster (:func:`measured_default`). Anything else: the reference."""
    want = backend.requested()
    if want not in ("auto", "triton"):
        return "torch"
    if want == "auto" and measured_default(q.device) != "triton":
        return "torch"
    if backend.choose(q.device.type, triton=True) != "triton":
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
    """Attention output and its fp32 mean over the query axis: ``(out [B,H,N,hd], pooled [B,H*hd])``.

    Under ``torch.compile`` the kernel is reached through the custom op (kept in the graph); in eager mode
    the launcher is called directly (the custom op's Python dispatch costs host time per call)."""
    if backend_for(q, k, v, attn_mask) == "triton":
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if torch.compiler.is_compiling():
            return torch.ops.pure_fast.pooled_attention(q, k, v, s)
        return pooled_attention_triton(q, k, v, scale=s)
    return pooled_attention_reference(q, k, v, attn_mask=attn_mask, scale=scale)


# ----------------------------------------------------------------------------------------------- Triton

_KERNEL = None
_INTERPRETED = False
#: programs per SM the grid aims for (SPLIT > 1 only when B*H programs would leave SMs idle)
PROGRAMS_PER_SM = 4


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
        q_ptr, k_ptr, v_ptr, out_ptr, pool_ptr,
        H, N, T, D,
        sq_b, sq_h, sq_n, sq_d,
        sk_b, sk_h, sk_t, sk_d,
        sv_b, sv_h, sv_t, sv_d,
        so_b, so_h, so_n, so_d,
        sp_b, sp_s,
        qk_scale, blocks_per_prog,
        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        FINAL: tl.constexpr, IEEE: tl.constexpr, ROUND_BF16: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H

        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask_t = offs_t < T
        mask_d = offs_d < D

        q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        o_base = out_ptr + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
        k_base = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h

        # K and V of this (batch, head): loaded once, kept for every query block of the program
        kv_mask = mask_t[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_t[:, None] * sk_t + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_t[:, None] * sv_t + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            # interpreter only: its tl.dot mishandles bf16 (numpy has no bf16); bf16 products are exact
            # in fp32, so this changes only the accumulation order
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        kt = tl.trans(k)

        colsum = tl.zeros([BLOCK_D], dtype=tl.float32)
        n_start = pid_s * blocks_per_prog * BLOCK_N
        for i in range(0, blocks_per_prog):
            offs_n = n_start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask_o = mask_n[:, None] & mask_d[None, :]
            q = tl.load(q_base + offs_n[:, None].to(tl.int64) * sq_n + offs_d[None, :] * sq_d, mask=mask_o, other=0.0)
            if UPCAST_DOT:
                q = q.to(tl.float32)
            # logits and softmax in fp32; the scale (times log2 e) folded into one multiply before exp2
            if IEEE or UPCAST_DOT:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(mask_t[None, :], s * qk_scale, float("-inf"))
            m = tl.max(s, axis=1)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, axis=1)
            # P in the value dtype for the second product (as flash attention does), fp32 accumulation
            if ROUND_BF16:
                # interpreter only: round to the nearest bf16 (ties to even) in fp32 bits, so that the later
                # cast is exact. Hardware converts with RTNE (what the compiled kernel does with no extra
                # work); the interpreter truncates (biased), so this keeps the two paths identical.
                # (Inline: the interpreter does not see helper functions defined in this closure.)
                pb = p.to(tl.uint32, bitcast=True)
                pb = (pb + 0x7FFF + ((pb >> 16) & 1)) & 0xFFFF0000
                p = pb.to(tl.float32, bitcast=True)
            if UPCAST_DOT:
                acc = tl.dot(p, v, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(p, v, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v)
            o = acc / l[:, None]
            if ROUND_BF16:
                ob = o.to(tl.uint32, bitcast=True)
                ob = (ob + 0x7FFF + ((ob >> 16) & 1)) & 0xFFFF0000
                o = ob.to(tl.float32, bitcast=True)
            o = o.to(out_ptr.dtype.element_ty)
            tl.store(o_base + offs_n[:, None].to(tl.int64) * so_n + offs_d[None, :] * so_d, o, mask=mask_o)
            # column sums of the stored (rounded) values, fp32; padded rows/columns contribute 0
            colsum += tl.sum(tl.where(mask_o, o.to(tl.float32), 0.0), axis=0)

        p_ptr = pool_ptr + b.to(tl.int64) * sp_b + pid_s * sp_s + h * D + offs_d
        if FINAL:
            tl.store(p_ptr, colsum / N, mask=mask_d)
        else:
            tl.store(p_ptr, colsum, mask=mask_d)

    from triton.runtime.jit import JITFunction

    _INTERPRETED = not isinstance(_pooled_attention_kernel, JITFunction)
    _KERNEL = _pooled_attention_kernel
    return _KERNEL


def _next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(x) - 1).bit_length())


def _block_n(block_d: int, block_t: int) -> int:
    """Heuristic BLOCK_N: the [BLOCK_N, BLOCK_T] logits tile and the [BLOCK_N, BLOCK_D] q/out tiles at
    <= 8K fp32 values each (64 queries at SD's T=77 -> BLOCK_T 128, hd <= 128)."""
    bn = 128
    while bn > 16 and (bn * block_d > 8192 or bn * block_t > 8192):
        bn //= 2
    return bn


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_split(bh: int, n_blocks: int, programs: int) -> tuple[int, int]:
    """``(split, blocks_per_program)``: the query blocks of each head spread over ``split`` programs so that
    ``bh * split`` reaches ``programs`` where it can; every program gets the same number of blocks (the last
    may run past N: masked)."""
    split = max(1, min(n_blocks, -(-programs // max(bh, 1))))
    per = -(-n_blocks // split)
    return -(-n_blocks // per), per


def pooled_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    block_n: int | None = None,
    split: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs_per_sm: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel. Raises ``ValueError`` for a case it does not cover (see :func:`triton_supported`).

    ``block_n``, ``split``, ``num_warps``, ``num_stages``, ``programs_per_sm``: launch overrides (benchmark
    sweeps and tests); by default the values measured on this GPU model (``pooled_attention_tuned.json``)
    or the built-in heuristic."""
    why = triton_supported(q, k, v)
    if why is not None:
        raise ValueError(f"pooled_attention_triton does not cover this call: {why}")
    kernel = _kernel()
    cuda = q.device.type == "cuda"
    if not cuda and not _INTERPRETED:
        raise ValueError(
            f"pooled_attention_triton on {q.device.type} tensors needs TRITON_INTERPRET=1 set before the "
            "kernel is first built; use pooled_attention() to fall back to the reference"
        )
    b, h, n, d = q.shape
    t = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    block_t = _next_pow2(t)
    block_d = _next_pow2(d)
    tuned = _launch_config(torch.cuda.get_device_name(q.device), block_d) if cuda else {}
    block_n = block_n or tuned.get("block_n") or _block_n(block_d, block_t)
    n_blocks = (n + block_n - 1) // block_n
    if split is None:
        pps = programs_per_sm or tuned.get("programs_per_sm") or PROGRAMS_PER_SM
        programs = pps * _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if cuda else 1
        split, per = grid_split(b * h, n_blocks, programs)
    else:
        split, per = grid_split(b * h, n_blocks, b * h * max(1, int(split)))

    # [B, N, H, hd] storage seen as [B, H, N, hd]: the processor's transpose(1, 2).reshape is then free
    out = torch.empty((b, n, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    final = split == 1
    if final:
        pool = torch.empty((b, h * d), device=q.device, dtype=torch.float32)
        sp_b, sp_s = h * d, 0
    else:
        pool = torch.empty((b, split, h * d), device=q.device, dtype=torch.float32)
        sp_b, sp_s = split * h * d, h * d
    kernel[(b * h, split)](
        q, k, v, out, pool,
        h, n, t, d,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        sp_b, sp_s,
        float(scale) * 1.4426950408889634, per,
        BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d,
        FINAL=final,
        IEEE=q.dtype == torch.float32,
        ROUND_BF16=_INTERPRETED and q.dtype == torch.bfloat16,
        UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=num_warps or tuned.get("num_warps") or 4,
        num_stages=num_stages or tuned.get("num_stages") or 2,
    )
    pooled = pool if final else pool.sum(dim=1).div_(n)
    return out, pooled


# ------------------------------------------------------------------------------------ custom op (compile)


@torch.library.custom_op("pure_fast::pooled_attention", mutates_args=())
def _pooled_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, pooled)`` as :func:`pooled_attention_triton` (output in its ``[B, N, H, hd]`` storage)."""
    if backend.triton_usable(q.device.type) and triton_supported(q, k, v) is None:
        return pooled_attention_triton(q, k, v, scale=scale)
    ref_out, pooled = pooled_attention_reference(q, k, v, scale=scale)
    b, h, n, d = q.shape
    out = torch.empty((b, n, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    out.copy_(ref_out)
    return out, pooled


@_pooled_attention_op.register_fake
def _pooled_attention_fake(q, k, v, scale):
    b, h, n, d = q.shape
    out = q.new_empty((b, n, h, d)).transpose(1, 2)
    return out, q.new_empty((b, h * d), dtype=torch.float32)
