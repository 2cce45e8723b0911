"""FISTA step (native vs torch, tolerances derived against fp64) and the SPACE solver (optimality checks)."""
import math

import pytest
import torch

from pure_fast import _native
from pure_fast.ops import backend, fista

needs_native = pytest.mark.skipif(not _native.available(), reason="pure_fast._C not built")

EPS32 = torch.finfo(torch.float32).eps

SHAPES = {
    "67x40": (67, 40),
    "1x1": (1, 1),
    "0_rows": (0, 40),
    "batch_3x5x7": (3, 5, 7),
    "sd_2x320x768": (2, 320, 768),
}


def _inputs(shape, seed=0, zeros=False):
    g = torch.Generator().manual_seed(seed)
    if zeros:
        return [torch.zeros(shape) for _ in range(4)]
    return [torch.randn(shape, generator=g) for _ in range(4)]  # Y, YM, N, W_prev


def _fp64_step(Y, YM, N, W_prev, step, tau, beta):
    Y, YM, N, W_prev = (t.double() for t in (Y, YM, N, W_prev))
    g = Y - (YM - N) * step
    w = torch.sign(g) * (g.abs() - tau).clamp_min(0)
    d = w - W_prev
    return w, w + beta * d, g, float((d * d).sum()), float((w * w).sum())


def _check_against_fp64(native, torch32, exact, tau):
    """Derived tolerance: native's error vs fp64 at most 2x that of plain fp32 torch (+ one rounding)."""
    w64, y64, g64, dsq64, nsq64 = exact
    for k, ref in ((0, w64), (1, y64)):
        err_native = (native[k].double() - ref).abs().max().item() if ref.numel() else 0.0
        err_torch = (torch32[k].double() - ref).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        assert err_native <= 2 * err_torch + 2 * EPS32 * scale + 1e-30
    for k, ref in ((3, dsq64), (4, nsq64)):
        err_native, err_torch = abs(native[k] - ref), abs(torch32[k] - ref)
        assert err_native <= 2 * err_torch + 4 * EPS32 * abs(ref) + 1e-30
    # nnz may differ from fp64 only where |g| sits within rounding of tau
    borderline = int(((g64.abs() - tau).abs() <= 1e-5 * (g64.abs() + tau)).sum())
    assert abs(native[2] - torch32[2]) <= borderline
    assert abs(native[2] - int(torch.count_nonzero(w64))) <= borderline


@needs_native
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_step_native_vs_reference(case, tau):
    args = _inputs(SHAPES[case], seed=len(case))
    step, beta = 0.37, 0.61
    with backend.force("native"):
        native = fista.fista_step(*args, step, tau, beta)
    torch32 = fista.fista_step_reference(*args, step, tau, beta)
    _check_against_fp64(native, torch32, _fp64_step(*args, step, tau, beta), tau)
    assert native[0].shape == args[0].shape and native[0].dtype == torch.float32
    if tau == 0.0 and args[0].numel():
        assert native[2] > 0.99 * args[0].numel()  # (almost) all nonzero without shrinkage


@needs_native
def test_step_all_zero_and_all_shrunk():
    args = _inputs((13, 9), zeros=True)
    with backend.force("native"):
        W, Y, nnz, dsq, nsq = fista.fista_step(*args, 0.5, 0.1, 0.3)
    assert nnz == 0 and dsq == 0.0 and nsq == 0.0 and not W.any() and not Y.any()
    args = _inputs((13, 9), seed=5)
    with backend.force("native"):
        W, Y, nnz, dsq, nsq = fista.fista_step(*args, 0.5, 1e6, 0.3)  # tau above every |g|
    assert nnz == 0 and nsq == 0.0 and not W.any()
    assert dsq == pytest.approx(float((args[3].double() ** 2).sum()), rel=1e-6)


@needs_native
def test_step_nan_propagates_like_torch():
    Y, YM, N, Wp = _inputs((3, 4), seed=9)
    Y[1, 2] = float("nan")
    with backend.force("native"):
        W, Yn, nnz, dsq, nsq = fista.fista_step(Y, YM, N, Wp, 0.5, 0.2, 0.3)
    ref = fista.fista_step_reference(Y, YM, N, Wp, 0.5, 0.2, 0.3)
    assert torch.equal(W.isnan(), ref[0].isnan()) and W.isnan()[1, 2]
    assert torch.equal(torch.nan_to_num(W), torch.nan_to_num(ref[0])) and nnz == ref[2]
    assert math.isnan(dsq) and math.isnan(nsq)


@needs_native
def test_step_in_place_aliasing():
    Y, YM, N, Wp = _inputs((4, 67, 40), seed=2)
    expect = fista.fista_step_reference(Y, YM, N, Wp, 0.3, 0.2, 0.5)
    with backend.force("native"):
        W, Yn, nnz, dsq, nsq = fista.fista_step(Y, YM, N, Wp, 0.3, 0.2, 0.5, W_out=Wp, Y_out=Y)
    assert W.data_ptr() == Wp.data_ptr() and Yn.data_ptr() == Y.data_ptr()
    assert torch.equal(Wp, expect[0]) and torch.equal(Y, expect[1])
    assert nnz == expect[2] and dsq == pytest.approx(expect[3], rel=1e-5) and nsq == pytest.approx(expect[4], rel=1e-5)


@needs_native
def test_step_partial_overlap_refused():
    buf = torch.randn(2, 100)
    Y, YM, N = (torch.randn(100) for _ in range(3))
    Wp = buf[0]
    with backend.force("native"), pytest.raises(ValueError, match="overlaps"):
        fista.fista_step(Y, YM, N, Wp, 0.3, 0.2, 0.5, W_out=buf.view(-1)[50:150])


def test_step_argument_checks_and_fallback():
    Y, YM, N, Wp = _inputs((5, 6))
    with pytest.raises(ValueError, match="elements"):
        fista.fista_step(Y, YM[:2], N, Wp, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="tau"):
        fista.fista_step(Y, YM, N, Wp, 0.1, -1.0, 0.1)
    half = [t.half() for t in (Y, YM, N, Wp)]  # not fp32: runs the reference, keeps the dtype
    W, Yn, nnz, _, _ = fista.fista_step(*half, 0.1, 0.1, 0.1)
    assert W.dtype == torch.float16 and nnz == int(torch.count_nonzero(W))
    nc = Y.t()  # non-contiguous: reference path, same numbers
    out = fista.fista_step(nc, YM.t(), N.t(), Wp.t(), 0.1, 0.1, 0.1)
    ref = fista.fista_step_reference(nc, YM.t(), N.t(), Wp.t(), 0.1, 0.1, 0.1)
    assert torch.equal(out[0], ref[0])


# --------------------------------------------------------------------------------------------- the solver


def _problem(batch=(2,), d_out=6, d_in=8, seed=0, dtype=torch.float64, cond_shift=0.5):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, 2 * d_in, generator=g, dtype=torch.float64)
    M = A @ A.T / (2 * d_in) + cond_shift * torch.eye(d_in, dtype=torch.float64)
    W0 = torch.randn(*batch, d_out, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * 0.3 + torch.eye(d_in, dtype=torch.float64)
    N = W0 @ B
    return W0.to(dtype), M.to(dtype), N.to(dtype)


def test_mu_zero_gives_closed_form_fp64():
    W0, M, N = _problem()
    res = fista.fista_solve(W0, M, N, 0.0, tol=1e-12, max_iter=5000)
    W_star = torch.linalg.solve(M, N.transpose(-1, -2)).transpose(-1, -2)  # N M^{-1} (M symmetric)
    assert res.converged and res.W.dtype == torch.float64
    assert (res.W - W_star).norm() / W_star.norm() < 1e-8


@needs_native
def test_mu_zero_fp32_native_matches_closed_form_and_reference():
    W0, M, N = _problem(batch=(3,), d_out=10, d_in=12, seed=1)
    W_star = torch.linalg.solve(M, N.transpose(-1, -2)).transpose(-1, -2)
    args = (W0.float(), M.float(), N.float(), 0.0)
    with backend.force("native"):
        res = fista.fista_solve(*args, tol=1e-6, max_iter=3000)
    ref = fista.fista_solve(*args, tol=1e-6, max_iter=3000, reference=True)
    assert res.converged and res.W.dtype == torch.float32
    assert (res.W.double() - W_star).norm() / W_star.norm() < 1e-4
    assert (res.W - ref.W).abs().max() <= 1e-5 * ref.W.abs().max()
    assert abs(res.iterations - ref.iterations) <= 2


def _kkt(W, M, N, mu):
    grad = 2 * (W @ M - N)
    nz = W != 0
    scale = grad.abs().max().item() + mu
    stationarity = (grad + mu * torch.sign(W))[nz].abs().max().item() if nz.any() else 0.0
    zero_slack = (grad[~nz].abs().max().item() - mu) if (~nz).any() else -1.0
    return stationarity / scale, zero_slack / scale


def test_subgradient_optimality_at_convergence():
    W0, M, N = _problem(seed=2)
    mu = 0.5 * float((2 * N).abs().median())
    res = fista.fista_solve(W0, M, N, mu, tol=1e-13, max_iter=20000)
    assert res.converged
    stat, slack = _kkt(res.W, M, N, mu)
    assert stat < 1e-9  # nonzeros: grad + mu sign(w) = 0
    assert slack < 1e-9  # zeros: |grad| <= mu
    assert 0.0 < res.zero_fraction < 1.0


@needs_native
def test_subgradient_optimality_fp32_native():
    W0, M, N = _problem(seed=3, d_out=16, d_in=24, batch=(2,))
    mu = 0.5 * float((2 * N).abs().median())
    with backend.force("native"):
        res = fista.fista_solve(W0.float(), M.float(), N.float(), mu, tol=1e-7, max_iter=5000)
    stat, slack = _kkt(res.W.double(), M, N, mu)
    assert stat < 1e-4 and slack < 1e-4


def test_sparsity_grows_with_mu():
    W0, M, N = _problem(seed=4, d_out=12, d_in=10)
    top = 2 * float(N.abs().max())  # at mu >= max|grad f(0)| = 2 max|N|, W = 0 is optimal
    fractions = [fista.fista_solve(W0, M, N, f * top, tol=1e-10, max_iter=5000).zero_fraction
                 for f in (0.0, 0.05, 0.2, 0.5, 1.0)]  # fmt: skip
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions[2] > 0.0


def test_history_warm_start_and_callback():
    W0, M, N = _problem(seed=5)
    mu = 0.3
    res = fista.fista_solve(W0, M, N, mu, tol=1e-10, max_iter=4000, history=True)
    assert len(res.objective) == len(res.sparsity) == res.iterations
    assert all(0.0 <= s <= 1.0 for s in res.sparsity)
    assert res.objective[-1] <= res.objective[0]
    assert res.objective[-1] == pytest.approx(fista.fista_objective(res.W, M, N, mu), rel=1e-12)
    assert res.lipschitz == pytest.approx(2 * float(torch.linalg.eigvalsh(M)[-1]))
    warm = fista.fista_solve(W0, M, N, mu, tol=1e-10, max_iter=4000, warm_start=res.W)
    assert warm.converged and warm.iterations < res.iterations / 4
    seen = []
    stopped = fista.fista_solve(W0, M, N, mu, callback=lambda k, W, rel: seen.append(k) or k == 3)
    assert seen == [1, 2, 3] and stopped.iterations == 3 and not stopped.converged


def test_max_iter_reached_reports_not_converged():
    W0, M, N = _problem(seed=6)
    res = fista.fista_solve(W0, M, N, 0.1, tol=1e-15, max_iter=5)
    assert res.iterations == 5 and not res.converged and res.rel_change > 0


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"mu": -1.0}, "mu must be"),
        ({"mu": float("nan")}, "mu must be"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"tol": 0.0}, "tol must be a finite number > 0"),
        ({"tol": -1e-3}, "tol"),
    ],
)
def test_option_validation(kwargs, pattern):
    W0, M, N = _problem()
    mu = kwargs.pop("mu", 0.1)
    with pytest.raises(ValueError, match=pattern):
        fista.fista_solve(W0, M, N, mu, **kwargs)


def test_shape_and_matrix_validation():
    W0, M, N = _problem()
    with pytest.raises(ValueError, match="M must have shape"):
        fista.fista_solve(W0, M[:3, :3], N, 0.1)
    with pytest.raises(ValueError, match="N must have the shape"):
        fista.fista_solve(W0, M, N[0], 0.1)
    with pytest.raises(ValueError, match="symmetric"):
        fista.fista_solve(W0, M + torch.triu(torch.ones_like(M), 1), N, 0.1)
    with pytest.raises(ValueError, match="positive definite"):
        fista.fista_solve(W0, -M, N, 0.1)
    with pytest.raises(ValueError, match="warm_start"):
        fista.fista_solve(W0, M, N, 0.1, warm_start=W0[0])
    empty = fista.fista_solve(W0[:, :0], M, N[:, :0], 0.1)
    assert empty.W.shape == (2, 0, 8) and empty.converged


def test_bf16_input_is_solved_in_fp32_and_returned_in_bf16():
    W0, M, N = _problem(seed=7)
    res = fista.fista_solve(W0.bfloat16(), M.float(), N.bfloat16(), 0.0, tol=1e-6, max_iter=3000)
    W_star = torch.linalg.solve(M, N.bfloat16().double().transpose(-1, -2)).transpose(-1, -2)
    assert res.W.dtype == torch.bfloat16
    assert (res.W.double() - W_star).norm() / W_star.norm() < 1e-2
    assert math.isfinite(res.rel_change)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_native
def test_cuda_step_and_solver_match_cpu():
    args = [t.cuda() for t in _inputs((3, 67, 40), seed=11)]
    with backend.force("native"):
        native = fista.fista_step(*args, 0.37, 0.3, 0.61)
        with_dot = fista.fista_step(*args, 0.37, 0.3, 0.61, restart_dot=True)
    cpu_dot = fista.fista_step_reference(*(t.cpu() for t in args), 0.37, 0.3, 0.61, restart_dot=True)[5]
    assert abs(with_dot[5] - cpu_dot) <= 1e-4 * abs(cpu_dot) + 1e-6
    exact = _fp64_step(*(t.cpu() for t in args), 0.37, 0.3, 0.61)
    torch32 = fista.fista_step_reference(*(t.cpu() for t in args), 0.37, 0.3, 0.61)
    _check_against_fp64([native[0].cpu(), native[1].cpu(), *native[2:]], torch32, exact, 0.3)
    W0, M, N = _problem(batch=(2,), d_out=10, d_in=12, seed=1)
    with backend.force("native"):
        res = fista.fista_solve(W0.float().cuda(), M.float().cuda(), N.float().cuda(), 0.1, tol=1e-6)
    ref = fista.fista_solve(W0.float(), M.float(), N.float(), 0.1, tol=1e-6, reference=True)
    assert (res.W.cpu() - ref.W).abs().max() <= 1e-4 * ref.W.abs().max()


# --------------------------------------------------------------------------------------------- adaptive restart


def _ill_conditioned(seed=8, d_out=12, d_in=16, batch=(2,)):
    """M with condition number ~1e3 (SPACE's M: lam I + a few large token directions)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(3, d_in, generator=g, dtype=torch.float64)
    M = 0.5 * torch.eye(d_in, dtype=torch.float64) + 30.0 * C.T @ C / d_in
    W0 = torch.randn(*batch, d_out, d_in, generator=g, dtype=torch.float64)
    N = W0 @ (0.5 * torch.eye(d_in, dtype=torch.float64) + 25.0 * C.T @ C / d_in)
    return W0, M, N


def test_restart_needs_fewer_iterations_and_is_optimal():
    """O'Donoghue-Candès gradient restart: same minimiser (subgradient test), several times fewer iterations."""
    W0, M, N = _ill_conditioned()
    mu = 0.5 * float((2 * N).abs().median())
    plain = fista.fista_solve(W0, M, N, mu, tol=1e-10, max_iter=50000, restart=False)
    fast = fista.fista_solve(W0, M, N, mu, tol=1e-10, max_iter=50000)
    assert plain.converged and fast.converged and plain.restarts == 0 and fast.restarts > 0
    assert fast.iterations * 3 < plain.iterations, (fast.iterations, plain.iterations)
    for res in (plain, fast):
        stat, slack = _kkt(res.W, M, N, mu)
        assert stat < 1e-7 and slack < 1e-7
    assert (fast.W - plain.W).abs().max() <= 1e-6 * plain.W.abs().max()
    assert 0.0 < fast.zero_fraction < 1.0


def test_restart_history_objective_decreases_after_restart():
    """With restart the objective sequence is (up to rounding) monotone after the first restarts, where plain
    FISTA's oscillates; the history still matches fista_objective at the end."""
    W0, M, N = _ill_conditioned(seed=9)
    mu = 0.3 * float((2 * N).abs().median())
    plain = fista.fista_solve(W0, M, N, mu, tol=1e-12, max_iter=400, restart=False, history=True)
    fast = fista.fista_solve(W0, M, N, mu, tol=1e-12, max_iter=400, history=True)
    f_star = min(plain.objective + fast.objective)
    ups = lambda obj: sum(b > a + 1e-12 * abs(a) for a, b in zip(obj, obj[1:]))  # noqa: E731
    assert ups(plain.objective) > ups(fast.objective)
    assert fast.objective[-1] - f_star <= plain.objective[-1] - f_star + 1e-12 * abs(f_star)


@needs_native
def test_restart_native_matches_reference():
    W0, M, N = _ill_conditioned(seed=10, d_out=20, d_in=24)
    mu = 0.5 * float((2 * N).abs().median())
    args = (W0.float(), M.float(), N.float(), mu)
    with backend.force("native"):
        res = fista.fista_solve(*args, tol=1e-6, max_iter=5000)
    ref = fista.fista_solve(*args, tol=1e-6, max_iter=5000, reference=True)
    assert res.converged and ref.converged and res.restarts > 0
    assert (res.W - ref.W).abs().max() <= 1e-4 * ref.W.abs().max()
    stat, slack = _kkt(res.W.double(), M, N, mu)
    assert stat < 1e-4 and slack < 1e-4


@needs_native
@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (3, 67, 41), (2, 320, 768)])
@pytest.mark.parametrize("in_place", [False, True])
def test_restart_dot_native_vs_fp64(shape, in_place):
    """The fused fifth reduction sum (Y - W)(W - W_prev), with Y read before an aliased Y_out is written."""
    Y, YM, N, Wp = _inputs(shape, seed=sum(shape))
    w64, _, _, _, _ = _fp64_step(Y, YM, N, Wp, 0.37, 0.3, 0.61)
    want = float(((Y.double() - w64) * (w64 - Wp.double())).sum())
    scale = float(((Y.double() - w64).abs() * (w64 - Wp.double()).abs()).sum())
    ref = fista.fista_step_reference(Y.clone(), YM, N, Wp.clone(), 0.37, 0.3, 0.61, restart_dot=True)
    Yn, Wn = Y.clone(), Wp.clone()
    kw = dict(W_out=Wn, Y_out=Yn) if in_place else {}
    with backend.force("native"):
        nat = fista.fista_step(Yn, YM, N, Wn, 0.37, 0.3, 0.61, restart_dot=True, **kw)
    assert len(nat) == 6 and len(ref) == 6
    for got in (nat[5], ref[5]):
        assert abs(got - want) <= 64 * EPS32 * scale + 1e-30, (got, want)
    # without the flag: the 5-tuple contract is unchanged
    with backend.force("native"):
        assert len(fista.fista_step(Y, YM, N, Wp, 0.37, 0.3, 0.61)) == 5


def test_restart_option_validation_and_mu_zero():
    W0, M, N = _problem()
    with pytest.raises(ValueError, match="restart must be True or False"):
        fista.fista_solve(W0, M, N, 0.1, restart="yes")
    W_star = torch.linalg.solve(M, N.transpose(-1, -2)).transpose(-1, -2)
    for restart in (True, False):
        res = fista.fista_solve(W0, M, N, 0.0, tol=1e-12, max_iter=5000, restart=restart)
        assert res.converged and (res.W - W_star).norm() / W_star.norm() < 1e-8
