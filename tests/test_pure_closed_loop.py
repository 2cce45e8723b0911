"""PURE's closed loop, forget-specific basis and presets: math identities of the combined multi-round edit,
the loop never increasing the residual (tiny pipeline and the toy model), presets round-tripping through
edit files, and option errors as one line."""
from __future__ import annotations

import json

import pytest
import torch

import pure_fast
from pure_fast.errors import UsageError
from pure_fast.methods.base import build_options, get_method
from pure_fast.methods.pure import PureOptions, concat_factors, pure_factors
from pure_fast.options import validate_options

COLLECT = dict(size=32, seeds=(0,), steps=4, record_steps=2)


def _orthonormal(d, k, g):
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def _dense_E(V_F, V_R):
    d = V_F.shape[0]
    I = torch.eye(d, dtype=torch.float64)
    return I - V_F @ V_F.T @ (I - V_R @ V_R.T)


# ---- math identities -------------------------------------------------------------------------------------
def test_two_rounds_concatenated_equal_sequential_operators_and_rank_bound():
    g = torch.Generator().manual_seed(0)
    d, d_in = 40, 24
    W = torch.randn(d, d_in, generator=g, dtype=torch.float64)
    V_R = _orthonormal(d, 6, g)
    V1, V2 = _orthonormal(d, 5, g), _orthonormal(d, 3, g)
    u1, d1 = pure_factors(V1[None], V_R[None], W[None])
    W1 = W + u1[0] @ d1[0]
    u2, d2 = pure_factors(V2[None], V_R[None], W1[None])  # round 2 works on the weights round 1 left
    f = concat_factors({"w": (u1[0], d1[0])}, {"w": (u2[0], d2[0])})
    up, down = f["w"]
    assert up.shape == (d, 8) and down.shape == (8, d_in)
    dense = _dense_E(V2, V_R) @ _dense_E(V1, V_R) @ W  # E_2 E_1 W
    torch.testing.assert_close(W + up @ down, dense, rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(up @ down) <= 5 + 3


def test_specific_basis_makes_E_a_projector_that_removes_the_forget_directions():
    """V_F orthogonal to V_R (the 'specific' basis): E = I - P_F, idempotent, and V_F^T E W = 0."""
    g = torch.Generator().manual_seed(1)
    d, d_in = 32, 20
    W = torch.randn(d, d_in, generator=g, dtype=torch.float64)
    Q = _orthonormal(d, 10, g)
    V_R, V_F = Q[:, :4], Q[:, 4:9]
    up, down = pure_factors(V_F[None], V_R[None], W[None])
    new = W + up[0] @ down[0]
    assert float((V_F.T @ new).abs().max()) < 1e-12  # forget directions gone from every output
    torch.testing.assert_close(V_R.T @ new, V_R.T @ W, rtol=0, atol=1e-12)  # retain directions untouched
    E = _dense_E(V_F, V_R)
    torch.testing.assert_close(E @ E, E, rtol=0, atol=1e-12)


def test_variance_basis_leaves_the_overlap_and_a_second_round_shrinks_it():
    """With V_F overlapping span(V_R), one round leaves s' = V_F^T P_R V_F s of the forget-specific signal
    s = V_F^T (I - P_R) h; repeating the round multiplies it by that contraction again."""
    g = torch.Generator().manual_seed(2)
    d = 30
    V_R = _orthonormal(d, 8, g)
    V_F = torch.linalg.qr(V_R[:, :3] + 0.7 * torch.randn(d, 3, generator=g, dtype=torch.float64))[0]
    E = _dense_E(V_F, V_R)
    h = torch.randn(d, 5, generator=g, dtype=torch.float64)
    s = lambda x: V_F.T @ (x - V_R @ (V_R.T @ x))  # noqa: E731
    C = V_F.T @ V_R @ V_R.T @ V_F
    torch.testing.assert_close(s(E @ h), C @ s(h), rtol=0, atol=1e-12)
    assert s(E @ E @ h).norm() < s(E @ h).norm() < s(h).norm()


# ---- the loop on a tiny pipeline ---------------------------------------------------------------------------
def test_closed_loop_residual_never_increases_and_edit_stays_one_low_rank_edit(tiny_sd1, one_thread, tmp_path):
    e1 = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], category="style", progress=False,
                         fingerprint=False, rounds=1, **COLLECT)
    e3 = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], category="style", progress=False,
                         fingerprint=False, rounds=3, residual_tol=0.0, **COLLECT)
    res = e3.stats["residual"]
    assert 1 <= e3.stats["rounds"] <= 3 and len(res) == e3.stats["rounds"]
    assert all(b < a for a, b in zip(res, res[1:]))  # strictly decreasing: a round that does not help is dropped
    r1, r3 = e1.ranks(), e3.ranks()
    assert set(r1) == set(r3) and all(r3[n] >= r1[n] for n in r1)
    # round 1 of the loop is the open-loop edit: the first columns are its factors
    for n, (u, d) in e1.factors.items():
        torch.testing.assert_close(e3.factors[n][0][:, : u.shape[1]], u)
        torch.testing.assert_close(e3.factors[n][1][: d.shape[0]], d)
    path = e3.save(str(tmp_path / "loop.safetensors"))
    back = pure_fast.load_edit(path)
    assert back.stats["rounds"] == e3.stats["rounds"] and back.stats["residual"] == pytest.approx(res)
    assert back.options["rounds"] == 3 and back.ranks() == r3


def test_closed_loop_stops_at_the_tolerance(tiny_sd1, one_thread):
    e = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], category="style", progress=False,
                        fingerprint=False, rounds=4, residual_tol=0.99, **COLLECT)
    assert e.stats["rounds"] == 1 and e.stats["residual"][0] < 0.99


def test_specific_basis_erases_the_measured_signal_of_the_anchors(tiny_sd1, one_thread):
    """The forget-specific signal of the anchors (the loop's own measure) after a 'specific' edit is far below
    the variance basis' on the same model: its directions are orthogonal to the retain subspace."""
    kw = dict(category="style", progress=False, fingerprint=False, residual_tol=0.0, **COLLECT)
    var = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], rounds=2, **kw)
    spec = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], rounds=2, basis="specific", **kw)
    assert spec.stats["residual"][0] < 0.5 * var.stats["residual"][0]


# ---- presets and options ----------------------------------------------------------------------------------
def test_paper_preset_is_exact_and_round_trips_through_edit_files(tiny_sd1, one_thread, tmp_path):
    from pure_fast.cli import main

    opts = build_options(get_method("pure"), values={"preset": "paper"}, category="colour")
    assert (opts.center, opts.forget_threshold, opts.retain_threshold, opts.rounds, opts.basis) == (
        False, 0.95, 0.95, 1, "variance")  # neither toy thresholds nor the closed loop leak into it
    assert PureOptions().rounds == 3  # the default (bench/sweep_pure.py) is the closed loop
    assert (opts.collect.steps, opts.collect.record_steps, opts.collect.seeds) == (10, 5, (0, 1))
    e = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], category="style", progress=False,
                        preset="paper", size=32, seeds=(0,))
    assert e.options["preset"] == "paper" and e.options["center"] is False
    assert e.options["collect"]["record_steps"] == 5 and e.options["collect"]["seeds"] == [0]  # caller's seeds win
    path = e.save(str(tmp_path / "paper.safetensors"))
    back = pure_fast.load_edit(path)
    assert back.options == json.loads(json.dumps(e.options))
    flat = {k: v for k, v in back.options.items() if k not in ("collect", "size", "category")}
    flat.update({k: v for k, v in back.options["collect"].items()})
    rebuilt = build_options(get_method("pure"), values=flat)  # the recorded options rebuild the same options
    assert rebuilt == build_options(get_method("pure"), values={"preset": "paper", "size": 32, "seeds": (0,)})
    assert main(["inspect", path, "--json"]) == 0


def test_inspect_reports_rounds_and_residual(tiny_sd1, one_thread, tmp_path, capsys):
    from pure_fast.cli import main

    e = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], category="style", progress=False, rounds=2,
                        residual_tol=0.0, **COLLECT)
    path = e.save(str(tmp_path / "loop.safetensors"))
    capsys.readouterr()
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert f"{e.stats['rounds']} round(s)" in out and f"{e.stats['residual'][0]:.3f}" in out


@pytest.mark.parametrize("opt, msg", [
    ("rounds=0", "rounds=0 is out of range"), ("rounds=1.5", "rounds=1.5 is not valid"),
    ("residual_tol=1", "residual_tol=1 is out of range"), ("basis=total", "basis='total' is not valid"),
    ("preset=fast", "preset='fast' is not valid"),
])
def test_bad_options_are_one_line_usage_errors(opt, msg, tmp_path, capsys):
    from pure_fast.cli import main

    out = tmp_path / "e.safetensors"
    code = main(["erase", "--model", "toy", "--forget", "red", "--category", "colour", "--option", opt,
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and msg in err
    assert not out.exists()


def test_options_validate_directly():
    with pytest.raises(UsageError, match="rounds"):
        validate_options(PureOptions(rounds=True))
    with pytest.raises(UsageError, match="residual_tol"):
        validate_options(PureOptions(residual_tol=-0.1))


# ---- the toy model ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_closed_loop_on_the_toy_model_never_increases_the_residual(toy, one_thread):
    """A real check on the trained toy model (dev concept): each kept round lowers the anchors' forget-specific
    residual, and the residual measured independently on held-out prompts and fresh seeds does not grow."""
    from pure_fast.evaluate.residual import ResidualSettings, toy_residual

    kw = dict(category="colour", progress=False, fingerprint=False, seeds=(0,), record_steps=3)
    one = pure_fast.erase(toy, ["orange"], ["yellow", "green"], rounds=1, **kw)
    loop = pure_fast.erase(toy, ["orange"], ["yellow", "green"], rounds=3, residual_tol=0.0, **kw)
    res = loop.stats["residual"]
    assert all(b < a for a, b in zip(res, res[1:]))
    s = ResidualSettings(seeds=(7001,), steps=6, n_forget=6, n_retain=6, n_neighbour=1)
    cache: dict = {}
    r1 = toy_residual(toy, one, settings=s, unedited_cache=cache)["concepts"]["orange"]["residual_total"]
    r3 = toy_residual(toy, loop, settings=s, unedited_cache=cache)["concepts"]["orange"]["residual_total"]
    assert r3 <= r1 + 0.02
