"""FISTA for SPACE: the fused elementwise step (native C++/OpenMP or CUDA, torch reference) and the solver.

SPACE ("Empty SPACE: Cross-Attention Sparsity for Concept Erasure in Diffusion Models") minimises, for every weight matrix W of shape ``[d_out, d_in]``::

    F(W) = tr(W M W^T) - 2 tr(W N^T) + mu * ||W||_1          (M symmetric positive definite, shared)

The smooth part has gradient ``2 (W M - N)`` and Lipschitz constant ``L = 2 lambda_max(M)``. One FISTA
iteration is a matmul ``YM = Y @ M`` (left to torch) and one elementwise pass, which is what
:func:`fista_step` fuses::

    g      = Y - (YM - N) * step            step = 1 / lambda_max(M)   (= 2 / L)
    w      = sign(g) * max(|g| - tau, 0)    tau  = mu / L
    Y_next = w + beta * (w - W_prev)        beta = (t - 1) / t_next

together with the reductions the stopping rule needs: ``nnz(w)``, ``sum (w - W_prev)^2``, ``sum w^2``.

``M`` may be a dense matrix or a :class:`~pure_fast.ops.shifted_low_rank.ShiftedLowRank` ``shift I + FᵀF``
(SPACE's M is λI plus the Gram of k token embeddings): then ``YM = shift Y + (Y Fᵀ) F`` costs 4k instead of
2d flops per entry (SDXL, d = 2048: the dense GEMM is ~1.4 TFLOP per iteration over the 140 K/V weights;
with k = 10 tokens the factored product is ~100x fewer flops and the iteration is memory bound).

Adaptive restart (:func:`fista_solve`, ``restart=True``, the default): O'Donoghue & Candès' *gradient*
scheme (Found. Comput. Math. 2015) for the proximal case: after the step from ``Y_k`` to ``W_{k+1}``,
momentum is thrown away (``t = 1``, ``Y_{k+1} = W_{k+1}``) when ``(Y_k - W_{k+1}) . (W_{k+1} - W_k) > 0``,
i.e. when the generalized gradient ``L (Y_k - W_{k+1})`` makes an acute angle with the last move, the
momentum now points uphill. FISTA without restart oscillates on ill-conditioned problems (SPACE's ``M`` has
κ ≈ 360 on the toy model) and stalls; with restart it converges linearly on strongly convex problems.
The dot product is a fifth reduction of the fused step (``restart_dot=True``: ``sum (Y_k - W_{k+1})
(W_{k+1} - W_k)`` accumulated in float64 while Y_k is read, before Y_out overwrites it), so the test costs no
extra pass and no extra buffer: the step updates W and Y in place, and on a restart (beta > 0, dot > 0;
at beta = 0 the momentum is already nil) one copy sets ``Y_{k+1} = W_{k+1}``. (Before, the test took two
more elementwise passes, a dot and a spare [L, d_out, d_in] buffer per iteration.) The function-value scheme
(restart when F rises) is not used: F(W_k) needs another ``W M`` product per iteration, which doubles the
cost of an iteration; the gradient scheme is the one O'Donoghue & Candès recommend for that reason.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import backend
from .shifted_low_rank import ShiftedLowRank

__all__ = [
    "FistaResult",
    "fista_objective",
    "fista_solve",
    "fista_step",
    "fista_step_reference",
]

_TINY = 1e-300


# --------------------------------------------------------------------------------------------- the step


def fista_step_reference(
    Y: torch.Tensor,
    YM: torch.Tensor,
    N: torch.Tensor,
    W_prev: torch.Tensor,
    step: float,
    tau: float,
    beta: float,
    *,
    W_out: Optional[torch.Tensor] = None,
    Y_out: Optional[torch.Tensor] = None,
    restart_dot: bool = False,
) -> tuple:
    """The step in plain torch ops (the eager baseline and the ground truth in tests).

    Returns ``(W, Y_next, nnz(W), sum (W - W_prev)^2, sum W^2)``, and with ``restart_dot=True`` also
    ``sum (Y - W) (W - W_prev)`` (the gradient-restart test, accumulated in float64). ``W_out`` / ``Y_out``
    receive the results when given (they may be ``W_prev`` / ``Y`` themselves).
    """
    g = Y - (YM - N) * step
    w = torch.sign(g) * (g.abs() - tau).clamp_min(0)
    d = w - W_prev
    y = w + beta * d
    nnz = int(torch.count_nonzero(w))
    diff_sq = float((d * d).sum())
    norm_sq = float((w * w).sum())
    rdot = float(((Y.double() - w.double()) * d.double()).sum()) if restart_dot else None  # before Y_out is written
    if W_out is not None:
        W_out.copy_(w.view_as(W_out))
        w = W_out
    if Y_out is not None:
        Y_out.copy_(y.view_as(Y_out))
        y = Y_out
    return (w, y, nnz, diff_sq, norm_sq, rdot) if restart_dot else (w, y, nnz, diff_sq, norm_sq)


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check_out(out: torch.Tensor, name: str, inputs: dict, others: dict) -> None:
    """An output may be exactly one of the inputs (same address, read-before-write is safe elementwise) or
    lie apart from every buffer; a partial overlap would corrupt the result."""
    lo, hi = _span(out)
    if hi == lo:
        return
    for other_name, t in {**inputs, **others}.items():
        a, b = _span(t)
        if b == a or hi <= a or b <= lo:
            continue
        if other_name in inputs and a == lo and b == hi:
            continue
        raise ValueError(f"fista_step: {name} overlaps {other_name} without being the same buffer")


def _native_ok(ts) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.device == ts[0].device for t in ts) and ts[
        0
    ].device.type in ("cpu", "cuda")


def fista_step(
    Y: torch.Tensor,
    YM: torch.Tensor,
    N: torch.Tensor,
    W_prev: torch.Tensor,
    step: float,
    tau: float,
    beta: float,
    *,
    W_out: Optional[torch.Tensor] = None,
    Y_out: Optional[torch.Tensor] = None,
    restart_dot: bool = False,
) -> tuple:
    """One fused FISTA step (see the module docstring); same contract as :func:`fista_step_reference`
    (``restart_dot=True`` appends ``sum (Y - W)(W - W_prev)``, a fifth fused reduction on the native path).

    All tensors must have the same number of elements (any shape, typically ``[L, d_out, d_in]``). fp32
    contiguous tensors on cpu/cuda go to the native kernel (unless a backend is forced); anything else runs
    the torch reference. ``W_out`` may be ``W_prev`` and ``Y_out`` may be ``Y`` (in-place update).
    """
    inputs = {"Y": Y, "YM": YM, "N": N, "W_prev": W_prev}
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fista_step: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.numel() != Y.numel():
            raise ValueError(f"fista_step: {name} has {t.numel()} elements but Y has {Y.numel()}")
    for name, t in (("W_out", W_out), ("Y_out", Y_out)):
        if t is not None and t.numel() != Y.numel():
            raise ValueError(f"fista_step: {name} has {t.numel()} elements but Y has {Y.numel()}")
    if not tau >= 0 or not math.isfinite(tau):
        raise ValueError(f"fista_step: tau must be finite and >= 0, got {tau}")
    # overlap rules hold on both paths (the reference's copy_ into a partially overlapping W_out / Y_out
    # would silently corrupt the returned W)
    if W_out is not None:
        _check_out(W_out, "W_out", inputs, {"Y_out": Y_out} if Y_out is not None else {})
    if Y_out is not None:
        _check_out(Y_out, "Y_out", inputs, {})
    ts = [Y, YM, N, W_prev] + [t for t in (W_out, Y_out) if t is not None]
    if not (_native_ok(ts) and backend.choose(Y.device.type, native=True) == "native"):
        return fista_step_reference(Y, YM, N, W_prev, step, tau, beta, W_out=W_out, Y_out=Y_out,
                                    restart_dot=restart_dot)

    from .. import _native

    C = _native.load()
    on_cuda = Y.device.type == "cuda"
    if on_cuda and not C.has_cuda():
        raise _native.NativeUnavailable(
            f"pure_fast._C was built without CUDA; rebuild with PURE_FAST_CUDA=ON: {_native.REBUILD}"
        )
    if W_out is None:
        W_out = torch.empty_like(Y)
    if Y_out is None:
        Y_out = torch.empty_like(Y)
    _check_out(W_out, "W_out", inputs, {"Y_out": Y_out})
    _check_out(Y_out, "Y_out", inputs, {})
    nnz, diff_sq, norm_sq, rdot = C.fista_step(
        Y.data_ptr(), YM.data_ptr(), N.data_ptr(), W_prev.data_ptr(), W_out.data_ptr(), Y_out.data_ptr(),
        Y.numel(), float(step), float(tau), float(beta), on_cuda, _native.stream_handle(Y),
    )  # fmt: skip
    return (W_out, Y_out, nnz, diff_sq, norm_sq, rdot) if restart_dot else (W_out, Y_out, nnz, diff_sq, norm_sq)


# --------------------------------------------------------------------------------------------- the solver


@dataclass
class FistaResult:
    """What :func:`fista_solve` returns.

    ``W`` has the shape and dtype of ``W0``; ``iterations`` counts FISTA steps taken; ``converged`` is True
    when the relative change ``||W_k - W_{k-1}|| / ||W_k||`` fell below ``tol``; ``rel_change`` is its last
    value; ``objective`` / ``sparsity`` hold per-iteration F(W_k) (summed over the batch) and the fraction of
    zero entries of W_k when ``history=True`` (else empty); ``lipschitz`` is L = 2 lambda_max(M);
    ``restarts`` counts adaptive momentum restarts.
    """

    W: torch.Tensor
    iterations: int
    converged: bool
    rel_change: float
    lipschitz: float
    objective: list = field(default_factory=list)
    sparsity: list = field(default_factory=list)
    restarts: int = 0

    @property
    def zero_fraction(self) -> float:
        """Fraction of exactly-zero entries in W."""
        n = self.W.numel()
        return 1.0 - int(torch.count_nonzero(self.W)) / n if n else 0.0


def fista_objective(W: torch.Tensor, M, N: torch.Tensor, mu: float) -> float:
    """F(W) = tr(W M W^T) - 2 tr(W N^T) + mu ||W||_1, summed over leading batch dims, accumulated in fp64.
    ``M``: a dense matrix or a :class:`~pure_fast.ops.shifted_low_rank.ShiftedLowRank` (no d x d product)."""
    Wd, Nd = W.double(), N.double()
    if isinstance(M, ShiftedLowRank):
        quad = M.to(Wd.device, torch.float64).quadratic_trace(Wd)
    else:
        quad = (Wd * (Wd @ M.double())).sum()
    return float(quad - 2.0 * (Wd * Nd).sum() + mu * Wd.abs().sum())


def _validate_options(mu, max_iter, tol) -> None:
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be a finite number >= 0 (the L1 weight), got {mu!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0 (relative change), got {tol!r}")


def lambda_max(M: torch.Tensor) -> float:
    """Largest eigenvalue of a symmetric matrix, in fp64 (eigvalsh)."""
    return float(torch.linalg.eigvalsh(M.detach().to(torch.float64))[-1])


def fista_solve(
    W0: torch.Tensor,
    M: torch.Tensor,
    N: torch.Tensor,
    mu: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    warm_start: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, torch.Tensor, float], Optional[bool]]] = None,
    history: bool = False,
    reference: bool = False,
    restart: bool = True,
) -> FistaResult:
    """Minimise ``tr(W M W^T) - 2 tr(W N^T) + mu ||W||_1`` over W of shape ``[..., d_out, d_in]`` by FISTA.

    ``W0``: the original weights; they fix the shape, dtype and device and are the starting point unless
    ``warm_start`` (same shape, e.g. the solution for a nearby mu) is given. Leading dims are a batch of
    independent problems sharing one ``M`` (``[d_in, d_in]``, symmetric positive definite; in SPACE the
    UCE right matrix; dense, or a ``ShiftedLowRank.gram`` whose products never form the d x d matrix) and each with its own ``N`` (shape of W0; in SPACE ``W0 B``).
    Iterates in fp64 when W0 is fp64, else in fp32 (the native step); W is returned in W0's dtype.
    Stops when ``sqrt(sum (W_k - W_{k-1})^2 / sum W_k^2) < tol`` (over the whole batch) or after
    ``max_iter`` steps. ``callback(k, W_k, rel_change)`` runs after every step; returning True stops early.
    ``reference=True`` uses the torch reference step instead of the dispatching one (for comparisons).
    ``restart=True`` resets the momentum by O'Donoghue & Candès' gradient test (module docstring); False
    gives plain FISTA. mu = 0 gives the UCE solution ``N M^{-1}``.
    """
    _validate_options(mu, max_iter, tol)
    if not isinstance(restart, bool):
        raise ValueError(f"restart must be True or False, got {restart!r}")
    for name, t in (("W0", W0), ("M", M), ("N", N)):
        if not isinstance(t, torch.Tensor) and not (name == "M" and isinstance(t, ShiftedLowRank)):
            raise TypeError(f"fista_solve: {name} must be a torch.Tensor, got {type(t).__name__}")
    if W0.dim() < 2:
        raise ValueError(f"fista_solve: W0 must have shape [..., d_out, d_in], got {tuple(W0.shape)}")
    d_in = W0.shape[-1]
    factored = isinstance(M, ShiftedLowRank)
    if factored and not M.symmetric:
        raise ValueError("fista_solve: a factored M must be a symmetric ShiftedLowRank.gram(shift, F)")
    if tuple(M.shape) != (d_in, d_in):
        raise ValueError(f"fista_solve: M must have shape [{d_in}, {d_in}] (d_in of W0), got {tuple(M.shape)}")
    if N.shape != W0.shape:
        raise ValueError(f"fista_solve: N must have the shape of W0 {tuple(W0.shape)}, got {tuple(N.shape)}")
    if not (W0.is_floating_point() and (M.L if factored else M).is_floating_point() and N.is_floating_point()):
        raise TypeError("fista_solve: W0, M and N must be floating-point tensors")
    if W0.numel() == 0:
        return FistaResult(W=W0.detach().clone(), iterations=0, converged=True, rel_change=0.0, lipschitz=float("nan"))
    start = W0
    if warm_start is not None:
        if not isinstance(warm_start, torch.Tensor) or warm_start.shape != W0.shape:
            raise ValueError(f"fista_solve: warm_start must be a tensor of shape {tuple(W0.shape)}")
        start = warm_start
    work = torch.float64 if W0.dtype == torch.float64 else torch.float32
    dev = W0.device

    if factored:
        Md = M.to(dev, torch.float64)
        lam = Md.lambda_max()
    else:
        Md = M.detach().to(dev, torch.float64)
        asym = float((Md - Md.T).abs().max()) if Md.numel() else 0.0
        if asym > 1e-6 * max(float(Md.abs().max()), _TINY):
            raise ValueError(f"fista_solve: M must be symmetric (max |M - M^T| = {asym:.3g})")
        lam = lambda_max(Md)
    if not lam > 0 or not math.isfinite(lam):
        raise ValueError(f"fista_solve: M must be positive definite (lambda_max = {lam})")
    L = 2.0 * lam
    step = 1.0 / lam  # gradient step 1/L on grad = 2(YM - N)
    tau = mu / L

    Mw = Md.to(dev, work) if factored else Md.to(work).contiguous()
    Nw = N.detach().to(dev, work).contiguous()
    W = start.detach().to(dev, work).clone(memory_format=torch.contiguous_format)
    Y = W.clone()
    YM = torch.empty_like(Y)
    YM2 = YM.view(-1, d_in)
    scratch = W.new_empty(YM2.shape[0], Mw.k) if factored else None
    step_fn = fista_step_reference if reference else fista_step

    t = 1.0
    it, converged, rel, restarts = 0, False, float("inf"), 0
    objective, sparsity = [], []
    numel = W.numel()
    for it in range(1, max_iter + 1):
        if factored:
            Mw.right_mm(Y, out=YM, scratch=scratch)
        else:
            torch.mm(Y.view(-1, d_in), Mw, out=YM2)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        beta = (t - 1.0) / t_next
        _, _, nnz, diff_sq, norm_sq, rdot = step_fn(Y, YM, Nw, W, step, tau, beta, W_out=W, Y_out=Y,
                                                     restart_dot=True)
        rel = math.sqrt(diff_sq / max(norm_sq, _TINY))
        t = t_next
        if restart and beta > 0.0 and rdot > 0.0:  # momentum points uphill: Y_{k+1} = W_{k+1}, t = 1
            Y.copy_(W)
            t = 1.0
            restarts += 1
        if history:
            objective.append(fista_objective(W, Mw, Nw, mu))
            sparsity.append(1.0 - nnz / numel if numel else 0.0)
        if callback is not None and callback(it, W, rel):
            break
        if rel < tol:
            converged = True
            break
    return FistaResult(
        W=W.to(W0.dtype), iterations=it, converged=converged, rel_change=rel, lipschitz=L,
        objective=objective, sparsity=sparsity, restarts=restarts,
    )  # fmt: skip
