"""UCE: the shared-right-matrix closed form against a per-layer dense float64 solve, token conventions, the
effect on the toy model, the edit kind (apply / revert / save / load / inspect / fingerprints), errors."""
import json
import os

import pytest
import torch

import pure_fast
from pure_fast.adapters import wrap_pipeline
from pure_fast.collect.text import Phrase, encode_phrases, paired_tokens
from pure_fast.edits.edit import applied_stack, kv_weights
from pure_fast.edits.io import load_edit
from pure_fast.edits.shared import SharedRightEdit
from pure_fast.errors import EditFileError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one intra-op thread (conftest)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in kv_weights(model.unet).items()}


def _last_subject_rows(adapter, prompts):
    """Embedding at CLIP's last-subject index mask.sum() - 2 (BOS for ''), computed directly."""
    te = adapter.encode_tokens(prompts)
    idx = (te.mask.sum(1) - 2).clamp(min=0)
    return te.embeds[torch.arange(len(prompts)), idx].double()


def _dense_uce(W0, C_e, C_g, C_p, lam, s_e, s_p):
    """The original formula, written per layer: (λW0 + s_e Σ W0 c_g c_eᵀ + s_p Σ W0 c_p c_pᵀ)(λI + ...)⁻¹."""
    d = W0.shape[1]
    left = lam * W0.clone()
    right = lam * torch.eye(d, dtype=torch.float64)
    for ce, cg in zip(C_e, C_g):
        left += s_e * torch.outer(W0 @ cg, ce)
        right += s_e * torch.outer(ce, ce)
    for cp in C_p:
        left += s_p * torch.outer(W0 @ cp, cp)
        right += s_p * torch.outer(cp, cp)
    return torch.linalg.solve(right.T, left.T).T  # W right = left


@pytest.mark.parametrize("family", ["sd1", "sdxl", "toy"])
def test_uce_equals_per_layer_dense_solve(family, tiny_sd1, tiny_sdxl, toy):
    model = {"sd1": wrap_pipeline(tiny_sd1), "sdxl": wrap_pipeline(tiny_sdxl), "toy": toy}[family]
    forget, retain = (["red", "circle"], ["blue", "green", "square"]) if family == "toy" else (
        ["Van Gogh", "Picasso"], ["Claude Monet", "Rembrandt", "a dog"])
    edit = pure_fast.erase(model, forget, retain, method="uce", lam=0.5, erase_scale=1.0, preserve_scale=0.3,
                           progress=False)
    assert isinstance(edit, SharedRightEdit) and edit.U is not None and edit.rank == 2
    assert edit.options["lam"] == 0.5 and edit.options["preserve_scale"] == 0.3
    C_e = _last_subject_rows(model, forget)
    C_g = _last_subject_rows(model, ["", ""])
    C_p = _last_subject_rows(model, retain)
    torch.testing.assert_close(C_g[0], model.encode_tokens([""]).embeds[0, 0].double())  # '' -> BOS
    before = _snapshot(model)
    edit.apply(model)
    after = _snapshot(model)
    edit.revert(model)
    assert set(edit.target_weights()) == set(before) and len(before) == 2 * len(model.cross_attention_layers())
    for name, W0 in before.items():
        want = _dense_uce(W0.double(), C_e, C_g, C_p, 0.5, 1.0, 0.3)
        got = after[name].double()
        err = float((got - want).norm() / want.norm())
        assert err < 2e-6, (name, err)  # fp32 rounding of the stored weights and factors
        assert float((got - W0.double()).norm()) > 1e-4  # it did change
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())


def test_uce_maps_erased_token_to_guide_and_keeps_preserved(toy):
    """Erase 'red' toward '' while keeping 'blue', 'green': K/V of the 'red' token become the BOS token's."""
    edit = pure_fast.erase(toy, ["red"], ["blue", "green"], method="uce", progress=False)
    c = _last_subject_rows(toy, ["red", "", "blue", "green"]).float()
    before = _snapshot(toy)
    edit.apply(toy)
    after = _snapshot(toy)
    edit.revert(toy)
    for name, W0 in before.items():
        W1 = after[name]
        gap_before = (W0 @ c[0] - W0 @ c[1]).norm()
        to_guide = float((W1 @ c[0] - W0 @ c[1]).norm() / gap_before)
        blue = float((W1 @ c[2] - W0 @ c[2]).norm() / (W0 @ c[2]).norm())
        green = float((W1 @ c[3] - W0 @ c[3]).norm() / (W0 @ c[3]).norm())
        assert to_guide < 0.05, (name, to_guide)  # measured 0.007 (ridge-limited, λ = 0.5)
        assert blue < 0.05 and green < 0.05, (name, blue, green)  # measured < 0.01


def test_token_pairing_subject_to_end_and_per_concept_guides(tiny_sd1):
    ad = wrap_pipeline(tiny_sd1)
    enc_e = encode_phrases(ad, [Phrase("", "Van Gogh", ""), Phrase("art by ", "Picasso", " today")])
    enc_g = encode_phrases(ad, [Phrase("", "", ""), Phrase("art by ", "a b c", " today")])
    assert (enc_e.first, enc_e.last, enc_e.eos) == ([1, 3], [2, 3], [3, 5])
    assert (enc_g.first, enc_g.last, enc_g.eos) == ([0, 3], [0, 5], [1, 7])
    T = enc_e.length
    C_e, C_g = paired_tokens(enc_e, enc_g, "subject_to_end")
    # prompt 0: erase 1..T-1; pos 1,2 -> BOS (0), pos 2+k -> k; all fit; prompt 1: 3 + k -> 5 + k, trimmed at T
    n0, n1 = T - 1, (T - 1) - 2 - 3 + 1
    assert C_e.shape[0] == n0 + n1
    E, G = enc_e.embeds, enc_g.embeds
    torch.testing.assert_close(C_e[0], E[0, 1])
    torch.testing.assert_close(C_g[0], G[0, 0])
    torch.testing.assert_close(C_g[1], G[0, 0])
    torch.testing.assert_close(C_g[2], G[0, 1])  # EOS of "Van Gogh" <-> EOS of ''
    torch.testing.assert_close(C_e[n0], E[1, 3])
    torch.testing.assert_close(C_g[n0 + 2], G[1, 7])  # " today" EOS aligned
    C_e2, C_g2 = paired_tokens(enc_e, enc_g, "subject_to_eos")
    assert C_e2.shape[0] == 3 + 3
    # per-concept guides through the API: a list (one per concept) and a dict
    e1 = pure_fast.erase(ad, ["Van Gogh", "Picasso"], method="uce", guide=["art", ""], progress=False,
                         fingerprint=False)
    e2 = pure_fast.erase(ad, ["Van Gogh", "Picasso"], method="uce", guide={"Van Gogh": "art"}, progress=False,
                         fingerprint=False)
    torch.testing.assert_close(e1.U, e2.U)
    C = _last_subject_rows(ad, ["Van Gogh", "Picasso", "art", ""]).float()
    torch.testing.assert_close(e1.U, torch.stack([C[2] - C[0], C[3] - C[1]], 1))  # U = s_e (C_g - C_e)


def test_many_tokens_store_dense_A_and_still_match(tiny_sd1):
    ad = wrap_pipeline(tiny_sd1)  # d_in = 32: subject_to_end gives ~75 tokens per concept -> dense A
    edit = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], method="uce", token_mode="subject_to_end",
                           progress=False)
    assert edit.A is not None and edit.U is None and edit.inspect()["right_matrix"] == "dense"
    te = ad.encode_tokens(["Van Gogh", "", "Claude Monet"])
    C_e, C_g = te.embeds[0, 1:].double(), torch.cat([te.embeds[1, :1].expand(2, -1), te.embeds[1, 1:75]]).double()
    C_p = te.embeds[2, 1:].double()
    before = _snapshot(ad)
    edit.apply(ad)
    after = _snapshot(ad)
    edit.revert(ad)
    for name, W0 in before.items():
        want = _dense_uce(W0.double(), C_e, C_g, C_p, 0.5, 1.0, 1.0)
        assert float((after[name].double() - want).norm() / want.norm()) < 1e-5


def test_save_load_inspect_fingerprints_and_bad_files(tiny_sdxl, tmp_path):
    ad = wrap_pipeline(tiny_sdxl)
    edit = pure_fast.erase(ad, ["Van Gogh", "Monet"], ["Rembrandt"], method="uce", guide="art", progress=False)
    assert edit.base_fingerprint and edit.result_fingerprint and edit.base_fingerprint != edit.result_fingerprint
    path = str(tmp_path / "uce.safetensors")
    edit.save(path)
    e2 = load_edit(path)
    assert isinstance(e2, SharedRightEdit) and e2.meta() == edit.meta()
    assert all(torch.equal(t, e2.tensors()[k]) for k, t in edit.tensors().items())
    before = _snapshot(ad)
    e2.apply(ad)
    mid = _snapshot(ad)
    e2.revert(ad)
    edit.apply(ad)
    assert all(torch.equal(mid[k], v) for k, v in _snapshot(ad).items())  # loaded == in-memory, exactly
    edit.revert(ad)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(ad).items()) and applied_stack(ad.unet) == []
    info = e2.inspect()
    assert info["rank_max"] == 2 and info["changed_weights"] == len(before) and "rank 2" in info["details"]
    assert info["tensor_bytes"] == 2 * 64 * 2 * 4  # U, V: [64, 2] float32
    # malformed files: wrong factor shapes, missing tensors
    from safetensors.torch import save_file

    meta = json.dumps(edit.meta())
    for tensors in ({"right.U": torch.zeros(63, 2), "right.V": torch.zeros(63, 2)}, {"right.U": torch.zeros(64, 2)},
                    {"right.A": torch.zeros(64, 3)}):
        save_file(tensors, path, metadata={"pure_fast": meta})
        with pytest.raises(EditFileError):
            load_edit(path)


@pytest.mark.parametrize("kw,match", [
    ({"lam": 0}, "lam"), ({"lam": -1.0}, "lam"), ({"erase_scale": 0}, "erase_scale"),
    ({"preserve_scale": -0.1}, "preserve_scale"), ({"token_mode": "all"}, "token_mode"),
    ({"prompts": "x"}, "prompts"), ({"guide": 3}, "guide"), ({"guide": ["a"]}, "guide"),
    ({"guide": {"Nobody": "art"}}, "guide"), ({"bogus": 1}, "bogus"),
    ({"edit_keys": False, "edit_values": False}, "edit_keys"),
])
def test_bad_options_are_clear_errors(tiny_sd1, kw, match):
    before = _snapshot(tiny_sd1)
    with pytest.raises(UsageError, match=match):
        pure_fast.erase(tiny_sd1, ["Van Gogh", "Picasso"], method="uce", progress=False, **kw)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(tiny_sd1).items())


def test_anchor_prompts_mode(tiny_sd1):
    """prompts='anchors': the category templates around the concept; the guide fills the same template."""
    ad = wrap_pipeline(tiny_sd1)
    edit = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], method="uce", prompts="anchors", category="style",
                           guide="art", progress=False, fingerprint=False)
    from pure_fast.prompts import expand

    n = len(expand("Van Gogh", "style"))
    assert edit.rank == n and edit.stats["preserve_tokens"] == n and edit.options["category"] == "style"
    # "an artwork by Van Gogh" pairs its last subject token with "an artwork by art"'s last token
    e = ad.encode_tokens(["an artwork by Van Gogh", "an artwork by art"])
    i = expand("Van Gogh", "style").index("an artwork by Van Gogh")
    last = e.mask.sum(1) - 2
    torch.testing.assert_close(edit.U[:, i], (e.embeds[1, last[1]] - e.embeds[0, last[0]]).float())


def test_cli_erase_and_inspect(tiny_sd1_dir, tmp_path, capsys):
    from pure_fast.cli import main

    out = str(tmp_path / "uce.safetensors")
    rc = main(["erase", "--model", tiny_sd1_dir, "--method", "uce", "--forget", "Van Gogh", "--forget", "Picasso",
               "--retain", "Claude Monet", "--option", "lam=0.25", "--option", "guide=art", "--out", out, "--quiet"])
    assert rc == 0 and os.path.isfile(out)
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "uce" and info["kind"] == "shared_right" and info["options"]["lam"] == 0.25
    assert info["options"]["guide"] == "art" and info["rank_max"] == 2
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "uce (shared_right)" in text and "ranks     2..2" in text
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "uce", "--forget", "X", "--option", "lam=-1",
                 "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "lam=-1" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("n_e,n_p,d", [(1, 0, 48), (3, 5, 48), (20, 40, 48), (4, 8, 768)])
def test_uce_factors_woodbury_matches_dense_cholesky(n_e, n_p, d):
    """uce_factors applies M⁻¹ by Woodbury when k = n_e + n_p < d (a k x k solve); it must equal the d x d
    Cholesky solve with M = λI + s_e C_eᵀC_e + s_p C_pᵀC_p (k >= d takes that route itself)."""
    from pure_fast.methods.uce import TextTokens, uce_factors, uce_matrices

    g = torch.Generator().manual_seed(n_e * 100 + n_p)
    tok = TextTokens(C_e=torch.randn(n_e, d, generator=g, dtype=torch.float64),
                     C_g=torch.randn(n_e, d, generator=g, dtype=torch.float64),
                     C_p=torch.randn(n_p, d, generator=g, dtype=torch.float64))
    lam, s_e, s_p = 0.5, 1.0, 0.3
    U, V = uce_factors(tok, lam, s_e, s_p)
    M, B = uce_matrices(tok, lam, s_e, s_p)
    V_ref = torch.linalg.solve(M, tok.C_e.T)
    assert float((V - V_ref).norm() / V_ref.norm()) < 1e-10
    A = torch.eye(d, dtype=torch.float64) + U @ V.T
    A_ref = torch.linalg.solve(M, B.T).T  # B M^-1 (M symmetric)
    assert float((A - A_ref).norm() / A_ref.norm()) < 1e-10
