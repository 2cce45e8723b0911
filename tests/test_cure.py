"""CURE: the shared right matrix against the formula written directly (dense), effect, options, round trip."""
import json
import os

import pytest
import torch

import pure_fast
from pure_fast.adapters import wrap_pipeline
from pure_fast.edits.edit import kv_weights
from pure_fast.edits.io import load_edit
from pure_fast.edits.shared import SharedRightEdit
from pure_fast.errors import UsageError
from pure_fast.methods.cure import CureOptions

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one intra-op thread (conftest)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in kv_weights(model.unet).items()}


def _subject_to_eos_rows(adapter, concepts):
    """Tokens 1..EOS of each concept prompt (subject tokens and EOS), computed directly."""
    te = adapter.encode_tokens(concepts)
    return torch.cat([te.embeds[i, 1 : int(te.mask[i].sum())] for i in range(len(concepts))]).double()


def _dense_p_dis(F, R, alpha):
    """P_dis = P_f - P_f P_r, P = Σ_i f(r_i) v_i v_iᵀ, r_i = σ_i² / Σσ², f(r) = α r / ((α-1) r + 1)."""
    def soft_projector(X):
        _, S, Vh = torch.linalg.svd(X, full_matrices=True)
        P = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
        total = float((S ** 2).sum())
        for i in range(S.numel()):
            r = float(S[i] ** 2) / total
            if r < 1e-12:
                continue
            P += (alpha * r / ((alpha - 1) * r + 1)) * torch.outer(Vh[i], Vh[i])
        return P

    P_f = soft_projector(F)
    P_r = soft_projector(R) if R.shape[0] else torch.zeros_like(P_f)
    return P_f - P_f @ P_r


@pytest.mark.parametrize("family,alpha", [("sd1", 2.0), ("sdxl", 2.0), ("toy", 5.0), ("sdxl", 0.5)])
def test_cure_equals_dense_formula(family, alpha, tiny_sd1, tiny_sdxl, toy):
    model = {"sd1": wrap_pipeline(tiny_sd1), "sdxl": wrap_pipeline(tiny_sdxl), "toy": toy}[family]
    forget, retain = (["red", "circle"], ["blue", "green"]) if family == "toy" else (
        ["Van Gogh", "Picasso"], ["Claude Monet", "Rembrandt"])
    edit = pure_fast.erase(model, forget, retain, method="cure", alpha=alpha, progress=False)
    assert isinstance(edit, SharedRightEdit) and edit.options["alpha"] == alpha
    F, R = _subject_to_eos_rows(model, forget), _subject_to_eos_rows(model, retain)
    P_dis = _dense_p_dis(F, R, alpha)
    assert edit.stats["forget_tokens"] == F.shape[0] and edit.rank == F.shape[0]
    torch.testing.assert_close(edit.right_matrix(), torch.eye(F.shape[1], dtype=torch.float64) - P_dis,
                               atol=1e-6, rtol=0)
    before = _snapshot(model)
    edit.apply(model)
    after = _snapshot(model)
    edit.revert(model)
    for name, W0 in before.items():
        want = W0.double() @ (torch.eye(W0.shape[1], dtype=torch.float64) - P_dis)
        err = float((after[name].double() - want).norm() / want.norm())
        assert err < 2e-6, (name, err)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())


def test_cure_effect_on_toy_tokens(toy):
    """Erasing 'red' (retain 'blue', 'green') removes about half of the red token's input to K/V, and barely
    touches 'blue' in a sentence."""
    edit = pure_fast.erase(toy, ["red"], ["blue", "green"], method="cure", progress=False)
    A = edit.right_matrix().float()
    te = toy.encode_tokens(["red", "a red circle", "a blue square"])

    def change(i, pos):
        c = te.embeds[i, pos]
        return float((A @ c - c).norm() / c.norm())

    assert change(0, 1) > 0.4 and change(1, 2) > 0.4  # measured 0.52, 0.49 (alpha = 2)
    assert change(2, 2) < 0.1  # measured 0.06
    before = _snapshot(toy)
    edit.apply(toy)
    after = _snapshot(toy)
    edit.revert(toy)
    name = next(iter(before))
    c_red, c_blue = te.embeds[1, 2], te.embeds[2, 2]
    red = float((after[name] @ c_red - before[name] @ c_red).norm() / (before[name] @ c_red).norm())
    blue = float((after[name] @ c_blue - before[name] @ c_blue).norm() / (before[name] @ c_blue).norm())
    assert red > 3 * blue


def test_no_retain_is_plain_soft_projection_and_multi_concept(tiny_sd1):
    ad = wrap_pipeline(tiny_sd1)
    edit = pure_fast.erase(ad, ["Van Gogh", "Picasso", "Rembrandt"], method="cure", progress=False,
                           fingerprint=False)
    F = _subject_to_eos_rows(ad, ["Van Gogh", "Picasso", "Rembrandt"])
    P = _dense_p_dis(F, F[:0], 2.0)
    torch.testing.assert_close(edit.right_matrix(), torch.eye(32, dtype=torch.float64) - P, atol=1e-6, rtol=0)
    assert edit.concepts["forget"] == ["Van Gogh", "Picasso", "Rembrandt"]


def test_alpha_category_and_errors(tiny_sd1):
    from pure_fast.methods import EraseContext
    from pure_fast.options import validate_options

    def options(category, **kw):
        return EraseContext.prepare("cure", ["x"], category=category, values=kw).options

    assert options("nsfw").alpha == 5.0
    assert options("style").alpha == 2.0
    assert options("nsfw", alpha=3).alpha == 3
    for bad in (0, -1.0, float("inf"), "x"):
        with pytest.raises(UsageError, match="alpha"):
            validate_options(CureOptions(alpha=bad))
    with pytest.raises(UsageError, match="token_mode"):
        pure_fast.erase(tiny_sd1, ["Van Gogh"], method="cure", token_mode="every", progress=False)
    with pytest.raises(UsageError, match="rank_tol"):
        pure_fast.erase(tiny_sd1, ["Van Gogh"], method="cure", rank_tol=1.5, progress=False)


def test_round_trip_and_cli(tiny_sd1_dir, tmp_path, capsys):
    from pure_fast.cli import main

    out = str(tmp_path / "cure.safetensors")
    rc = main(["erase", "--model", tiny_sd1_dir, "--method", "cure", "--forget", "nudity", "--category", "nsfw",
               "--retain", "a dog", "--out", out, "--quiet"])
    assert rc == 0 and os.path.isfile(out)
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "cure" and info["options"]["alpha"] == 5.0 and info["options"]["category"] == "nsfw"
    e = load_edit(out)
    from pure_fast.adapters import load_model

    model = load_model(tiny_sd1_dir)
    before = _snapshot(model)
    e.apply(model)  # fingerprint of the folder's weights matches
    assert any(not torch.equal(before[k], v) for k, v in _snapshot(model).items())
    e.revert(model)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "cure", "--forget", "x", "--option", "alpha=0",
                 "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "alpha=0" in capsys.readouterr().err
