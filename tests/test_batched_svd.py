"""Batched subspace estimation against per-layer SVD, compared through projectors (never raw vectors)."""
import pytest
import torch

from pure_fast.ops.batched_svd import (centered_basis, projector_distance, subspace_basis, subspace_basis_loop,
                                       union_basis)


def _planted(L, n, d, ranks, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(L, n, d, dtype=torch.float64)
    for l, r in enumerate(ranks):
        basis = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
        coef = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.linspace(3, 1, r, dtype=torch.float64)
        out[l] = coef @ basis.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return out


@pytest.mark.parametrize("n,d", [(12, 67), (80, 40), (7, 7)])
def test_batched_matches_loop(n, d):
    H = _planted(4, n, d, [1, 3, 5, 2])
    V, ranks, _ = subspace_basis(H, 0.99)
    Vl, ranks_l, _ = subspace_basis_loop(H, 0.99)
    assert ranks.tolist() == ranks_l.tolist()
    assert projector_distance(V, Vl).max() < 1e-8
    # orthonormal kept columns, zero columns past the rank
    for l, r in enumerate(ranks.tolist()):
        G = V[l].T @ V[l]
        torch.testing.assert_close(G[:r, :r], torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
        assert V[l, :, r:].abs().max() == 0 if r < V.shape[2] else True


def test_gram_route_equals_rows_route():
    H = _planted(3, 90, 32, [2, 4, 6])
    V1, r1, _ = subspace_basis(H, 0.995)
    V2, r2, _ = subspace_basis(H.transpose(1, 2) @ H, 0.995, is_gram=True)
    assert r1.tolist() == r2.tolist()
    assert projector_distance(V1, V2).max() < 1e-8


def test_threshold_ranks_recover_planted_dimension():
    H = _planted(3, 50, 30, [1, 3, 5], noise=1e-6)
    _, ranks, _ = subspace_basis(H, 0.9999)
    assert ranks.tolist() == [1, 3, 5]


def test_zero_data_gives_rank_zero_not_nan():
    V, ranks, _ = subspace_basis(torch.zeros(2, 5, 9), 0.9)
    assert ranks.tolist() == [0, 0] and torch.isfinite(V).all()
    V, ranks = centered_basis(torch.zeros(2, 5, 9), 0.9, mean=torch.zeros(2, 9), count=5)
    assert ranks.tolist() == [0, 0] and torch.isfinite(V).all()


def test_centered_basis_contains_mean_and_centred_pcs():
    g = torch.Generator().manual_seed(1)
    d = 25
    mu = torch.randn(d, dtype=torch.float64, generator=g) * 10
    dirs = torch.linalg.qr(torch.randn(d, 2, dtype=torch.float64, generator=g))[0]
    H = mu + torch.randn(40, 2, dtype=torch.float64, generator=g) @ dirs.T
    V, ranks = centered_basis(H[None], 0.999, mean=H.mean(0)[None], count=40)
    assert int(ranks[0]) == 3
    P = V[0] @ V[0].T
    for v in (mu / mu.norm(), dirs[:, 0], dirs[:, 1]):
        assert (P @ v - v).norm() < 1e-6
    # gram route gives the same subspace
    Vg, rg = centered_basis((H.T @ H)[None], 0.999, mean=H.mean(0)[None], count=40, is_gram=True)
    assert projector_distance(V, Vg).max() < 1e-6


def test_union_of_nearly_collinear_bases():
    e = torch.eye(6, dtype=torch.float64)
    a = e[:, :2][None]
    b = torch.stack([e[:, 1] + 1e-9 * e[:, 4], e[:, 2]], 1)[None]
    b = torch.linalg.qr(b)[0]
    V, r = union_basis([a, b])
    assert int(r[0]) == 3 and torch.isfinite(V).all()


def _random_overlapping_bases(L=4, d=40, seed=0):
    """Orthonormal bases per layer sharing directions (exactly, nearly, not at all), with zero columns."""
    g = torch.Generator().manual_seed(seed)
    common = torch.linalg.qr(torch.randn(L, d, 3, generator=g, dtype=torch.float64))[0]
    out = []
    for i, k in enumerate((5, 4, 6, 2)):
        own = torch.randn(L, d, k, generator=g, dtype=torch.float64)
        M = torch.cat([common[:, :, : 1 + i % 3], own], dim=2)
        if i == 2:  # a direction 1e-9 away from a shared one: the same direction to any tolerance
            M[:, :, -1] = common[:, :, 0] + 1e-9 * own[:, :, 0]
        V = torch.linalg.qr(M)[0]
        if i == 1:  # masked bases: layer 0 has rank 2 only (zero columns past it)
            V[0, :, 2:] = 0
        out.append(V)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_union_basis_equals_svd_reference(seed):
    from pure_fast.ops.batched_svd import union_basis_svd

    bases = _random_overlapping_bases(seed=seed)
    V, r = union_basis(bases)
    Vs, rs = union_basis_svd(bases)
    assert r.tolist() == rs.tolist()
    assert float(projector_distance(V, Vs).max()) < 1e-10
    for j in range(V.shape[0]):  # orthonormal kept columns, zero columns past the rank
        k = int(r[j])
        torch.testing.assert_close(V[j, :, :k].T @ V[j, :, :k], torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
        assert float(V[j, :, k:].abs().max()) == 0.0 if V.shape[2] > k else True
    # every input direction lies in the union
    for B in bases:
        resid = B - V @ (V.transpose(1, 2) @ B)
        assert float(resid.abs().max()) < 1e-8


def test_union_basis_edge_cases():
    e = torch.eye(5, dtype=torch.float64)[None]
    V, r = union_basis([e[:, :, :0], e[:, :, :2] * 0])  # nothing at all
    assert r.tolist() == [0] and V.shape[2] == 0
    V, r = union_basis([e[:, :, :2], e[:, :, :2], e[:, :, 1:3]])  # duplicates kept once
    assert r.tolist() == [3]
    assert float(projector_distance(V, e[:, :, :3]).max()) < 1e-12


def test_batched_eigh_dispatch(monkeypatch):
    """Small CUDA eigenproblems go to the host (torch's batched CUDA eigh is slow for them); the decision is by
    device and size, PURE_FAST_EIGH forces it, and the CPU path is torch.linalg.eigh itself."""
    from pure_fast.ops.batched_svd import HOST_EIGH_MAX_N, batched_eigh, eigh_on_host

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 9, 9, generator=g, dtype=torch.float64)
    a = a @ a.transpose(1, 2)
    w, v = batched_eigh(a)
    w_ref, v_ref = torch.linalg.eigh(a)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    small = torch.empty(70, 80, 80, device="meta")  # a stand-in for a non-CPU tensor: only shape and device matter
    big = torch.empty(2, HOST_EIGH_MAX_N + 1, HOST_EIGH_MAX_N + 1, device="meta")
    monkeypatch.delenv("PURE_FAST_EIGH", raising=False)
    assert not eigh_on_host(a) and eigh_on_host(small) and not eigh_on_host(big)
    monkeypatch.setenv("PURE_FAST_EIGH", "device")
    assert not eigh_on_host(small)
    monkeypatch.setenv("PURE_FAST_EIGH", "host")
    assert eigh_on_host(big) and not eigh_on_host(a)
    monkeypatch.setenv("PURE_FAST_EIGH", "gpu")
    from pure_fast.errors import UsageError

    with pytest.raises(UsageError, match="PURE_FAST_EIGH"):
        eigh_on_host(small)


@pytest.mark.gpu
def test_batched_eigh_host_and_device_agree_on_cuda(monkeypatch):
    from pure_fast.ops.batched_svd import batched_eigh

    g = torch.Generator().manual_seed(1)
    a = torch.randn(70, 80, 80, generator=g, dtype=torch.float64)
    a = (a @ a.transpose(1, 2)).cuda()
    out = {}
    for mode in ("host", "device"):
        monkeypatch.setenv("PURE_FAST_EIGH", mode)
        w, v = batched_eigh(a)
        assert w.device.type == "cuda" and v.device.type == "cuda"
        out[mode] = (w, v)
    torch.testing.assert_close(out["host"][0], out["device"][0], rtol=1e-10, atol=1e-10)
    for w, v in out.values():  # each a valid decomposition
        torch.testing.assert_close(v @ torch.diag_embed(w) @ v.transpose(1, 2), a, rtol=1e-9, atol=1e-9)
