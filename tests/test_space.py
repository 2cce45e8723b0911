"""SPACE: μ = 0 is UCE, optimality (subgradient) conditions, sparsity vs μ, CSR edit files, effect, errors."""
import json
import os

import pytest
import torch

import pure_fast
from pure_fast.adapters import wrap_pipeline
from pure_fast.edits.edit import kv_weights
from pure_fast.edits.io import load_edit
from pure_fast.edits.sparse import SparseWeightsEdit
from pure_fast.errors import EditFileError, UsageError
from pure_fast.methods.space import SpaceOptions, space_solve
from pure_fast.methods.uce import UCEOptions, uce_factors, uce_matrices, uce_tokens

FORGET, RETAIN = ["Van Gogh", "Picasso"], ["Claude Monet", "Rembrandt"]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in kv_weights(model.unet).items()}


def _problem(adapter, forget=FORGET, retain=RETAIN, **kw):
    opts = UCEOptions(**kw)
    tok = uce_tokens(adapter, forget, retain, None, None, opts)
    s_p = max(0.1, 1 / len(retain)) if retain else 0.0
    M, B = uce_matrices(tok, opts.lam, opts.erase_scale, s_p)
    return tok, M, B, s_p


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny (32-384 wide): one intra-op thread avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy():
    return pure_fast.load_model("toy")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_mu_zero_reproduces_uce(family, tiny_sd1, tiny_sdxl):
    ad = wrap_pipeline({"sd1": tiny_sd1, "sdxl": tiny_sdxl}[family])
    tok, M, B, s_p = _problem(ad)
    W = {k: v.detach() for k, v in kv_weights(ad.unet).items()}
    U, V = uce_factors(tok, 0.5, 1.0, s_p)
    A = torch.eye(M.shape[0], dtype=torch.float64) + U @ V.T
    # FISTA from W0 (the paper's start), float64: converges to UCE's W0 A
    opts = SpaceOptions(mu=0.0, precision="float64", warm_start="original", max_iter=20000, tol=1e-13,
                        history_every=0)
    out, stats = space_solve(W, M, B, opts, progress=False)
    assert all(s["converged"] for s in stats)
    for n, w in W.items():
        want = w.double() @ A
        assert float((out[n] - want).norm() / want.norm()) < 1e-9, n
    # through the API (warm start at UCE: optimal at once), stored as float32 CSR = the UCE edit's weights
    sp = pure_fast.erase(ad, FORGET, RETAIN, method="space", mu=0, storage_dtype="float32", progress=False)
    uce = pure_fast.erase(ad, FORGET, RETAIN, method="uce", progress=False)
    assert sp.stats["iterations"] == 1 and sp.stats["zero_fraction"] == 0.0
    uce.apply(ad)
    after_uce = _snapshot(ad)
    uce.revert(ad)
    sp.apply(ad)
    after_sp = _snapshot(ad)
    sp.revert(ad)
    for n in after_uce:
        torch.testing.assert_close(after_sp[n], after_uce[n], rtol=2e-6, atol=1e-6)


def test_subgradient_optimality_at_convergence(tiny_sd1):
    """At the minimiser of tr(WMWᵀ) - 2tr(WNᵀ) + μ|W|₁: G = 2(WM - N) = -μ sign(W) where W ≠ 0, |G| <= μ where
    W = 0 (float64, tight tolerance)."""
    ad = wrap_pipeline(tiny_sd1)
    _, M, B, _ = _problem(ad)
    W = {k: v.detach() for k, v in list(kv_weights(ad.unet).items())[:4]}
    mu = 0.05
    opts = SpaceOptions(mu=mu, precision="float64", warm_start="original", max_iter=20000, tol=1e-12,
                        history_every=0)
    out, stats = space_solve(W, M, B, opts, progress=False)
    assert all(s["converged"] for s in stats)
    zeros = nonzeros = 0
    for n, w0 in W.items():
        Wn = out[n]
        G = 2 * (Wn @ M - w0.double() @ B)
        nz = Wn != 0
        assert float((G[nz] + mu * torch.sign(Wn[nz])).abs().max()) < 1e-8 * mu * 100
        assert float(G[~nz].abs().max()) <= mu * (1 + 1e-8)
        zeros += int((~nz).sum())
        nonzeros += int(nz.sum())
    assert zeros > 0.1 * (zeros + nonzeros) and nonzeros > 0.1 * (zeros + nonzeros)
    # the per-iteration history: objective F(W_k) and zero fraction, the last objective near the minimum
    short, hist = space_solve(W, M, B, SpaceOptions(mu=mu, precision="float64", warm_start="original",
                                                    max_iter=300, tol=1e-12, history_every=1),
                              progress=False)
    f_star = sum(float((w * (w @ M)).sum() - 2 * (w * (W[n].double() @ B)).sum() + mu * w.abs().sum())
                 for n, w in out.items())
    for s in hist:
        assert len(s["objective"]) == s["iterations"] == len(s["sparsity"]) == 300
        assert s["history_iterations"] == list(range(1, 301))
    f_300 = sum(s["objective"][-1] for s in hist)
    assert f_star <= f_300 + 1e-9 * abs(f_star) and (f_300 - f_star) < 1e-3 * abs(f_star)


def test_sparsity_grows_with_mu(tiny_sdxl):
    ad = wrap_pipeline(tiny_sdxl)
    zf = []
    for mu in (0.005, 0.05, 0.3):
        e = pure_fast.erase(ad, FORGET, RETAIN, method="space", mu=mu, max_iter=60, progress=False,
                            fingerprint=False)
        assert isinstance(e, SparseWeightsEdit) and e.options["mu"] == mu
        zf.append(e.stats["zero_fraction"])
        assert {tuple(s["shape"]) for s in e.stats["fista"]} == {(32, 64), (64, 64)}
    assert all(a < b for a, b in zip(zf, zf[1:])), zf
    assert zf[0] < 0.2 and zf[-1] > 0.8, zf


def test_csr_edit_round_trip_apply_revert_inspect(tiny_sd1, tmp_path):
    ad = wrap_pipeline(tiny_sd1)
    edit = pure_fast.erase(ad, FORGET, RETAIN, method="space", mu=0.1, max_iter=100, progress=False)
    assert edit.base_fingerprint and edit.result_fingerprint != edit.base_fingerprint
    path = str(tmp_path / "space.safetensors")
    edit.save(path)
    e2 = load_edit(path)
    assert isinstance(e2, SparseWeightsEdit) and e2.meta() == edit.meta()
    t1, t2 = edit.tensors(), e2.tensors()
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) and t1[k].dtype == t2[k].dtype for k in t1)
    assert all(p[1].dtype == torch.int16 and p[2].dtype == torch.float16 for p in e2.csr.values())
    before = _snapshot(ad)
    e2.apply(ad)
    after = _snapshot(ad)
    for n, (indptr, indices, values) in e2.csr.items():
        dense = torch.zeros(e2.shapes[n], dtype=torch.float16)
        rows = torch.repeat_interleave(torch.arange(e2.shapes[n][0]), indptr[1:] - indptr[:-1])
        dense[rows, indices.long()] = values
        assert torch.equal(after[n], dense.float())  # the weight IS the stored sparse matrix
    e2.revert(ad)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(ad).items())
    info = e2.inspect()
    total = sum(r * c for r, c in e2.shapes.values())
    assert info["nnz"] == sum(int(p[2].numel()) for p in e2.csr.values())
    assert abs(info["zero_fraction"] - (1 - info["nnz"] / total)) < 1e-12 and info["zero_fraction"] > 0.3
    assert info["dense_fp16_bytes"] == 2 * total
    assert info["tensor_bytes"] == info["nnz"] * 4 + sum(8 * (r + 1) for r, _ in e2.shapes.values())
    assert "% zeros" in info["details"]


@pytest.mark.parametrize("mutate", ["index_out_of_range", "indptr_decreasing", "indptr_end", "unsorted",
                                    "float_indices", "missing_values", "extra", "2d_values"])
def test_malformed_csr_files_are_refused(tiny_sd1, tmp_path, mutate):
    from safetensors.torch import save_file

    ad = wrap_pipeline(tiny_sd1)
    edit = pure_fast.erase(ad, ["Van Gogh"], [], method="space", mu=0.1, max_iter=20, progress=False,
                           fingerprint=False)
    t = {k: v.clone() for k, v in edit.tensors().items()}
    name = next(iter(edit.csr))
    ip, ix, va = f"{name}.indptr", f"{name}.indices", f"{name}.values"
    if mutate == "index_out_of_range":
        t[ix][0] = 32
    elif mutate == "indptr_decreasing":
        t[ip][1], t[ip][2] = t[ip][2] + 1, t[ip][2]
    elif mutate == "indptr_end":
        t[ip][-1] += 1
    elif mutate == "unsorted":
        counts = t[ip][1:] - t[ip][:-1]
        k = int(t[ip][int(torch.nonzero(counts >= 2)[0])])  # a row with two entries: swap them
        t[ix][k], t[ix][k + 1] = t[ix][k + 1].clone(), t[ix][k].clone()
    elif mutate == "float_indices":
        t[ix] = t[ix].float()
    elif mutate == "missing_values":
        del t[va]
    elif mutate == "extra":
        t["junk"] = torch.zeros(1)
    elif mutate == "2d_values":
        t[va] = t[va][:-(t[va].numel() % 2) or None].reshape(2, -1)
    path = str(tmp_path / "bad.safetensors")
    save_file(t, path, metadata={"pure_fast": json.dumps(edit.meta())})
    with pytest.raises(EditFileError):
        load_edit(path)


def test_space_effect_on_toy(toy):
    """Erase 'red' toward '' (retain 'blue', 'green') with 34 % zeros: red's K/V go to the BOS token's, blue's stay."""
    e = pure_fast.erase(toy, ["red"], ["blue", "green"], method="space", mu=0.02, max_iter=150,
                        storage_dtype="float32", history_every=0, progress=False)
    assert 0.25 < e.stats["zero_fraction"] < 0.5  # measured 0.344
    te = toy.encode_tokens(["red", "", "blue"])
    red, bos, blue = te.embeds[0, 1], te.embeds[1, 0], te.embeds[2, 1]
    before = _snapshot(toy)
    e.apply(toy)
    after = _snapshot(toy)
    e.revert(toy)
    for n, W0 in before.items():
        W1 = after[n]
        assert float((W1 @ red - W0 @ bos).norm() / (W0 @ red - W0 @ bos).norm()) < 0.05  # measured <= 0.009
        assert float((W1 @ blue - W0 @ blue).norm() / (W0 @ blue).norm()) < 0.05  # measured <= 0.015


@pytest.mark.parametrize("kw,match", [
    ({"mu": -1.0}, "mu=-1.0"), ({"mu": float("nan")}, "mu="), ({"max_iter": 0}, "max_iter=0"),
    ({"max_iter": 2.5}, "max_iter=2.5"), ({"tol": 0}, "tol=0"), ({"warm_start": "x"}, "warm_start"),
    ({"precision": "half"}, "precision"), ({"storage_dtype": "int8"}, "storage_dtype"),
    ({"history_every": -1}, "history_every"), ({"lam": 0}, "lam"),
])
def test_bad_options_are_clear_errors(tiny_sd1, kw, match):
    before = _snapshot(tiny_sd1)
    with pytest.raises(UsageError, match=match):
        pure_fast.erase(tiny_sd1, ["Van Gogh"], method="space", progress=False, **kw)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(tiny_sd1).items())


def test_cli_erase_inspect(tiny_sd1_dir, tmp_path, capsys):
    from pure_fast.cli import main

    out = str(tmp_path / "space.safetensors")
    rc = main(["erase", "--model", tiny_sd1_dir, "--method", "space", "--forget", "Van Gogh", "--retain",
               "Claude Monet", "--option", "mu=0.1", "--option", "max_iter=50", "--out", out, "--quiet"])
    assert rc == 0 and os.path.isfile(out)
    capsys.readouterr()
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "space (csr_weights)" in text and "% zeros" in text and "of dense fp16" in text
    assert main(["inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["options"]["mu"] == 0.1 and info["stats"]["fista"][0]["iterations"] <= 50
    fista = info["stats"]["fista"][0]
    assert fista["history_iterations"][0] == 1 and fista["history_iterations"][-1] == fista["iterations"]
    assert all(b - a <= 10 for a, b in zip(fista["history_iterations"], fista["history_iterations"][1:]))
    assert len(fista["objective"]) == len(fista["sparsity"]) == len(fista["history_iterations"])
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "space", "--forget", "X", "--option", "mu=-1",
                 "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "mu=-1" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad.safetensors")
