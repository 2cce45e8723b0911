"""PURE's 'contrast' basis (ridge trade-off against the retain rows): the low-rank factors equal the dense
minimiser, it is stationary for its objective, it degrades to the right limits, the Gram construction matches
rows computed by hand, and the option works end to end (closed loop, edit file round trip)."""
from __future__ import annotations

import pytest
import torch

import pure_fast
from pure_fast.estimate.subspace import contrast_factors

COLLECT = dict(size=32, seeds=(0,), steps=4, record_steps=2)


def _spd(d, g, rank=None, scale=1.0):
    X = torch.randn(d, rank or 2 * d, generator=g, dtype=torch.float64)
    return scale * X @ X.T / X.shape[1]


def _dense(C_F, M):
    return C_F @ torch.linalg.inv(C_F + M)  # I - E


def test_full_rank_factors_equal_the_dense_minimiser_and_are_stationary():
    g = torch.Generator().manual_seed(0)
    d = 24
    C_F = torch.stack([_spd(d, g, rank=5), _spd(d, g, rank=9)])
    M = torch.stack([_spd(d, g) + 1e-3 * torch.eye(d), _spd(d, g, scale=3.0) + 1e-2 * torch.eye(d)])
    A, B, ranks, lam = contrast_factors(C_F, M, threshold=1.0, min_shrink=0.0)
    assert ranks.tolist() == [5, 9]  # rank(C_F): the other generalized eigenvalues are 0
    assert bool((lam[:, :-1] >= lam[:, 1:] - 1e-12).all())
    I = torch.eye(d, dtype=torch.float64)
    for j in range(2):
        delta = A[j] @ B[j]
        torch.testing.assert_close(delta, _dense(C_F[j], M[j]), rtol=0, atol=1e-9)
        E = I - delta
        # gradient of tr(E C_F E^T) + tr((E - I) M (E - I)^T) vanishes: E C_F + (E - I) M = 0
        torch.testing.assert_close(E @ C_F[j] + (E - I) @ M[j], torch.zeros(d, d, dtype=torch.float64),
                                   rtol=0, atol=1e-9)


def test_limits_heavy_retain_changes_nothing_and_no_retain_removes_the_forget_span():
    g = torch.Generator().manual_seed(1)
    d = 16
    C_F = _spd(d, g, rank=3)[None]
    R = _spd(d, g)[None]
    A, B, _, _ = contrast_factors(C_F, 1e9 * R, threshold=1.0, min_shrink=0.0)
    assert float((A @ B).abs().max()) < 1e-6
    # only a tiny ridge: E removes the forget rows' span (E C_F ~ 0) and is ~ a projector there
    A, B, ranks, _ = contrast_factors(C_F, 1e-9 * torch.eye(d, dtype=torch.float64)[None], threshold=1.0)
    E = torch.eye(d, dtype=torch.float64) - A[0] @ B[0]
    assert int(ranks[0]) == 3
    assert float((E @ C_F[0]).norm() / C_F[0].norm()) < 1e-6


def test_direction_is_shrunk_by_its_energy_ratio():
    """C_F and M diagonal: each axis is scaled by m / (f + m), i.e. kept in proportion to its retain energy."""
    f = torch.tensor([4.0, 1.0, 0.0, 0.25], dtype=torch.float64)
    m = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    A, B, ranks, lam = contrast_factors(torch.diag(f)[None], torch.diag(m)[None], threshold=1.0, min_shrink=0.0)
    E = torch.eye(4, dtype=torch.float64) - A[0] @ B[0]
    torch.testing.assert_close(torch.diagonal(E), m / (f + m), rtol=0, atol=1e-12)
    torch.testing.assert_close(lam[0], torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64))
    # threshold 0.8 of sum(lambda) = 5.25: the first two directions (5.0 / 5.25 = 0.95 >= 0.8; 4 / 5.25 < 0.8)
    _, _, ranks, _ = contrast_factors(torch.diag(f)[None], torch.diag(m)[None], threshold=0.8)
    assert ranks.tolist() == [2]
    _, _, ranks, _ = contrast_factors(torch.diag(f)[None], torch.diag(m)[None], threshold=1.0, max_rank=1)
    assert ranks.tolist() == [1]


def test_grams_centre_the_forget_rows_on_the_retain_mean(tiny_sd1, one_thread):
    from pure_fast.collect.activations import CollectOptions, collect_activations
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.estimate.subspace import contrast_grams

    acts = collect_activations(wrap_pipeline(tiny_sd1, device="cpu"), {"forget:a": ["a painting by Van Gogh", "Van Gogh style"],
                                          "retain": ["a photo of a cat", "Claude Monet", "a house"]},
                               CollectOptions(size=32, seeds=(0,), steps=4, record_steps=2), progress=False)
    out = contrast_grams(acts, ["forget:a"], "retain", retain_weight=2.0, ridge=0.1)
    for d, (idx, C_F, M) in out.items():
        for j, i in enumerate(idx):
            F = acts.stats["forget:a"][i].matrix().double()
            R = acts.stats["retain"][i].matrix().double()
            mR = R.mean(0)
            # the rows and their running sums are fp32 (eps 6e-8); centring via the second moment cancels up
            # to ||E[h h^T]|| / ||C_F|| of that, so the tolerance is relative to the uncentred scale
            tol = 64 * 6e-8 * float((F.T @ F / F.shape[0]).abs().max())
            torch.testing.assert_close(C_F[j], (F - mR).T @ (F - mR) / F.shape[0], rtol=0, atol=tol)
            ER = R.T @ R / R.shape[0]
            want = 2.0 * (ER + 0.1 * torch.trace(ER) / d * torch.eye(d, dtype=torch.float64))
            torch.testing.assert_close(M[j], want, rtol=1e-6, atol=64 * 6e-8 * float(want.abs().max()))


def test_contrast_option_end_to_end_loop_and_round_trip(tiny_sd1, one_thread, tmp_path):
    kw = dict(category="style", progress=False, fingerprint=False, basis="contrast", **COLLECT)
    e = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], rounds=3, residual_tol=0.0, **kw)
    res = e.stats["residual"]
    assert len(res) == e.stats["rounds"] >= 1 and all(b < a for a, b in zip(res, res[1:]))
    weak = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], rounds=1, retain_weight=1e4, **kw)
    strong = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], rounds=1, retain_weight=1e-2, **kw)

    def size(edit):
        return sum(float((u @ d).norm()) for u, d in edit.factors.values())

    assert size(weak) < 0.1 * size(strong)  # the retain weight trades the edit off, as the objective says
    path = e.save(str(tmp_path / "contrast.safetensors"))
    back = pure_fast.load_edit(path)
    assert back.options["basis"] == "contrast" and back.options["retain_weight"] == pytest.approx(30.0)
    before = {n: p.detach().clone() for n, p in tiny_sd1.unet.named_parameters()}
    back.apply(tiny_sd1)
    back.revert(tiny_sd1)
    for n, p in tiny_sd1.unet.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_contrast_options_are_checked():
    from pure_fast.errors import UsageError
    from pure_fast.methods.base import build_options, get_method

    with pytest.raises(UsageError, match="retain_weight"):
        build_options(get_method("pure"), values={"retain_weight": 0})
    with pytest.raises(UsageError, match="basis"):
        build_options(get_method("pure"), values={"basis": "ridge"})
