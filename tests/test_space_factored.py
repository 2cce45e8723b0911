"""SPACE's factored Gram route: ShiftedLowRank against dense matrices, FISTA on both routes, end to end."""
import math

import pytest
import torch

import pure_fast
from pure_fast.adapters import wrap_pipeline
from pure_fast.edits.edit import kv_weights
from pure_fast.errors import UsageError
from pure_fast.methods.space import SpaceOptions, space_operators, space_solve
from pure_fast.methods.uce import UCEOptions, uce_matrices, uce_tokens
from pure_fast.ops.fista import fista_objective, fista_solve
from pure_fast.ops.shifted_low_rank import ShiftedLowRank, right_mm
from pure_fast.options import validate_options

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("k,d", [(0, 7), (1, 5), (3, 37), (13, 29), (40, 33)])
def test_shifted_low_rank_matches_dense(k, d):
    L, R = _rand(k, d, seed=1), _rand(k, d, seed=2)
    S = ShiftedLowRank(0.7, L, R)
    dense = 0.7 * torch.eye(d, dtype=torch.float64) + L.T @ R
    torch.testing.assert_close(S.dense(), dense, rtol=0, atol=1e-12)
    for shape in [(1, d), (5, d), (3, 11, d)]:  # batched leading dims are flattened for the products
        X = _rand(*shape, seed=3)
        torch.testing.assert_close(S.right_mm(X), X @ dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(right_mm(X, S), X @ dense, rtol=1e-12, atol=1e-12)
        out = torch.empty_like(X)
        scratch = X.new_empty(X.numel() // d, k)
        assert S.right_mm(X, out=out, scratch=scratch) is out
        torch.testing.assert_close(out, X @ dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.diagonal(), torch.diagonal(dense), rtol=1e-12, atol=1e-12)
    # float32 copy: same product within fp32 rounding
    X = _rand(9, d, seed=4)
    got = S.to(None, torch.float32).right_mm(X.float())
    assert float((got.double() - X @ dense).norm() / max(float((X @ dense).norm()), 1e-30)) < 1e-5


@pytest.mark.parametrize("k,d", [(0, 6), (2, 17), (25, 19)])
def test_gram_lambda_max_and_quadratic_trace(k, d):
    F = _rand(k, d, seed=5)
    G = ShiftedLowRank.gram(0.3, F)
    dense = G.dense()
    assert math.isclose(G.lambda_max(), float(torch.linalg.eigvalsh(dense)[-1]), rel_tol=1e-12)
    W = _rand(4, 3, d, seed=6)
    assert math.isclose(float(G.quadratic_trace(W)), float((W * (W @ dense)).sum()), rel_tol=1e-12)
    N, mu = _rand(4, 3, d, seed=7), 0.05
    assert math.isclose(fista_objective(W, G, N, mu), fista_objective(W, dense, N, mu), rel_tol=1e-12)
    with pytest.raises(ValueError, match="symmetric"):
        ShiftedLowRank(1.0, F, F).lambda_max()
    with pytest.raises(ValueError, match=r"\[k, d\]"):
        ShiftedLowRank(1.0, F, _rand(k + 1, d))


def test_identity_plus():
    U, V = _rand(11, 3, seed=8), _rand(11, 3, seed=9)
    A = ShiftedLowRank.identity_plus(U, V)
    torch.testing.assert_close(A.dense(), torch.eye(11, dtype=torch.float64) + U @ V.T, rtol=0, atol=1e-12)


def _fista_problem(L=3, d_out=13, d_in=41, k=6, seed=10):
    F = _rand(k, d_in, seed=seed)
    M = ShiftedLowRank.gram(0.5, F)
    W0 = _rand(L, d_out, d_in, seed=seed + 1) * 0.2
    N = W0 @ M.dense() + 0.05 * _rand(L, d_out, d_in, seed=seed + 2)
    return W0, M, N


@pytest.mark.parametrize("restart", [True, False])
def test_fista_factored_equals_dense_float64(restart):
    W0, M, N = _fista_problem()
    kw = dict(max_iter=60, tol=1e-300, restart=restart)
    a = fista_solve(W0, M, N, 0.03, **kw)
    b = fista_solve(W0, M.dense(), N, 0.03, **kw)
    assert a.iterations == b.iterations == 60 and a.restarts == b.restarts
    assert float((a.W - b.W).abs().max()) < 1e-10
    assert a.lipschitz == pytest.approx(b.lipschitz, rel=1e-12)
    assert 0.0 < a.zero_fraction < 1.0  # the L1 term is active: the test compares a real sparse solve


def test_fista_factored_float32_close_to_float64():
    W0, M, N = _fista_problem(seed=20)
    ref = fista_solve(W0, M, N, 0.03, max_iter=5000, tol=1e-12)
    got = fista_solve(W0.float(), M.to(None, torch.float32), N.float(), 0.03, max_iter=5000, tol=1e-6)
    assert ref.converged and got.converged
    assert float((got.W.double() - ref.W).norm() / ref.W.norm()) < 1e-4


def test_fista_rejects_non_symmetric_factored_M():
    W0, M, N = _fista_problem()
    with pytest.raises(ValueError, match="symmetric"):
        fista_solve(W0, ShiftedLowRank(0.5, M.L, M.L.flip(0)), N, 0.03)


def _tokens(ad, retain=("Claude Monet", "Rembrandt")):
    tok = uce_tokens(ad, ["Van Gogh", "Picasso"], list(retain), None, None, UCEOptions())
    return tok, max(0.1, 1 / len(retain)) if retain else 0.0


def test_space_operators_equal_uce_matrices(tiny_sdxl):
    ad = wrap_pipeline(tiny_sdxl)
    tok, s_p = _tokens(ad)
    M, B = uce_matrices(tok, 0.5, 1.0, s_p)
    Mf, Bf, Af, route = space_operators(tok, 0.5, 1.0, s_p, "factored")
    assert route == "factored" and Mf.k == tok.C_e.shape[0] + tok.C_p.shape[0]
    torch.testing.assert_close(Mf.dense(), M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Bf.dense(), B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Af.dense(), torch.linalg.solve(M, B.T).T, rtol=1e-9, atol=1e-10)
    Md, Bd, Ad, route_d = space_operators(tok, 0.5, 1.0, s_p, "dense")
    assert route_d == "dense" and isinstance(Md, torch.Tensor)
    torch.testing.assert_close(Md, M)
    # auto follows the flop rule
    assert space_operators(tok, 0.5, 1.0, s_p, "auto")[3] == ("factored" if 2 * Mf.k < Mf.d else "dense")
    # no retain concepts: F holds the erase tokens only
    tok0, _ = _tokens(ad, retain=())
    M0 = space_operators(tok0, 0.5, 1.0, 0.0, "factored")[0]
    torch.testing.assert_close(M0.dense(), uce_matrices(tok0, 0.5, 1.0, 0.0)[0], rtol=1e-12, atol=1e-12)


def test_space_solve_routes_agree_with_mu_search(tiny_sd1):
    """The whole solve (μ search included) gives the same weights on both routes (float64)."""
    ad = wrap_pipeline(tiny_sd1)
    tok, s_p = _tokens(ad)
    W = {k: v.detach() for k, v in list(kv_weights(ad.unet).items())[:6]}
    opts = SpaceOptions(target_sparsity=0.5, precision="float64", max_iter=300, tol=1e-10, history_every=25)
    res = {}
    for route in ("factored", "dense"):
        M, B, A, _ = space_operators(tok, 0.5, 1.0, s_p, route)
        res[route] = space_solve(W, M, B, opts, A=A, progress=False)
    (out_f, st_f), (out_d, st_d) = res["factored"], res["dense"]
    assert [s["mu"] for s in st_f] == pytest.approx([s["mu"] for s in st_d], rel=1e-9)
    assert {s["gram_route"] for s in st_f} == {"factored"} and {s["gram_route"] for s in st_d} == {"dense"}
    for n in W:
        assert float((out_f[n] - out_d[n]).abs().max()) < 1e-9, n
    obj_f = [v for s in st_f for v in s["objective"]]
    assert obj_f and obj_f == pytest.approx([v for s in st_d for v in s["objective"]], rel=1e-9)


def test_erase_reports_route_and_matches_dense(tiny_sdxl):
    ad = wrap_pipeline(tiny_sdxl)
    kw = dict(method="space", mu=0.05, max_iter=40, tol=1e-12, storage_dtype="float32", progress=False,
              fingerprint=False)
    f = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], gram_route="factored", **kw)
    d = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], gram_route="dense", **kw)
    assert f.stats["gram_route"] == "factored" and d.stats["gram_route"] == "dense"
    names = f.target_weights()
    assert names == d.target_weights() and names
    for n in names:
        wf, wd = f.dense(n), d.dense(n)
        assert float((wf - wd).abs().max()) <= 1e-4 * float(wd.abs().max()), n
    auto = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], **kw)
    k = auto.stats["erase_tokens"] + auto.stats["preserve_tokens"]
    d_in = next(iter(kv_weights(ad.unet).values())).shape[1]
    assert auto.stats["gram_route"] == ("factored" if 2 * k < d_in else "dense")


def test_invalid_gram_route():
    with pytest.raises(UsageError, match="gram_route"):
        validate_options(SpaceOptions(gram_route="sparse"))
