"""Writing edited models safely: new folders leave the input untouched (also on failure), --in-place writes a
revert file first and `revert` restores the weight file bit-exactly, single-file and toy outputs load back,
and in-memory stacks revert any suffix exactly."""
import copy
import hashlib
import os
import shutil

import pytest
import torch

from pure_fast.api import stamp_fingerprints
from pure_fast.cli import main
from pure_fast.edits.edit import LowRankEdit, applied_stack, kv_weights, revert_all
from pure_fast.errors import FingerprintMismatch


def _hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _lowrank(unet, family, seed, scale=0.05, ranks=(2, 1, 3)):
    """A random low-rank edit of some K/V weights, fingerprinted on ``unet``'s current weights."""
    kv = kv_weights(unet)
    names = sorted(kv)[seed % 2:: 3][: len(ranks)]
    g = torch.Generator().manual_seed(seed)
    factors = {n: (scale * torch.randn(kv[n].shape[0], r, generator=g), scale * torch.randn(r, kv[n].shape[1], generator=g))
               for n, r in zip(names, ranks)}
    e = LowRankEdit(method="test", family=family, concepts={"forget": [f"c{seed}"]}, options={}, factors=factors,
                    shapes={n: tuple(kv[n].shape) for n in names})
    stamp_fingerprints(e, unet)
    return e


@pytest.fixture(scope="module")
def model_dir(tiny_sd1_dir, tmp_path_factory):
    """A private copy (tests below rewrite it in place and must restore it)."""
    d = str(tmp_path_factory.mktemp("safety") / "model")
    shutil.copytree(tiny_sd1_dir, d)
    return d


@pytest.fixture(scope="module")
def edits(model_dir, tmp_path_factory):
    """Two chained edit files (B made on A's result) and one for other weights."""
    import pure_fast

    m = pure_fast.load_model(model_dir)
    d = tmp_path_factory.mktemp("safety_edits")
    a = _lowrank(m.unet, "sd1", 0)
    a.apply(m)
    b = _lowrank(m.unet, "sd1", 1)
    revert_all(m)
    other = copy.deepcopy(m.unet)
    with torch.no_grad():
        for p in kv_weights(other).values():
            p.add_(0.01)
    c = _lowrank(other, "sd1", 2)
    paths = {k: str(d / f"{k}.safetensors") for k in "abc"}
    for k, e in zip("abc", (a, b, c)):
        e.save(paths[k])
    return paths


def _unet_of(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)


def _expected(folder, edit_paths):
    from pure_fast.edits.io import load_edit

    unet = _unet_of(folder)
    for p in edit_paths:
        load_edit(p).apply(unet)
    return {k: v.detach().clone() for k, v in kv_weights(unet).items()}


def test_apply_new_folder_leaves_input_untouched_also_on_failures(model_dir, edits, tmp_path, capsys):
    before = _hashes(model_dir)
    out = str(tmp_path / "edited")
    assert main(["apply", "--model", model_dir, "--edit", edits["a"], "--edit", edits["b"], "--out", out, "--quiet"]) == 0
    assert _hashes(model_dir) == before
    got = kv_weights(_unet_of(out))
    want = _expected(model_dir, [edits["a"], edits["b"]])
    assert all(torch.equal(got[k], want[k]) for k in want)
    # everything but the UNet weight file is byte-identical
    after = _hashes(out)
    assert {k for k in before if before[k] != after[k]} == {os.path.join("unet", "diffusion_pytorch_model.safetensors")}
    failures = {
        "other_weights": ["apply", "--model", model_dir, "--edit", edits["c"], "--out", str(tmp_path / "o1")],
        "chain_order": ["apply", "--model", model_dir, "--edit", edits["b"], "--edit", edits["a"], "--out", str(tmp_path / "o2")],
        "out_inside": ["apply", "--model", model_dir, "--edit", edits["a"], "--out", os.path.join(model_dir, "x")],
        "out_exists": ["apply", "--model", model_dir, "--edit", edits["a"], "--out", out],
        "no_out": ["apply", "--model", model_dir, "--edit", edits["a"]],
        "in_place_and_out": ["apply", "--model", model_dir, "--edit", edits["a"], "--in-place", "--out", str(tmp_path / "o3")],
        "missing_edit": ["apply", "--model", model_dir, "--edit", str(tmp_path / "nope.safetensors"), "--in-place"],
        "in_place_other_weights": ["apply", "--model", model_dir, "--edit", edits["c"], "--in-place"],
        "single_file_not_st": ["apply", "--model", model_dir, "--edit", edits["a"], "--format", "single-file",
                               "--out", str(tmp_path / "x.ckpt")],
    }
    for name, argv in failures.items():
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc in (1, 2), name
        assert err.startswith("pure-fast: error:") and len(err.splitlines()) == 1, (name, err)
        assert _hashes(model_dir) == before, name
    assert sorted(os.listdir(tmp_path)) == ["edited"]  # no partial outputs, no temp folders
    assert not [f for f in os.listdir(os.path.dirname(model_dir)) if f.startswith(".tmp")]


def test_in_place_writes_revert_file_and_revert_is_bit_exact(model_dir, edits, capsys):
    wfile = os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors")
    before = _hashes(model_dir)
    orig = {k: v.detach().clone() for k, v in kv_weights(_unet_of(model_dir)).items()}
    want = _expected(model_dir, [edits["a"]])
    assert main(["apply", "--model", model_dir, "--edit", edits["a"], "--in-place", "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    rf = rep["revert_file"]
    assert os.path.isfile(rf) and os.path.dirname(rf) == os.path.dirname(wfile)
    after = _hashes(model_dir)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {os.path.relpath(wfile, model_dir), os.path.relpath(rf, model_dir)}
    got = kv_weights(_unet_of(model_dir))  # the revert file is never mistaken for weights
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the revert file holds exactly the original tensors of the changed weights
    from safetensors.torch import load_file

    saved = load_file(rf)
    from pure_fast.edits.io import load_edit

    rel = os.path.relpath(wfile, model_dir)
    assert set(saved) == {f"{rel}::{n}" for n in load_edit(edits["a"]).target_weights()}
    saved = {k.split("::", 1)[1]: v for k, v in saved.items()}
    assert all(torch.equal(saved[k], orig[k]) and not torch.equal(saved[k], want[k]) for k in saved)
    assert main(["revert", "--model", model_dir, "--revert-file", rf, "--quiet"]) == 0
    assert _hashes(model_dir) == before and not os.path.exists(rf)


def test_in_place_stack_must_be_reverted_last_first(model_dir, edits, tmp_path, capsys):
    before = _hashes(model_dir)
    ra, rb = str(tmp_path / "ra.safetensors"), str(tmp_path / "rb.safetensors")
    assert main(["apply", "--model", model_dir, "--edit", edits["a"], "--in-place", "--revert-file", ra, "--quiet"]) == 0
    # B was made on A's result: the folder now has A's weights, so B applies (fingerprint of the weights)
    assert main(["apply", "--model", model_dir, "--edit", edits["b"], "--in-place", "--revert-file", rb, "--quiet"]) == 0
    want = _hashes(model_dir)
    capsys.readouterr()
    assert main(["revert", "--model", model_dir, "--revert-file", ra]) == 1
    assert "changed after this edit" in capsys.readouterr().err
    assert _hashes(model_dir) == want
    assert main(["revert", "--model", model_dir, "--revert-file", rb, "--keep", "--quiet"]) == 0
    assert os.path.exists(rb)
    assert main(["revert", "--model", model_dir, "--revert-file", rb]) == 1  # already restored
    assert "already holds the original" in capsys.readouterr().err
    os.unlink(rb)
    assert main(["revert", "--model", model_dir, "--revert-file", ra, "--quiet"]) == 0
    assert _hashes(model_dir) == before


def test_revert_refuses_a_tampered_or_foreign_file(model_dir, edits, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    before = _hashes(model_dir)
    rf = str(tmp_path / "r.safetensors")
    assert main(["apply", "--model", model_dir, "--edit", edits["a"], "--in-place", "--revert-file", rf, "--quiet"]) == 0
    edited = _hashes(model_dir)
    from safetensors import safe_open

    with safe_open(rf, "pt") as f:
        meta = f.metadata()
    t = load_file(rf)
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[0] += 1.0
    bad = str(tmp_path / "bad.safetensors")
    save_file(t, bad, metadata=meta)
    assert main(["revert", "--model", model_dir, "--revert-file", bad]) == 1
    assert "does not match its recorded digest" in capsys.readouterr().err
    assert main(["revert", "--model", model_dir, "--revert-file", edits["a"]]) == 1  # an edit file, not a revert file
    assert "not a pure_fast revert file" in capsys.readouterr().err
    assert _hashes(model_dir) == edited
    assert main(["revert", "--model", model_dir, "--revert-file", rf, "--quiet"]) == 0
    assert _hashes(model_dir) == before


def test_single_file_output_round_trips_through_from_single_file(model_dir, edits, tmp_path):
    from diffusers import StableDiffusionPipeline

    before = _hashes(model_dir)
    out = str(tmp_path / "edited.safetensors")
    assert main(["apply", "--model", model_dir, "--edit", edits["a"], "--edit", edits["b"], "--format", "single-file",
                 "--out", out, "--quiet"]) == 0
    assert _hashes(model_dir) == before
    back = StableDiffusionPipeline.from_single_file(out, config=model_dir, local_files_only=True, safety_checker=None)
    orig = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None)
    want = _expected(model_dir, [edits["a"], edits["b"]])
    sb, so = back.unet.state_dict(), orig.unet.state_dict()
    for k in so:
        assert torch.equal(sb[k], want[k] if k in want else so[k]), k
    for comp in ("vae", "text_encoder"):
        a, b = getattr(orig, comp).state_dict(), getattr(back, comp).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("position_ids"))


def test_activation_patch_and_toy_single_file_refused(model_dir, tmp_path, capsys):
    from pure_fast.edits.patch import ConceptPatch, PatchEdit

    unet = _unet_of(model_dir)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    d, d_in = kv_weights(unet)[layer + ".to_k.weight"].shape
    V = torch.linalg.qr(torch.randn(d, 2))[0]
    p = PatchEdit(method="acterase", family="sd1", concepts={"forget": ["x"]}, options={},
                  patches={layer: [ConceptPatch(V, torch.zeros(2), torch.ones(2))]}, shapes={layer: (d, d_in)})
    path = str(tmp_path / "patch.safetensors")
    p.save(path)
    before = _hashes(model_dir)
    assert main(["apply", "--model", model_dir, "--edit", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "activation patch" in err and len(err.strip().splitlines()) == 1
    assert main(["apply", "--model", "toy", "--edit", path, "--format", "single-file",
                 "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "single-file" in capsys.readouterr().err
    assert _hashes(model_dir) == before and not os.path.exists(tmp_path / "o")


def test_toy_apply_writes_a_loadable_toy_folder(tmp_path):
    """``--model toy`` writes config.json + unet.safetensors that load_toy(weights_dir=...) reads back."""
    import pure_fast
    from pure_fast.adapters.toy import load_toy
    from pure_fast.export.checkpoint import toy_weights_dir

    shipped = _hashes(toy_weights_dir())
    m = pure_fast.load_model("toy")
    e = _lowrank(m.unet, "toy", 3)
    path = str(tmp_path / "toy_edit.safetensors")
    e.save(path)
    out = str(tmp_path / "toy_edited")
    assert main(["apply", "--model", "toy", "--edit", path, "--out", out, "--quiet"]) == 0
    assert _hashes(toy_weights_dir()) == shipped
    back = load_toy(weights_dir=out)
    via_cli_loader = pure_fast.load_model(out)  # every command takes the folder as --model
    assert via_cli_loader.family == "toy" and torch.equal(
        next(iter(kv_weights(via_cli_loader.unet).values())), next(iter(kv_weights(back.unet).values())))
    e.apply(m)
    got, want = kv_weights(back.unet), kv_weights(m.unet)
    # the shipped file stores float16: the written weights are the applied ones rounded to float16
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)
    # a toy weights folder is a model path: in place + revert work on it too
    before = _hashes(out)
    e2 = _lowrank(back.unet, "toy", 4)
    p2 = str(tmp_path / "toy_edit2.safetensors")
    e2.save(p2)
    rf = str(tmp_path / "toy_revert.safetensors")
    assert main(["apply", "--model", out, "--edit", p2, "--in-place", "--revert-file", rf, "--quiet"]) == 0
    assert _hashes(out) != before
    assert main(["revert", "--model", out, "--revert-file", rf, "--quiet"]) == 0
    assert _hashes(out) == before


def test_in_memory_stack_of_every_kind_reverts_any_suffix_bit_exactly(tiny_sd1):
    """PURE-like low-rank, UCE-like shared, SPACE-like CSR, ActErase-like patch, low-rank again: each made on
    the previous result; revert_all(model, n) gives back each earlier state bit-exactly."""
    from test_combine import _make_patch, make_shared, make_sparse

    from pure_fast.edits.patch import installed_hooks

    unet = copy.deepcopy(tiny_sd1.unet)
    names = [l for l in sorted({k.rsplit(".", 2)[0] for k in kv_weights(unet)})][:2]
    makers = [lambda u: _lowrank(u, "sd1", 5), lambda u: make_shared(u, 6), lambda u: make_sparse(u, 7),
              lambda u: _make_patch(u, 8, names), lambda u: _lowrank(u, "sd1", 9)]
    states, stack = [_state(unet)], []
    for m in makers:
        e = m(unet)
        e.apply(unet)
        stack.append(e)
        states.append(_state(unet))
    assert [e.kind for e in stack] == ["lowrank", "shared_right", "csr_weights", "patch", "lowrank"]
    assert len(installed_hooks(unet)) == 1
    # an edit made for other weights is refused, nothing changes
    stray = _lowrank(copy.deepcopy(tiny_sd1.unet), "sd1", 10)
    with pytest.raises(FingerprintMismatch):
        stray.apply(unet)
    assert len(applied_stack(unet)) == 5 and _same(_state(unet), states[5])
    with pytest.raises(Exception, match="not the last one applied"):
        stack[1].revert(unet)
    for n in range(1, 5):
        assert revert_all(unet, 1) == 1
        assert _same(_state(unet), states[5 - n])
        assert len(installed_hooks(unet)) == (1 if 5 - n > 3 else 0)
    stack[1].apply(unet)  # re-applying on the chain after a partial revert
    assert _same(_state(unet), states[2])
    assert revert_all(unet) == 2 and _same(_state(unet), states[0]) and not applied_stack(unet)


def _state(unet):
    return {k: v.detach().clone() for k, v in kv_weights(unet).items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_weight_variants_are_all_written_and_restored(model_dir, edits, tmp_path):
    """A folder with an fp16 variant beside the fp32 weights: both files get the edit (each in its dtype),
    and revert restores both bit-exactly."""
    d = str(tmp_path / "variants")
    shutil.copytree(model_dir, d)
    _unet_of(d).to(torch.float16).save_pretrained(os.path.join(d, "unet"), variant="fp16")
    before = _hashes(d)
    assert main(["apply", "--model", d, "--edit", edits["a"], "--out", str(tmp_path / "copy"), "--quiet"]) == 0
    rf = str(tmp_path / "r.safetensors")
    assert main(["apply", "--model", d, "--edit", edits["a"], "--in-place", "--revert-file", rf, "--quiet"]) == 0
    from diffusers import UNet2DConditionModel

    want = _expected(model_dir, [edits["a"]])
    for folder in (d, str(tmp_path / "copy")):
        u16 = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant="fp16", local_files_only=True)
        u32 = _unet_of(folder)
        g16, g32 = kv_weights(u16), kv_weights(u32)
        assert all(torch.equal(g32[k], want[k]) and torch.equal(g16[k], want[k].half()) for k in want)
    assert main(["revert", "--model", d, "--revert-file", rf, "--quiet"]) == 0
    assert _hashes(d) == before


def test_in_place_failure_while_replacing_leaves_folder_and_no_revert_file(model_dir, edits, tmp_path, monkeypatch, capsys):
    """The second weight file fails to be replaced: the first is put back, the revert file removed."""
    from pure_fast.export import checkpoint

    d = str(tmp_path / "variants")
    shutil.copytree(model_dir, d)
    _unet_of(d).to(torch.float16).save_pretrained(os.path.join(d, "unet"), variant="fp16")
    before = _hashes(d)
    real, calls = checkpoint._patch_atomically, []

    def flaky(path, data, entries):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, data, entries)

    monkeypatch.setattr(checkpoint, "_patch_atomically", flaky)
    rf = str(tmp_path / "r.safetensors")
    assert main(["apply", "--model", d, "--edit", edits["a"], "--in-place", "--revert-file", rf]) == 1
    assert "No space left" in capsys.readouterr().err
    assert _hashes(d) == before and not os.path.exists(rf) and len(calls) == 3  # 2 files tried, 1 put back


def test_bench_swap_edits_verify_on_a_tiny_unet(tiny_sd1, monkeypatch):
    """bench/bench_swap.py's edits of every kind pass its own verification (apply ≤ 1 ulp of the formula,
    bit-exact revert) on a tiny UNet, and a broken revert would be caught."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_swap.py"
    spec = importlib.util.spec_from_file_location("bench_swap_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    unet = copy.deepcopy(tiny_sd1.unet)
    edits = mod._build_edits(unet, "sd1")
    assert set(edits) == {"lowrank", "shared_right", "csr_weights", "patch"}
    for e in edits.values():
        assert "revert bit-exact" in mod._verify(e, unet)
    e = edits["lowrank"]
    real_revert = type(e).revert

    def sloppy_revert(self, model):
        real_revert(self, model)
        with torch.no_grad():
            next(iter(kv_weights(model).values())).add_(1e-3)

    monkeypatch.setattr(type(e), "revert", sloppy_revert)
    with pytest.raises(AssertionError, match="not bit-exact"):
        mod._verify(e, unet)
