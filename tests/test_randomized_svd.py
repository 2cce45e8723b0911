"""Randomized batched SVD (ops/batched_svd.py: method="randomized") against the exact per-layer reference,
compared through projectors (never raw singular vectors)."""
import pytest
import torch

from pure_fast.ops.batched_svd import (projector_distance, randomized_basis, subspace_basis,
                                       subspace_basis_loop)


def _planted(L, n, d, ranks, noise=1e-4, seed=0):
    """Rows with a planted rank-r signal per layer (geometric spectrum 8..1) plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(L, n, d, dtype=torch.float64)
    for l, r in enumerate(ranks):
        basis = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
        scale = torch.logspace(0.9, 0, r, dtype=torch.float64) if r > 1 else torch.full((1,), 8.0, dtype=torch.float64)
        coef = torch.randn(n, r, generator=g, dtype=torch.float64) * scale
        out[l] = coef @ basis.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return out


@pytest.mark.parametrize("n,d,ranks", [(300, 200, [3, 1, 6, 2]), (150, 97, [5, 4]), (61, 400, [2, 7, 1])])
def test_randomized_matches_exact_loop(n, d, ranks):
    H = _planted(len(ranks), n, d, ranks, seed=n)
    V, r, s2 = subspace_basis(H, 0.9999, method="randomized")
    Vl, rl, _ = subspace_basis_loop(H, 0.9999)
    assert r.tolist() == rl.tolist() == ranks
    assert projector_distance(V, Vl).max() < 1e-6
    # orthonormal kept columns, zero columns past each rank, energies descending
    for l, k in enumerate(r.tolist()):
        torch.testing.assert_close(V[l, :, :k].T @ V[l, :, :k], torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
        assert (V[l, :, k:] == 0).all() and (s2[l, k:] == 0).all()
        assert (s2[l, : k - 1] >= s2[l, 1:k]).all()


def test_randomized_gram_input_matches_rows():
    H = _planted(3, 500, 120, [4, 2, 5], seed=3)
    G = H.transpose(1, 2) @ H
    V1, r1, _ = randomized_basis(G, 0.9999, is_gram=True)
    V2, r2, _ = subspace_basis(H, 0.9999)
    assert r1.tolist() == r2.tolist() == [4, 2, 5]
    assert projector_distance(V1, V2).max() < 1e-6


def test_sketch_grows_until_threshold_is_captured():
    # rank 40 signal with a flat spectrum: a 4-wide sketch holds ~10 % of the energy, so it must grow
    H = _planted(2, 400, 150, [40, 40], noise=1e-4, seed=5)
    V, r, _ = randomized_basis(H, 0.999, sketch=4, oversample=2)
    Vl, rl, _ = subspace_basis_loop(H, 0.999)
    assert r.tolist() == rl.tolist() == [40, 40]
    assert projector_distance(V, Vl).max() < 1e-6


def test_falls_back_to_exact_when_sketch_reaches_full_size():
    H = _planted(2, 30, 20, [3, 4], noise=0.5, seed=6)  # noisy: 0.999 needs almost every direction
    V, r, _ = randomized_basis(H, 0.999)
    Ve, re_, _ = subspace_basis(H, 0.999)
    assert r.tolist() == re_.tolist() and r.min() > 4
    assert torch.equal(V, Ve)  # the exact route itself


def test_max_rank_and_zero_layers_and_seed_determinism():
    H = _planted(3, 200, 90, [6, 3, 2], seed=7)
    H[1] = 0
    V, r, _ = randomized_basis(H, 0.999, max_rank=4)
    assert r.tolist() == [4, 0, 2]
    assert torch.isfinite(V).all() and (V[1] == 0).all()
    Vl, rl, _ = subspace_basis_loop(H, 0.999, max_rank=4)
    assert rl.tolist() == [4, 0, 2] and projector_distance(V, Vl).max() < 1e-6
    V2, _, _ = randomized_basis(H, 0.999, max_rank=4)
    assert torch.equal(V, V2)  # same seed, same basis


def test_bad_method_rejected():
    with pytest.raises(ValueError, match="method="):
        subspace_basis(torch.zeros(1, 3, 3), 0.9, method="magic")
