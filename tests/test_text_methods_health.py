"""Numerical health of UCE / CURE / SPACE (methods/text_health.py): degenerate token sets give one documented
warning each and finite edits with the formula's value; non-finite inputs are one-line NumericalErrors."""
import warnings

import pytest
import torch

import pure_fast
from pure_fast.edits.edit import kv_weights
from pure_fast.errors import NumericalError
from pure_fast.methods import cure, run_method, space, uce
from pure_fast.methods.text_health import identical_to_guide, identical_to_retain, numerical_rank

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one intra-op thread (conftest)


def _weights(model):
    return {k: v.detach().clone() for k, v in kv_weights(model.unet).items()}


def _applied(edit, model):
    """The edited weights (float64) and whether they are all finite; the model is restored afterwards."""
    before = _weights(model)
    edit.apply(model)
    after = {k: v.detach().double().clone() for k, v in kv_weights(model.unet).items()}
    edit.revert(model)
    for k, v in _weights(model).items():
        assert torch.equal(v, before[k])
    return after, all(bool(torch.isfinite(v).all()) for v in after.values())


def _health_messages(record, method):
    return [str(w.message) for w in record if str(w.message).startswith(f"{method}:")]


def test_no_false_alarm_on_ordinary_inputs(toy, tiny_sd1):
    """Distinct forget / retain / guide concepts give none of the health warnings."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pure_fast.erase(toy, ["red"], ["blue", "green"], method="uce", progress=False)
        pure_fast.erase(toy, ["red", "square"], ["blue"], method="cure", progress=False)
        # tiny SD1: d_in = 32 and ~75 tokens per concept (more rows than dimensions is not "collinear")
        pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], method="uce", token_mode="subject_to_end",
                        progress=False)
    assert _health_messages(rec, "UCE") == [] and _health_messages(rec, "CURE") == []


def test_empty_retain_warns_and_is_finite(toy):
    with pytest.warns(UserWarning, match=r"UCE: no retain concepts, so nothing is preserved besides the ridge "
                                         r"lam\*\|\|W - W0\|\|\^2 \(lam=0.5\)"):
        e = pure_fast.erase(toy, ["red"], method="uce", progress=False)
    after, finite = _applied(e, toy)
    assert finite
    with pytest.warns(UserWarning, match=r"CURE: no retain concepts, so P_r = 0 and the edit is W \(I - P_f\)"):
        c = pure_fast.erase(toy, ["red"], method="cure", progress=False)
    assert _applied(c, toy)[1]
    # P_r = 0: A = I - P_f exactly (A symmetric, and A - I has the soft weights f(r) as eigenvalues)
    A = c.right_matrix()
    assert torch.allclose(A, A.T, atol=1e-6)
    with pytest.warns(UserWarning, match=r"SPACE: no retain concepts"):
        s = pure_fast.erase(toy, ["red"], method="space", mu=0.0, max_iter=20, history_every=0,
                            storage_dtype="float32", progress=False)
    s_after, finite = _applied(s, toy)
    assert finite
    # mu = 0: SPACE is UCE's solution (same degenerate retain set, same ridge)
    for k in after:
        assert torch.allclose(s_after[k], after[k], atol=1e-4)


def test_guide_identical_to_concept_warns_and_edit_is_zero(toy):
    with pytest.warns(UserWarning, match=r"UCE: the erase tokens of 'red' are \(nearly\) identical to those of its "
                                         r"guide 'red', so the edit for it is ~0"):
        e = pure_fast.erase(toy, ["red"], ["blue"], method="uce", guide="red", progress=False)
    assert torch.count_nonzero(e.U) == 0  # U = s_e (C_g - C_e) = 0
    before = {k: v.double() for k, v in _weights(toy).items()}
    after, finite = _applied(e, toy)
    assert finite and all(torch.equal(after[k], before[k]) for k in before)


def test_forget_identical_to_retained_warns_uce_space_cure(toy):
    opts = uce.UCEOptions()
    with pytest.warns(UserWarning, match=r"UCE: the erase tokens of 'red' are \(nearly\) identical to the tokens of "
                                         r"retained concept 'red': erasing and preserving the same tokens conflict"):
        e = run_method("uce", toy, ["red"], ["red"], None, None, options=opts, progress=False)
    assert torch.isfinite(e.U).all() and torch.isfinite(e.V).all()
    with pytest.warns(UserWarning, match=r"SPACE: the erase tokens of 'red' are \(nearly\) identical"):
        s = run_method("space", toy, ["red"], ["red"], None, None, progress=False,
                            options=space.SpaceOptions(mu=0.0, max_iter=5, history_every=0))
    assert _applied(s, toy)[1]
    with pytest.warns(UserWarning, match=r"CURE: the tokens of forget concept 'red' are \(nearly\) identical to those "
                                         r"of retained concept 'red'.*small \(P_f - P_f P_r\)"):
        c = run_method("cure", toy, ["red"], ["red"], None, None, options=cure.CureOptions(), progress=False)
    eye = torch.eye(c.d_in, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = run_method("cure", toy, ["red"], [], None, None, options=cure.CureOptions(), progress=False)
    small, full = torch.linalg.norm(c.right_matrix() - eye), torch.linalg.norm(alone.right_matrix() - eye)
    assert torch.isfinite(small) and 0 < small < 0.5 * full  # P_f - P_f P_r = V diag(f - f^2) V^T: reduced, not 0


def test_collinear_erase_tokens_warn_and_equal_doubled_erase_scale(toy):
    """Two identical erase tokens: rank-deficient C_e; the ridge keeps M invertible and the solve equals one
    token with erase_scale doubled (M and B only see s_e Σ c cᵀ)."""
    with pytest.warns(UserWarning, match=r"UCE: the 2 erase tokens are nearly collinear \(numerical rank 1 of 2, "
                                         r"smallest relative singular value .*\): the ridge lam=0.5 keeps M invertible"):
        twice = run_method("uce", toy, ["red", "red"], ["blue"], None, None, options=uce.UCEOptions(), progress=False)
    once = run_method("uce", toy, ["red"], ["blue"], None, None, options=uce.UCEOptions(erase_scale=2.0), progress=False)
    A2, A1 = twice.right_matrix(), once.right_matrix()
    assert torch.isfinite(A2).all()
    assert torch.allclose(A2, A1, atol=1e-5, rtol=1e-4)


def test_cure_rank_zero_warns_and_changes_nothing(toy, monkeypatch):
    d = toy.cross_attention_layers()[0].d_in
    monkeypatch.setattr(cure, "cure_tokens", lambda *a, **k: (torch.zeros(3, d, dtype=torch.float64),
                                                              torch.zeros(0, d, dtype=torch.float64), ["red"] * 3, []))
    with pytest.warns(UserWarning) as rec:
        e = run_method("cure", toy, ["red"], ["blue"], None, None, options=cure.CureOptions(), progress=False)
    msgs = _health_messages(rec, "CURE")
    assert any(m.startswith("CURE: rank_tol=1e-06 leaves no forget direction (rank 0") for m in msgs), msgs
    assert any(m.startswith("CURE: rank_tol=1e-06 leaves no retain direction (rank 0") for m in msgs), msgs
    assert e.stats["forget_rank"] == 0 and e.rank == 0
    before = {k: v.double() for k, v in _weights(toy).items()}
    after, finite = _applied(e, toy)
    assert finite and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("method", ["uce", "space", "cure"])
def test_non_finite_embeddings_are_one_line_errors(toy, monkeypatch, method):
    d = toy.cross_attention_layers()[0].d_in
    bad = torch.ones(2, d, dtype=torch.float64)
    bad[1, 3] = float("nan")
    if method == "cure":
        monkeypatch.setattr(cure, "cure_tokens", lambda *a, **k: (bad, bad[:1], ["red"] * 2, ["blue"]))
    else:
        tok = uce.TextTokens(bad, torch.zeros_like(bad), bad[:1], ["red"] * 2, ["blue"])
        monkeypatch.setattr(uce, "uce_tokens", lambda *a, **k: tok)  # UCE and SPACE both encode through it
    before = _weights(toy)
    with pytest.raises(NumericalError, match=r"non-finite value\(s\) in the token embeddings \(C_e\)|"
                                             r"non-finite value\(s\) in the token embeddings \(F\)") as ei:
        pure_fast.erase(toy, ["red"], ["blue"], method=method, progress=False)
    assert "\n" not in str(ei.value)
    assert all(torch.equal(v, before[k]) for k, v in _weights(toy).items())


def test_health_helpers_against_direct_definitions():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 8, generator=g, dtype=torch.float64)
    assert numerical_rank(X)[0] == 4
    Y = torch.cat([X, X[:1] * (1 + 1e-9)])  # a repeated direction
    r, ratio = numerical_rank(Y)
    assert r == 4 and ratio < 1e-4
    assert numerical_rank(torch.zeros(3, 8, dtype=torch.float64)) == (0, 0.0)
    # identical rows per owner: all rows of a concept must coincide
    G = X.clone()
    G[2] += 1.0
    assert identical_to_guide(X, G, ["a", "a", "b", "b"]) == ["a"]
    assert identical_to_guide(X, X + 1e-5 * X.norm(dim=1, keepdim=True) / 8 ** 0.5, ["a"] * 4) == ["a"]
    assert identical_to_retain(X, ["a", "a", "b", "b"], X[[1, 0]], ["r", "r"]) == [("a", "r")]
    assert identical_to_retain(X, ["a", "a", "b", "b"], X[[0]], ["r"]) == []  # only one of a's rows: no warning
