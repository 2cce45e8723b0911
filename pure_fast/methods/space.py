"""SPACE: UCE's loss plus an L1 penalty on the entries of W, solved by FISTA (DESIGN.md "SPACE", papers/003).

For every edited weight (``to_k``, ``to_v`` of every ``attn2``)::

    min_W  tr(W M Wᵀ) - 2 tr(W Nᵀ) + μ ||W||_1,      M = λI + s_e C_eᵀC_e + s_p C_pᵀC_p,   N = W0 B

with ``M`` / ``B`` UCE's right / left matrices (``methods/uce.py``; the smooth part is UCE's loss up to a
constant). ``M`` is shared by all layers, so ``λ_max(M)`` (the step) is computed once, and all weights of
one shape are stacked to ``[L, d_out, d_in]`` and solved together by ``ops.fista.fista_solve`` (one GEMM
``Y M`` per iteration for the whole group plus the fused native shrinkage step). μ = 0 gives UCE's ``W0 A``.

Choices (options; recorded in ``edit.options``):

- the UCE part: every UCE option (``lam``, ``erase_scale``, ``preserve_scale``, ``guide``, ``token_mode``,
  ``prompts``, ``edit_keys``, ``edit_values``) with UCE's defaults and conventions;
- ``mu`` = 0.02: an entry in a text direction that no erase / preserve token touches is zeroed when
  ``|W0_ij| <= μ / (2λ)`` (there the problem is ``λ (w - w0)² + μ |w|``), so μ is on the scale of the
  weights' entries (SD's K/V entries are a few 1e-2); the paper tunes μ per task by grid search;
- ``max_iter`` = 500, ``tol`` = 1e-5 (relative change ``||W_k - W_{k-1}|| / ||W_k||`` over a group). On the
  toy model (κ(M) ≈ 360) the zero fraction saturates by ~200 iterations and the objective is within 5e-7
  (relative) of its 3000-iteration value at 500; in float32 the relative change stalls near 1e-6, so a
  smaller tol only spends ``max_iter``;
- ``warm_start`` = ``uce``: FISTA starts at UCE's solution ``W0 A`` (the μ = 0 optimum, one thin product).
  Measured on the toy model it needs the same number of iterations as the paper's start at W0
  (``original``: the UCE change is low rank, so the two starts are close), but at μ = 0 it is exact at once;
- ``precision`` = ``float32``: iterates in float32 through the native fused step; ``float64`` uses the torch
  reference (exact comparisons, tests);
- ``storage_dtype`` = ``float16``: values of the CSR file (what SD checkpoints ship in; zeros of the fp16
  cast are dropped); ``float32`` keeps the solver's values;
- ``max_elements`` = 2**27: a shape group larger than this is solved in chunks of layers (memory bound;
  the result is the same problem, chunk by chunk);
- ``history_every`` = 10: every 10th iteration (and the first and last) the objective F(W_k) (float64,
  ``ops.fista.fista_objective``) and the zero fraction of W_k of every group go to ``edit.stats["fista"]``
  (``history_iterations``, ``objective``, ``sparsity``). Each record costs one more ``W M`` product in
  float64, so recording every iteration (``history_every=1``) makes the solve ~4x slower on a CPU; 0 turns
  the history off.

The edit stores the resulting weights as CSR (:class:`~pure_fast.edits.sparse.SparseWeightsEdit`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..edits.edit import kv_weights
from ..edits.shared import group_by_shape
from ..edits.sparse import SparseWeightsEdit
from ..errors import UsageError
from ..ops.fista import fista_objective, fista_solve, lambda_max
from ..progress import progress_bar
from .uce import UCEOptions, options_meta, preserve_scale_of, resolve_guides, target_names, uce_matrices, uce_tokens

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class SpaceOptions(UCEOptions):
    mu: float = 0.02
    max_iter: int = 500
    tol: float = 1e-5
    warm_start: str = "uce"
    precision: str = "float32"
    storage_dtype: str = "float16"
    max_elements: int = 2**27
    history_every: int = 10

    def validate(self) -> None:
        super().validate()
        mu = self.mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (0 <= mu < math.inf):
            raise UsageError(f"mu={mu!r} is out of range; use a finite number >= 0 (the L1 weight; 0 gives UCE)")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or not 1 <= self.max_iter <= 1_000_000:
            raise UsageError(f"max_iter={self.max_iter!r} is out of range; use an integer in [1, 1000000]")
        t = self.tol
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < 1):
            raise UsageError(f"tol={t!r} is out of range; use a number in (0, 1)")
        if self.warm_start not in ("uce", "original"):
            raise UsageError(f"warm_start={self.warm_start!r} is not valid; use uce or original")
        if self.precision not in ("float32", "float64"):
            raise UsageError(f"precision={self.precision!r} is not valid; use float32 or float64")
        if self.storage_dtype not in _DTYPES:
            raise UsageError(f"storage_dtype={self.storage_dtype!r} is not valid; use {', '.join(_DTYPES)}")
        h = self.history_every
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise UsageError(f"history_every={h!r} is out of range; use an integer >= 0 (0: no history)")
        if isinstance(self.max_elements, bool) or not isinstance(self.max_elements, int) or self.max_elements < 1:
            raise UsageError(f"max_elements={self.max_elements!r} is out of range; use an integer >= 1")


OPTIONS = SpaceOptions


def space_solve(weights: dict[str, torch.Tensor], M: torch.Tensor, B: torch.Tensor, opts: SpaceOptions,
                A: torch.Tensor | None = None, progress: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Solve SPACE for every weight (name -> [d_out, d_in]); returns (name -> W in the work dtype, per-chunk
    stats). ``A``: UCE's right matrix for the warm start (computed from M, B when None)."""
    work = torch.float64 if opts.precision == "float64" else torch.float32
    groups = group_by_shape(weights)
    if A is None and opts.warm_start == "uce":
        A = torch.linalg.solve(M, B.T).T  # B M^{-1} (M symmetric)
    chunks = []
    for shape, names in groups.items():
        per = max(1, opts.max_elements // max(1, shape[0] * shape[1]))
        chunks += [(shape, names[i : i + per]) for i in range(0, len(names), per)]
    lam_max = lambda_max(M)
    out, stats = {}, []
    with progress_bar(total=len(chunks) * opts.max_iter, desc="SPACE (FISTA)", enabled=progress) as bar:
        for shape, names in chunks:
            dev = weights[names[0]].device
            W0 = torch.stack([weights[n].detach().to(dev, torch.float64) for n in names])
            N = (W0 @ B.to(dev)).to(work)
            warm = (W0 @ A.to(dev)).to(work) if opts.warm_start == "uce" else None
            t0 = time.perf_counter()
            Mw = M.to(dev, work)
            every = int(opts.history_every)
            hist_k, hist_f, hist_z = [], [], []
            numel = W0.numel()

            def record(k, W):
                hist_k.append(k)
                hist_f.append(float(f"{fista_objective(W, Mw, N, float(opts.mu)):.10g}"))
                hist_z.append(round(1.0 - int(torch.count_nonzero(W)) / numel, 6))

            done = [0]

            def cb(k, W, rel):
                bar.update(1)
                done[0] = k
                if every and (k == 1 or k % every == 0):
                    record(k, W)
                if k % 10 == 0:
                    bar.set_postfix_str(f"{shape[0]}x{shape[1]} rel {rel:.2e}")

            res = fista_solve(W0.to(work), Mw, N, float(opts.mu), max_iter=opts.max_iter,
                              tol=float(opts.tol), warm_start=warm, callback=cb, history=False,
                              reference=work == torch.float64)
            if every and (not hist_k or hist_k[-1] != res.iterations):
                record(res.iterations, res.W)
            bar.update(opts.max_iter - done[0])
            for j, n in enumerate(names):
                out[n] = res.W[j]
            stats.append({
                "shape": list(shape), "weights": len(names), "iterations": res.iterations,
                "converged": res.converged, "rel_change": res.rel_change, "lipschitz": res.lipschitz,
                "lambda_max": lam_max, "zero_fraction": res.zero_fraction, "time_s": time.perf_counter() - t0,
                "history_iterations": hist_k, "objective": hist_f, "sparsity": hist_z,
            })
    return out, stats


def make_edit(adapter, forget, retain, f_prompts, r_prompts, options=None, progress=True) -> SparseWeightsEdit:
    opts = options or SpaceOptions()
    opts.validate()
    forget, retain = list(forget), list(retain)
    resolve_guides(opts.guide, forget)
    timings = {}
    t0 = time.perf_counter()
    tok = uce_tokens(adapter, forget, retain, f_prompts, r_prompts, opts)
    timings["tokens_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_p = preserve_scale_of(opts, retain)
    M, B = uce_matrices(tok, float(opts.lam), float(opts.erase_scale), s_p)
    A = torch.linalg.solve(M, B.T).T
    names = target_names(adapter, opts.edit_keys, opts.edit_values)
    kv = kv_weights(adapter.unet)
    layers = {n: kv[n] for n in names}
    solved, fista_stats = space_solve(layers, M, B, opts, A=A, progress=progress)
    timings["fista_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta = options_meta(opts)
    meta["preserve_scale_used"] = s_p
    stats = {"timings": timings, "erase_tokens": int(tok.C_e.shape[0]), "preserve_tokens": int(tok.C_p.shape[0]),
             "fista": fista_stats,
             "iterations": max((s["iterations"] for s in fista_stats), default=0),
             "converged": all(s["converged"] for s in fista_stats)}
    edit = SparseWeightsEdit.from_dense(
        {n: solved[n] for n in names}, storage_dtype=_DTYPES[opts.storage_dtype],
        method="space", family=adapter.family, concepts={"forget": forget, "retain": retain},
        options=meta, stats=stats,
    )
    timings["csr_s"] = time.perf_counter() - t0
    info = edit.inspect()
    stats["zero_fraction"] = info["zero_fraction"]
    stats["stored_bytes"] = info["tensor_bytes"]
    stats["dense_fp16_bytes"] = info["dense_fp16_bytes"]
    return edit
