"""ActErase numerical health: degenerate inputs warn (one line each), NaN activations raise NumericalError."""
from __future__ import annotations

import warnings

import pytest
import torch

import pure_fast
from pure_fast.collect.activations import CollectOptions
from pure_fast.edits.patch import ConceptPatch, installed_hooks
from pure_fast.errors import NumericalError
from pure_fast.methods import acterase, run_method
from pure_fast.methods.acterase import check_patches_finite, layer_health, warn_health
from pure_fast.ops.batched_svd import subspace_basis

FAST = dict(size=32, steps=4, record_steps=2, seeds=(0,), batch_size=32)


def _adapter(pipe):
    from pure_fast.adapters import wrap_pipeline

    return wrap_pipeline(pipe)


def _flags(D, D_raw=None, threshold=0.9):
    V, r, _ = subspace_basis(D, threshold, max_rank=4)
    f = layer_health(D, V, r, D_raw)
    return {k: [f"l{j}" for j in range(D.shape[0]) if bool(v[j])] for k, v in f.items()}


# ---- helpers on synthetic differences (fast) -------------------------------------------------------------
def test_layer_health_ordinary_has_no_flags_and_warns_nothing():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) + 2.0  # a shared mean direction
    flags = _flags(D)
    assert all(not v for v in flags.values()), flags
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_health("x", flags, 3)


def test_rank0_layer_warns_once_with_count():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(4, 5, 16, generator=g, dtype=torch.float64) + 1.0
    D[1] = 0
    D[3] = 0
    flags = _flags(D)
    assert flags["rank0"] == ["l1", "l3"]
    assert not flags["gate_closed"] and not flags["identical"]
    with pytest.warns(UserWarning, match=r"'cat' has rank 0 at 2 of 4 layer\(s\) \(e\.g\. l1\)") as rec:
        warn_health("cat", flags, 4)
    assert len(rec) == 1


def test_cancelling_differences_close_the_gate():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    D = torch.cat([x, -x], 1)  # every difference has its negative: mean (mu_f - mu_a) = 0
    D[1] += 1.0  # layer 1 is ordinary
    flags = _flags(D)
    assert flags["gate_closed"] == ["l0"] and not flags["rank0"]
    # the independent formula: |mean(D V)|^2 is ~0 at layer 0 while the rows are large
    V, r, _ = subspace_basis(D, 0.9, max_rank=4)
    w = (D[0] @ V[0, :, : int(r[0])]).mean(0)
    assert float(w @ w) < 1e-20 and float((D[0] ** 2).sum()) > 1
    with pytest.warns(UserWarning, match=r"mu_f ~ mu_a\) at 1 of 2 layer\(s\).*gate='off'"):
        warn_health("cat", flags, 2, gate="soft")
    with warnings.catch_warnings():  # no gate, nothing to warn about
        warnings.simplefilter("error")
        warn_health("cat", flags, 2, gate="off")


def test_identical_difference_rows_warn():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(2, 1, 16, generator=g, dtype=torch.float64)
    D = row.expand(2, 4, 16).clone()
    D[1, 1] += 0.5  # layer 1 varies
    flags = _flags(D)
    assert flags["identical"] == ["l0"]
    with pytest.warns(UserWarning, match=r"one repeated row at 1 of 2 layer\(s\)"):
        warn_health("cat", flags, 2)


def test_retain_projection_removing_the_signal_warns():
    g = torch.Generator().manual_seed(4)
    D_raw = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)
    V_R, _, _ = subspace_basis(D_raw[:1], 1.0)  # layer 0's own span: the projection removes everything there
    V_R = torch.cat([V_R, torch.zeros(1, 16, V_R.shape[-1], dtype=torch.float64)])
    D = D_raw - (D_raw @ V_R) @ V_R.transpose(1, 2)
    assert float((D[0] ** 2).sum()) < 1e-20 * float((D_raw[0] ** 2).sum()) + 1e-20
    flags = _flags(D, D_raw)
    assert flags["retain_removed"] == ["l0"]  # (rounding residue may still give a tiny basis there)
    with pytest.warns(UserWarning, match=r"retain projection removes nearly all of 'cat'"):
        warn_health("cat", {"retain_removed": flags["retain_removed"]}, 2)


def test_check_patches_finite():
    V = torch.eye(8)[:, :2]
    ok = {"a": [ConceptPatch(V, torch.zeros(2), torch.ones(2))]}
    check_patches_finite(ok)
    bad = {"a": [ConceptPatch(V, torch.tensor([0.0, float("nan")]), torch.ones(2))]}
    with pytest.raises(NumericalError, match=r"1 non-finite value\(s\) in the patch of a \(c0\.anchor\)"):
        check_patches_finite(bad)


# ---- end to end on the tiny SD1 pipeline ----------------------------------------------------------------
def _erase(adapter, forget, retain, **kw):
    return pure_fast.erase(adapter, forget, retain, method="acterase", category="style", progress=False,
                           **{**FAST, **kw})


def test_ordinary_erase_warns_nothing(tiny_sd1, one_thread):
    adapter = _adapter(tiny_sd1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edit = _erase(adapter, ["Van Gogh"], [])
    assert edit.patches and all(torch.isfinite(t).all() for t in edit.tensors().values())
    # with a retain concept, only the (pre-existing) retain-gate report may appear on this random model
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _erase(adapter, ["Van Gogh"], ["Claude Monet"], retain_threshold=0.5)
    assert all("opens for retain prompts" in str(w.message) for w in rec), [str(w.message) for w in rec]


def test_retain_threshold_without_retain_concepts_warns(tiny_sd1, one_thread):
    adapter = _adapter(tiny_sd1)
    with pytest.warns(UserWarning, match=r"retain_threshold=0\.5 is set but no retain prompt pair exists"):
        edit = _erase(adapter, ["Van Gogh"], [], retain_threshold=0.5)
    assert edit.patches


def test_duplicate_forget_prompts_warn(tiny_sd1, one_thread):
    adapter = _adapter(tiny_sd1)
    prompts = ["a painting by Van Gogh"] * 3
    with pytest.warns(UserWarning) as rec:
        run_method("acterase", adapter, ["Van Gogh"], [], {"Van Gogh": prompts}, [],
                           acterase.ActEraseOptions(collect=CollectOptions(**FAST)), progress=False)
    msgs = [str(w.message) for w in rec]
    assert any("2 anchor prompt(s) of 'Van Gogh' repeat another one" in m for m in msgs), msgs
    assert any("difference rows of 'Van Gogh' are one repeated row" in m for m in msgs), msgs


def test_nan_activations_raise_and_leave_the_model_untouched(tiny_sd1, one_thread):
    adapter = _adapter(tiny_sd1)
    unet = adapter.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    layer = adapter.cross_attention_layers()[0]
    handle = layer.module.to_v.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(NumericalError, match=r"non-finite value\(s\) in the activations of 'Van Gogh'"):
            _erase(adapter, ["Van Gogh"], [])
        with pytest.raises(NumericalError, match=r"non-finite value\(s\) in the retain prompts' activations"):
            _erase(adapter, ["Van Gogh"], ["Claude Monet"])
    finally:
        handle.remove()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not installed_hooks(unet)
    assert acterase.GATE_TOL > 0  # module constants documented in the docstring exist
