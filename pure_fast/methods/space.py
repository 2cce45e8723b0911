"""SPACE: UCE's loss plus an L1 penalty on the entries of W, solved by FISTA ("Empty SPACE: Cross-Attention
Sparsity for Concept Erasure in Diffusion Models").

For every edited weight (``to_k``, ``to_v`` of every ``attn2``)::

    min_W  tr(W M Wᵀ) - 2 tr(W Nᵀ) + μ ||W||_1,      M = λI + s_e C_eᵀC_e + s_p C_pᵀC_p,   N = W0 B

with ``M`` / ``B`` UCE's right / left matrices (``methods/uce.py``; the smooth part is UCE's loss up to a
constant). ``M`` is shared by all layers, so ``λ_max(M)`` (the step) is computed once, and all weights of
one shape are stacked to ``[L, d_out, d_in]`` and solved together by ``ops.fista.fista_solve`` (one GEMM
``Y M`` per iteration for the whole group plus the fused native shrinkage step). μ = 0 gives UCE's ``W0 A``.

Choices (options; recorded in ``edit.options``):

- the UCE part: every UCE option (``lam``, ``erase_scale``, ``preserve_scale``, ``guide``, ``token_mode``,
  ``prompts``, ``edit_keys``, ``edit_values``) with UCE's defaults and conventions;
- μ, scale-free by default: ``target_sparsity`` = 0.85 (the middle of the 80-90 % zeros the paper reports on
  SDXL) with ``mu`` = None. The right absolute μ depends on the weights' scale (an entry in a text direction
  no erase / preserve token touches is zeroed when ``|W0_ij| <= μ / (2λ)``): on the toy model μ = 0.02 gives
  34 % zeros and μ = 0.1 gives 88 %, on tiny SDXL 0.2 gives 86 %, so no absolute default suits SD1.5, SDXL
  and the toy model at once, and a user asking for "SPACE" expects the paper's sparsity, not an arbitrary
  one. So μ is searched: a first guess from the coordinate-wise rule (an entry is zero at the optimum of its
  own 1-D problem, the others held at UCE's solution, iff ``2 M_jj |W_u,ij| <= μ``; μ = the target quantile
  of those values), then at most ``max_solves`` = 8 solves, each warm-started at the previous solution,
  moving μ by a secant (then regula falsi once bracketed) in that quantile coordinate, until the zero
  fraction of all edited weights together is within ``sparsity_tol`` = 0.02 of the target. One μ serves
  every layer (the paper's single objective); groups may end at different sparsities (``stats["fista"]``).
  If no solve lands inside the tolerance the one closest to the target is kept (``stats["mu_search"]``
  lists every solve: μ, zero fraction, iterations). Measured: toy model 3 solves, 84.0 % zeros; tiny SDXL 1
  solve, 86.4 %. The toy world's categories default to a target of 0.2 (``toy/presets.py``, with the
  sweep): its 384-wide weights lose image quality entirely at the paper's sparsity. ``mu`` (absolute, >= 0)
  overrides the search (one solve; 0 gives UCE). ``mu_used`` in ``edit.options`` and ``stats["mu"]``
  record the μ of the returned solution;
- ``max_iter`` = 500, ``tol`` = 1e-5 (relative change ``||W_k - W_{k-1}|| / ||W_k||`` over a group) and
  ``restart`` = True (``ops.fista``: O'Donoghue-Candès gradient restart of the momentum). On the toy model
  (κ(M) ≈ 360) plain FISTA needs 575 / 1049 iterations to reach 1e-5 at μ = 0.02 / 0.1; with restart
  96 / 150. ``restart=False`` gives plain FISTA;
- ``warm_start`` = ``uce``: FISTA starts at UCE's solution ``W0 A`` (the μ = 0 optimum, one thin product).
  Measured on the toy model it needs the same number of iterations as the paper's start at W0
  (``original``: the UCE change is low rank, so the two starts are close), but at μ = 0 it is exact at once;
- ``precision`` = ``float32``: iterates in float32 through the native fused step; ``float64`` uses the torch
  reference (exact comparisons, tests);
- ``storage_dtype`` = ``float16``: values of the CSR file (what SD checkpoints ship in; zeros of the fp16
  cast are dropped); ``float32`` keeps the solver's values;
- ``storage_layout`` = ``auto``: per weight, CSR when it is smaller than the dense matrix in the storage
  dtype, else dense (``edits.sparse``): at low sparsity (below ~35 % zeros with fp16 values) CSR would be
  bigger than the dense weight, so a SPACE file is never bigger than the weights dense in fp16; ``csr`` /
  ``dense`` force one layout;
- ``max_elements`` = 2**27: a shape group larger than this is solved in chunks of layers (memory bound;
  the result is the same problem, chunk by chunk);
- ``gram_route`` = ``auto``: how FISTA forms ``Y M`` (``ops/shifted_low_rank.py``). M = λI + FᵀF with F the
  k erase + preserve token embeddings, so ``factored`` computes ``λY + (Y Fᵀ) F`` (4k flops per weight entry)
  and never forms the d x d matrices (N = W0 B, the UCE start W0 A = W0 + (W0 U)Vᵀ, λ_max(M) from the k x k
  Gram, the objective); ``dense`` is the GEMM with M (2d flops per entry). ``auto`` = factored when 2k < d,
  which is every default solve (UCE's ``prompts=concepts`` gives a few tokens per concept; SDXL d = 2048).
  Both routes solve the same problem (tests: equal iterates within fp32 rounding, and within 1e-10 in fp64).
  Measured (``python bench/bench_fista.py``): see bench/README.md;
- ``history_every`` = 10: every 10th iteration (and the first and last) the objective F(W_k) (float64,
  ``ops.fista.fista_objective``) and the zero fraction of W_k of every group go to ``edit.stats["fista"]``
  (``history_iterations``, ``objective``, ``sparsity``). Each record costs one more ``W M`` product in
  float64, so recording every iteration (``history_every=1``) makes the solve ~4x slower on a CPU; 0 turns
  the history off.

The edit stores the resulting weights as CSR, or dense where CSR does not pay
(:class:`~pure_fast.edits.sparse.SparseWeightsEdit`).

Numerical health: the same token checks and warnings as UCE (``methods/text_health.py``: no retain concepts,
erase tokens equal to the guide's or a retained concept's, nearly collinear erase tokens; M = λI + ... stays
positive definite since λ > 0, so λ_max(M) and FISTA stay finite). Non-finite embeddings and non-finite
solved weights raise :class:`~pure_fast.errors.NumericalError` before an edit is returned.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..edits.edit import model_kv_weights
from ..edits.shared import group_by_shape
from ..edits.sparse import LAYOUTS, SparseWeightsEdit
from ..ops.fista import fista_objective, fista_solve, lambda_max
from ..ops.shifted_low_rank import ShiftedLowRank, right_mm
from ..options import option
from ..progress import progress_bar
from .base import EraseContext, Method
from .text_health import check_finite
from .uce import UCEOptions, prepare_tokens, target_names, uce_factors, uce_matrices

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


GRAM_ROUTES = ("auto", "factored", "dense")
UNIT_OPEN = (0, 1, "()")


@dataclass
class SpaceOptions(UCEOptions):
    mu: float | None = option(None, range=(0, math.inf, "[)"), help="absolute L1 weight μ (None: searched for "
                              "target_sparsity; 0 gives UCE)", use="a finite number >= 0 (the absolute L1 weight; "
                              "0 gives UCE), or leave it unset to reach target_sparsity")
    target_sparsity: float = option(0.85, range=UNIT_OPEN, help="fraction of zero entries to reach (0, 1)",
                                    use="a fraction of zero entries in (0, 1) (the paper reports 0.8-0.9)")
    sparsity_tol: float = option(0.02, range=(0, 0.5, "()"), help="accepted distance to target_sparsity")
    max_solves: int = option(8, range=(1, 50, "[]"), help="FISTA solves of the μ search")
    max_iter: int = option(500, range=(1, 1_000_000, "[]"), help="FISTA iterations per solve")
    tol: float = option(1e-5, range=UNIT_OPEN, help="FISTA stopping tolerance (relative change)")
    restart: bool = option(True, help="gradient restart of the FISTA momentum")
    warm_start: str = option("uce", choices=("uce", "original"), help="FISTA start: UCE's solution or the weights")
    precision: str = option("float32", choices=("float32", "float64"), help="FISTA iterate precision")
    storage_dtype: str = option("float16", choices=tuple(_DTYPES), help="dtype of the stored weights")
    storage_layout: str = option("auto", choices=LAYOUTS, help="CSR or dense per weight (auto: the smaller)")
    max_elements: int = option(2**27, range=(1, math.inf, "[)"), help="largest shape group solved at once")
    history_every: int = option(10, range=(0, math.inf, "[)"), use="an integer >= 0 (0: no history)",
                                help="record the objective every N iterations (0: never)")
    gram_route: str = option("auto", choices=GRAM_ROUTES, help="how FISTA forms Y M (factored or dense)")


def space_operators(tok, lam: float, s_e: float, s_p: float, route: str = "auto"):
    """``(M, B, A, route_used)``: UCE's matrices for SPACE, as :class:`ShiftedLowRank` factors (``factored``)
    or dense float64 d x d matrices (``dense``); ``auto`` picks factored when it needs fewer flops per
    ``Y M`` (2k < d, k = erase + preserve tokens)."""
    F = torch.cat([math.sqrt(s_e) * tok.C_e, math.sqrt(s_p) * tok.C_p]).to(torch.float64)
    M = ShiftedLowRank.gram(lam, F.contiguous())
    if route == "auto":
        route = "factored" if M.cheaper_than_dense() else "dense"
    if route == "dense":
        M, B = uce_matrices(tok, lam, s_e, s_p)
        A = torch.linalg.solve(M, B.T).T
        return M, B, A, route
    B = ShiftedLowRank(lam, torch.cat([tok.C_g, tok.C_p]).to(torch.float64).contiguous(),
                       torch.cat([s_e * tok.C_e, s_p * tok.C_p]).to(torch.float64).contiguous())
    U, V = uce_factors(tok, lam, s_e, s_p)
    return M, B, ShiftedLowRank.identity_plus(U, V), route


def _chunks(weights, opts):
    chunks = []
    for shape, names in group_by_shape(weights).items():
        per = max(1, opts.max_elements // max(1, shape[0] * shape[1]))
        chunks += [(shape, names[i : i + per]) for i in range(0, len(names), per)]
    return chunks


def _solve_all(weights, chunks, M, B, mu, opts, warm, A, bar, solve_index, lam_max):
    """One SPACE solve at a fixed μ for every chunk; ``warm``: name -> start (else UCE's W0 A / W0)."""
    work = torch.float64 if opts.precision == "float64" else torch.float32
    out, stats = {}, []
    for shape, names in chunks:
        W0 = [weights[n] for n in names]  # a lazy mapping reads each once here
        dev = W0[0].device
        W0 = torch.stack([w.detach().to(dev, torch.float64) for w in W0])
        N = right_mm(W0, B).to(work)
        if warm is not None:
            start = torch.stack([warm[n].to(dev, work) for n in names])
        else:
            start = right_mm(W0, A).to(work) if opts.warm_start == "uce" else None
        t0 = time.perf_counter()
        Mw = M.to(dev, work)
        every = int(opts.history_every)
        hist_k, hist_f, hist_z = [], [], []
        numel = W0.numel()

        def record(k, W):
            hist_k.append(k)
            hist_f.append(float(f"{fista_objective(W, Mw, N, mu):.10g}"))
            hist_z.append(round(1.0 - int(torch.count_nonzero(W)) / numel, 6))

        done = [0]

        def cb(k, W, rel):
            bar.update(1)
            done[0] = k
            if every and (k == 1 or k % every == 0):
                record(k, W)
            if k % 10 == 0:
                bar.set_postfix_str(f"{shape[0]}x{shape[1]} mu {mu:.3g} rel {rel:.2e}")

        res = fista_solve(W0.to(work), Mw, N, mu, max_iter=opts.max_iter, tol=float(opts.tol), warm_start=start,
                          callback=cb, history=False, reference=work == torch.float64, restart=opts.restart)
        if every and (not hist_k or hist_k[-1] != res.iterations):
            record(res.iterations, res.W)
        bar.update(opts.max_iter - done[0])
        for j, n in enumerate(names):
            out[n] = res.W[j]
        stats.append({
            "shape": list(shape), "weights": len(names), "mu": mu, "solve": solve_index,
            "iterations": res.iterations, "converged": res.converged, "rel_change": res.rel_change,
            "restarts": res.restarts, "lipschitz": res.lipschitz, "lambda_max": lam_max,
            "zero_fraction": res.zero_fraction, "time_s": time.perf_counter() - t0,
            "gram_route": "factored" if isinstance(M, ShiftedLowRank) else "dense",
            "gram_rank": M.k if isinstance(M, ShiftedLowRank) else None,
            "history_iterations": hist_k, "objective": hist_f, "sparsity": hist_z,
        })
    return out, stats


def _zero_fraction(out: dict) -> float:
    total = sum(w.numel() for w in out.values())
    return 1.0 - sum(int(torch.count_nonzero(w)) for w in out.values()) / total if total else 0.0


class _Predictor:
    """μ ↔ zero fraction by the coordinate-wise (diagonal) rule, used to place the μ search.

    Fix every entry of row i but ``w_ij`` at UCE's solution ``W_u = N M⁻¹``: the 1-D problem
    ``M_jj w² - 2 w r + μ|w|`` with ``r = N_ij - Σ_{k≠j} W_u,ik M_kj = M_jj W_u,ij`` has its minimum at 0 iff
    ``2 M_jj |W_u,ij| <= μ``. So the fraction of entries with ``s_ij = 2 M_jj |W_u,ij| <= μ`` predicts the
    zero fraction at μ (exact when M is diagonal); ``mu_at(q)`` is the q-quantile of s (over a strided sample
    of at most 2**22 entries of every weight)."""

    def __init__(self, weights, A, M, cap=2**22):
        shapes = group_by_shape(weights)  # from the headers for a lazy mapping (no read)
        total = sum(s[0] * s[1] * len(n) for s, n in shapes.items())
        stride = max(1, -(-total // cap))
        diag = 2.0 * (M.diagonal() if isinstance(M, ShiftedLowRank) else torch.diagonal(M)).to(torch.float64)
        parts = []
        for w in weights.values():
            s = right_mm(w.detach().to(torch.float64), A).abs_() * diag.to(w.device)
            parts.append(s.flatten()[::stride].cpu())
        self.s = torch.sort(torch.cat(parts)).values

    def mu_at(self, q: float) -> float:
        n = self.s.numel()
        q = min(max(q, 0.5 / n), 1.0 - 0.5 / n)
        return float(self.s[min(n - 1, max(0, int(q * n)))])


def space_solve(weights: dict[str, torch.Tensor], M, B, opts: SpaceOptions, A=None,
                progress: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Solve SPACE for every weight (name -> [d_out, d_in]); returns (name -> W in the work dtype, per-chunk
    stats of the returned solve; each carries ``mu``, and, when μ was searched, ``search``: one record per
    solve ``{mu, zero_fraction, iterations}``). ``A``: UCE's right matrix (computed from M, B when None).
``M``, ``B``, ``A``: dense float64 matrices or :class:`ShiftedLowRank` factors (``space_operators``).

    With ``opts.mu`` set, one solve at that μ. Otherwise μ is searched for ``opts.target_sparsity`` (module
    docstring): at most ``max_solves`` solves, each warm-started at the previous solution."""
    if A is None:
        Md = M.dense(torch.float64) if isinstance(M, ShiftedLowRank) else M
        Bd = B.dense(torch.float64) if isinstance(B, ShiftedLowRank) else B
        A = torch.linalg.solve(Md, Bd.T).T  # B M^{-1} (M symmetric)
    chunks = _chunks(weights, opts)
    lam_max = M.lambda_max() if isinstance(M, ShiftedLowRank) else lambda_max(M)
    solves = 1 if opts.mu is not None else int(opts.max_solves)
    with progress_bar(total=len(chunks) * opts.max_iter * solves, desc="SPACE (FISTA)", enabled=progress) as bar:
        if opts.mu is not None:
            out, stats = _solve_all(weights, chunks, M, B, float(opts.mu), opts, None, A, bar, 0, lam_max)
            return out, stats
        target, slack = float(opts.target_sparsity), float(opts.sparsity_tol)
        pred = _Predictor(weights, A, M)
        q = target
        lo = hi = None  # (q, zero fraction) with zero fraction below / above the target
        best, search, warm, seen = None, [], None, []
        rounds = 0
        for r in range(solves):
            rounds += 1
            mu = pred.mu_at(q)
            out, stats = _solve_all(weights, chunks, M, B, mu, opts, warm, A, bar, r, lam_max)
            z = _zero_fraction(out)
            search.append({"mu": mu, "zero_fraction": round(z, 6),
                           "iterations": max(s["iterations"] for s in stats)})
            seen.append((q, z))
            if best is None or abs(z - target) < abs(best[2] - target):
                best = (out, stats, z)
            if abs(z - target) <= slack:
                break
            warm = out
            if z < target:
                lo = (q, z) if lo is None or q > lo[0] else lo
            else:
                hi = (q, z) if hi is None or q < hi[0] else hi
            if lo is not None and hi is not None:  # regula falsi in the predictor's quantile coordinate
                q_new = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / max(hi[1] - lo[1], 1e-12)
                if not lo[0] < q_new < hi[0] or pred.mu_at(q_new) in (pred.mu_at(lo[0]), pred.mu_at(hi[0])):
                    q_new = 0.5 * (lo[0] + hi[0])
            elif len(seen) >= 2 and seen[-1][1] != seen[-2][1]:  # secant through the last two solves
                (q1, z1), (q2, z2) = seen[-2], seen[-1]
                slope = (z2 - z1) / (q2 - q1) if q2 != q1 else 0.0
                q_new = q2 + (target - z2) / slope if slope > 0 else q2 + (target - z2)
            else:  # shift the predictor's level by the error seen
                q_new = q + (target - z)
            q = min(max(q_new, 0.0), 1.0)
        bar.update((solves - rounds) * len(chunks) * opts.max_iter)
    out, stats, z = best
    for s in stats:
        s["search"] = search
    return out, stats


def make_edit(ctx: EraseContext) -> SparseWeightsEdit:
    opts, adapter = ctx.options, ctx.adapter
    tok, s_p = prepare_tokens("SPACE", ctx)
    with ctx.timed("fista_s"):
        M, B, A, route = space_operators(tok, float(opts.lam), float(opts.erase_scale), s_p, opts.gram_route)
        names = target_names(adapter, opts.edit_keys, opts.edit_values)
        kv = model_kv_weights(adapter)
        layers = kv.subset(names) if getattr(kv, "lazy", False) else {n: kv[n] for n in names}  # lazy: read per chunk
        solved, fista_stats = space_solve(layers, M, B, opts, A=A, progress=ctx.progress)
        for n in names:
            check_finite("SPACE", "the solved weights", **{n: solved[n]})
    with ctx.timed("csr_s"):
        mu_used = fista_stats[0]["mu"] if fista_stats else opts.mu
        meta = ctx.options_meta(preserve_scale_used=s_p, mu_used=mu_used)
        search = [s.pop("search", []) for s in fista_stats][0] if fista_stats else []
        stats = ctx.stats(erase_tokens=int(tok.C_e.shape[0]), preserve_tokens=int(tok.C_p.shape[0]), fista=fista_stats,
                          mu=mu_used, gram_route=route, mu_search=search,
                          iterations=max((s["iterations"] for s in fista_stats), default=0),
                          converged=all(s["converged"] for s in fista_stats))
        edit = SparseWeightsEdit.from_dense(
            {n: solved[n] for n in names}, storage_dtype=_DTYPES[opts.storage_dtype], layout=opts.storage_layout,
            method="space", family=adapter.family, concepts={"forget": ctx.forget, "retain": ctx.retain},
            options=meta, stats=stats,
        )
    info = edit.inspect()
    stats["zero_fraction"] = info["zero_fraction"]
    stats["stored_bytes"] = info["tensor_bytes"]
    stats["dense_fp16_bytes"] = info["dense_fp16_bytes"]
    return edit


METHOD = Method("space", SpaceOptions, make_edit,
                "SPACE: UCE's objective plus an L1 penalty (FISTA): sparse K/V weights", model_parts="text")
