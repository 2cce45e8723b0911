"""Numerical health: degenerate anchor sets give finite weights, a documented behaviour and a warning.

Documented behaviour (pure_fast/estimate/subspace.py docstring):
- empty retain set: P_R = 0, PURE is plain projection E = I - P_F (warning);
- identical / collinear anchors: the basis is the directions that exist (rank 1 for identical rows, warning);
- a threshold never gives rank 0; all-zero activations give rank 0 and the layer is left unchanged (warning);
- forget and retain (nearly) collinear: the change there is ~0 (warning naming the layers).

Two levels: the estimate stage on synthetic rows (exact expectations from independent formulas), and PURE
end to end on the tiny SD1 pipeline (finite factors, the warnings, the shape of the change).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from pure_fast.collect.activations import Activations, CollectOptions, GroupStats
from pure_fast.estimate import subspace as sb
from pure_fast.methods.pure import pure_factors


@dataclass
class _Layer:
    name: str
    d_out: int


def _acts(groups: dict[str, torch.Tensor], d: int = 16, n_layers: int = 2, max_rows: int | None = None) -> Activations:
    """Activations with the same rows [n, d] at every layer of one shape group."""
    layers = [_Layer(f"layer{i}.attn2", d) for i in range(n_layers)]
    stats = {}
    for g, rows in groups.items():
        per = []
        for _ in layers:
            st = GroupStats(d, max_rows or d)
            if rows.shape[0]:
                st.add(rows)
            per.append(st)
        stats[g] = per
    return Activations(layers, stats, CollectOptions())


def _finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _orthonormal(V, r):
    return torch.allclose(V[:, :r].T @ V[:, :r], torch.eye(r, dtype=V.dtype), atol=1e-10)


G = torch.Generator().manual_seed(0)
W = torch.randn(2, 16, 8, generator=G, dtype=torch.float64)


# ---- the estimate stage on synthetic rows ---------------------------------------------------------------
def test_empty_retain_is_zero_projector_and_plain_projection():
    F = torch.randn(6, 16, generator=G)
    acts = _acts({"forget": F, "retain": torch.zeros(0, 16)})
    fb, rb = sb.group_basis(acts, "forget", 0.95), sb.group_basis(acts, "retain", 0.95)
    assert rb[16].V.shape[2] == 0 and rb[16].ranks.tolist() == [0, 0]
    up, down = pure_factors(fb[16].V, rb[16].V, W)
    V = fb[16].V.to(torch.float64)
    assert _finite(up, down)
    # E = I - P_F: up @ down == -V V^T W (independent formula)
    assert torch.allclose(up @ down, -(V @ V.transpose(1, 2)) @ W, atol=1e-12)


def test_identical_rows_rank_one_with_warning():
    row = torch.randn(1, 16, generator=G)
    acts = _acts({"retain": row.repeat(5, 1)})
    with pytest.warns(UserWarning, match="one repeated row"):
        b = sb.group_basis(acts, "retain", 0.95)
    V, ranks = b[16].V, b[16].ranks
    assert ranks.tolist() == [1, 1] and _finite(V)
    u = (row[0] / row[0].norm()).double()
    assert torch.allclose((V[0, :, 0] @ u).abs(), torch.tensor(1.0, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("max_rows", [None, 3], ids=["rows", "streamed_gram"])
@pytest.mark.parametrize("center", [True, False])
def test_rank_deficient_rows_span_exactly_their_plane(max_rows, center):
    """10 rows in a 2-D plane of R^16 (rank-deficient): an orthonormal basis of that plane, no NaN."""
    plane = torch.linalg.qr(torch.randn(16, 2, generator=G, dtype=torch.float64))[0]
    rows = (torch.randn(10, 2, generator=G, dtype=torch.float64) @ plane.T).float()
    acts = _acts({"g": rows}, max_rows=max_rows)
    b = sb.group_basis(acts, "g", 1.0, center=center)
    V, ranks = b[16].V.to(torch.float64), b[16].ranks
    assert _finite(V) and ranks.tolist() == [2, 2]
    for l in range(2):
        assert _orthonormal(V[l], 2)
        P = V[l, :, :2] @ V[l, :, :2].T
        assert torch.linalg.matrix_norm(P - plane @ plane.T) < 1e-5


@pytest.mark.parametrize("threshold", [1e-12, 1e-6, 0.5])
def test_tiny_thresholds_never_give_rank_zero(threshold):
    acts = _acts({"g": torch.randn(8, 16, generator=G)})
    for center in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # distinct rows: no "repeated row" warning
            sb.group_basis(acts, "g", threshold, center=center)
        b = sb.group_basis(acts, "g", threshold, center=center)
        r = b[16].ranks
        assert bool((r >= 1).all()) and _finite(b[16].V)
        if threshold < 1e-3:
            assert bool((r <= (2 if center else 1)).all())


def test_zero_activations_rank_zero_and_layer_unchanged():
    acts = _acts({"forget": torch.zeros(4, 16), "retain": torch.randn(4, 16, generator=G)})
    fb = sb.group_basis(acts, "forget", 0.95)
    assert fb[16].ranks.tolist() == [0, 0]
    with pytest.warns(UserWarning, match="rank 0"):
        empty = sb.warn_degenerate("forget", fb, acts.layers)
    assert empty == ["layer0.attn2", "layer1.attn2"]
    up, down = pure_factors(fb[16].V, sb.group_basis(acts, "retain", 0.95)[16].V, W)
    assert up.shape[2] == 0 and _finite(up, down) and float((up @ down).abs().max()) == 0.0


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-4])
def test_nearly_collinear_forget_and_retain(eps):
    """Retain rows = forget rows + eps noise: the change is ~0, finite, and a warning names the layers."""
    F = torch.randn(6, 16, generator=G, dtype=torch.float64)
    R = F + eps * torch.randn(6, 16, generator=G, dtype=torch.float64)
    acts = _acts({"forget": F.float() if eps == 0 else F, "retain": R.float() if eps == 0 else R})
    fb, rb = sb.group_basis(acts, "forget", 0.99), sb.group_basis(acts, "retain", 0.99)
    frac = sb.overlap_fraction(fb, rb)
    assert max(frac.values()) < 1e-3
    with pytest.warns(UserWarning, match="nearly collinear"):
        low = sb.warn_overlap(fb, rb, acts.layers)
    assert len(low) == 2
    up, down = pure_factors(fb[16].V, rb[16].V, W)
    assert _finite(up, down)
    assert float((up @ down).norm()) < 1e-2 * float(W.norm())


def test_orthogonal_forget_and_retain_no_warning_exact_projection():
    """The control: retain orthogonal to forget -> overlap 1, no warning, change = -P_F W."""
    Q = torch.linalg.qr(torch.randn(16, 6, generator=G, dtype=torch.float64))[0]
    F = torch.randn(5, 3, generator=G, dtype=torch.float64) @ Q[:, :3].T
    R = torch.randn(5, 3, generator=G, dtype=torch.float64) @ Q[:, 3:].T
    acts = _acts({"forget": F, "retain": R})
    fb, rb = sb.group_basis(acts, "forget", 1.0, center=False), sb.group_basis(acts, "retain", 1.0, center=False)
    frac = sb.overlap_fraction(fb, rb)
    assert min(frac.values()) > 1 - 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sb.warn_overlap(fb, rb, acts.layers) == []
    up, down = pure_factors(fb[16].V, rb[16].V, W)
    P_F = Q[:, :3] @ Q[:, :3].T
    assert torch.allclose(up @ down, -(P_F @ W), atol=1e-10)


# ---- PURE end to end on the tiny SD1 pipeline -----------------------------------------------------------
FAST = dict(size=32, seeds=(0,), steps=4, record_steps=2)
FORGET = {"Van Gogh": ["a painting by Van Gogh", "art in the style of Van Gogh", "Van Gogh artwork"]}


@pytest.fixture(scope="module")
def adapter(tiny_sd1):
    from pure_fast.adapters import wrap_pipeline

    return wrap_pipeline(tiny_sd1)


def _run(adapter, forget, retain, **opts):
    from pure_fast.methods import run_method
    from pure_fast.methods.pure import PureOptions

    collect = dict(FAST, **opts.pop("collect", {}))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        edit = run_method("pure", adapter, list(forget), [], forget, retain, PureOptions(collect=CollectOptions(**collect), **opts), progress=False)
    msgs = [str(w.message) for w in rec]
    for name, (u, d) in edit.factors.items():
        assert _finite(u, d), name
    return edit, msgs


def _weights(adapter):
    from pure_fast.edits.edit import kv_weights

    return kv_weights(adapter.unet)


def test_pure_empty_retain(adapter):
    edit, msgs = _run(adapter, FORGET, [])
    assert any("no retain concepts" in m for m in msgs)
    w = _weights(adapter)
    assert edit.factors
    for name, (up, down) in edit.factors.items():
        # plain projection: down = V_F^T W = -up^T W
        assert torch.allclose(down.double(), -up.double().T @ w[name].double(), atol=1e-4)


def test_pure_identical_retain_anchors(adapter):
    edit, msgs = _run(adapter, FORGET, ["a photo of a dog"] * 4, collect=dict(record_steps=1))
    assert any("retain" in m and "one repeated row" in m for m in msgs), msgs
    assert set(edit.stats["retain_rank"].values()) == {1}
    assert edit.factors


def test_pure_retain_equals_forget(adapter):
    """Retain anchors = the forget anchors: collinear subspaces -> change ~0, a warning, finite."""
    edit, msgs = _run(adapter, FORGET, list(FORGET["Van Gogh"]))
    assert any("nearly collinear" in m for m in msgs), msgs
    w = _weights(adapter)
    for name, (up, down) in edit.factors.items():
        assert float((up.double() @ down.double()).abs().max()) < 1e-4 * float(w[name].detach().abs().max())


@pytest.mark.parametrize("threshold", [1e-9, 1.0])
def test_pure_extreme_thresholds(adapter, threshold):
    edit, _ = _run(adapter, FORGET, ["a photo of a dog", "a photo of a cat"], forget_threshold=threshold,
                   retain_threshold=threshold)
    ranks = list(edit.stats["forget_rank"].values())
    assert ranks and min(ranks) >= 1
    if threshold < 1e-3:
        # per round: the mean direction plus at most one principal direction (the closed loop adds a round's
        # basis per round: at most ``rounds`` rounds)
        assert max(ranks) <= 2 * edit.options["rounds"]


def test_pure_zero_activation_layer_left_unchanged():
    """A layer whose to_v is zero has all-zero activations: rank 0 there, a warning, that layer not edited."""
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.testing import build_tiny_pipeline

    ad = wrap_pipeline(build_tiny_pipeline("sd1"))
    layer = ad.cross_attention_layers()[0]
    with torch.no_grad():
        layer.module.to_v.weight.zero_()
    edit, msgs = _run(ad, FORGET, ["a photo of a dog"])
    assert any("rank 0" in m and layer.name in m for m in msgs), msgs
    assert layer.key_weight not in edit.factors and layer.value_weight not in edit.factors
    assert len(edit.factors) == 2 * (len(ad.cross_attention_layers()) - 1)


# ---- the other methods: the same degenerate inputs give finite edits that apply and revert -------------------
OTHER = ["uce", "cure", "space", "acterase"]
CASES = {
    "empty_retain": dict(retain=[]),
    "identical_anchors": dict(retain=["Claude Monet", "a photograph"], templates=["art by {}", "art by {}"]),
    "near_duplicate_retain": dict(retain=["Van Gogh."]),
}


def _method_opts(method):
    if method == "acterase":
        return dict(size=32, seeds=(0,), steps=4, record_steps=2)
    if method == "space":
        return dict(max_iter=30)
    return {}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", OTHER)
def test_other_methods_degenerate_inputs_finite(method, case, tiny_sd1):
    import pure_fast
    from pure_fast.edits.edit import kv_weights

    kw = dict(CASES[case])
    retain = kw.pop("retain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit = pure_fast.erase(tiny_sd1, ["Van Gogh"], retain, method=method, category="style", progress=False,
                               **kw, **_method_opts(method))
    for name, t in edit.tensors().items():
        if t.is_floating_point():
            assert _finite(t), f"{method}/{case}: {name} is not finite"
    before = {k: v.detach().clone() for k, v in kv_weights(tiny_sd1.unet).items()}
    edit.apply(tiny_sd1)
    try:
        for name in edit.target_weights():
            assert _finite(kv_weights(tiny_sd1.unet)[name])
    finally:
        edit.revert(tiny_sd1)
    after = kv_weights(tiny_sd1.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
