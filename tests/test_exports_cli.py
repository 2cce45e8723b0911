"""`pure-fast export` for every weight-changing edit kind: LoRA files loaded by diffusers (load_lora_weights +
fuse_lora) and UNet state dicts reproduce Edit.apply; kinds that need the model or a rank say so in one line."""
import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from pure_fast.cli import main
from pure_fast.edits.edit import kv_weights

from test_combine import make_lowrank, make_shared, make_sparse  # noqa: E402  (same edit factories)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True, safety_checker=None)


@pytest.fixture(scope="module")
def edit_files(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("export_edits")
    u = copy.deepcopy(pipe.unet)
    edits = {"lowrank": make_lowrank(u, 1), "shared": make_shared(u, 2, r=3), "shared_dense": make_shared(u, 3, r=2, dense=True),
             "sparse": make_sparse(u, 4)}
    paths = {}
    for k, e in edits.items():
        paths[k] = str(d / f"{k}.safetensors")
        e.save(paths[k])
    return paths


def _applied(pipe, path):
    from pure_fast.edits.io import load_edit

    unet = copy.deepcopy(pipe.unet)
    load_edit(path).apply(unet)
    return {k: v.detach().clone() for k, v in kv_weights(unet).items()}


def _fused(pipe, path):
    p = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        p.load_lora_weights(path)
    p.fuse_lora()
    return {k: v.detach().clone() for k, v in kv_weights(p.unet).items()}


def _max_err(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out.strip(), cap.err.strip()


@pytest.mark.parametrize("kind,fmt,with_model", [
    ("lowrank", "lora-diffusers", False), ("lowrank", "lora-kohya", False),
    ("shared", "lora-diffusers", True), ("shared", "lora-kohya", True),
])
def test_exact_lora_exports_fuse_to_apply(pipe, tiny_sd1_dir, edit_files, tmp_path, capsys, kind, fmt, with_model):
    out = str(tmp_path / "l.safetensors")
    argv = ["export", "--edit", edit_files[kind], "--format", fmt, "--out", out, "--json"]
    if with_model:
        argv += ["--model", tiny_sd1_dir]
    rc, so, err = _run(argv, capsys)
    assert rc == 0, err
    rep = json.loads(so)
    assert rep["exact"] and rep["rel_error"] == 0.0
    if kind == "shared":
        assert rep["rank_min"] == rep["rank_max"] == 3  # ΔW = (W U) Vᵀ, rank of U, no truncation
    assert _max_err(_fused(pipe, out), _applied(pipe, edit_files[kind])) <= 1e-5
    sd = load_file(out)
    if fmt == "lora-kohya":
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    else:
        assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)


def test_shared_export_needs_the_model(edit_files, tmp_path, capsys):
    out = str(tmp_path / "l.safetensors")
    rc, _, err = _run(["export", "--edit", edit_files["shared"], "--format", "lora-diffusers", "--out", out], capsys)
    assert rc == 2 and "--model" in err and len(err.splitlines()) == 1 and not os.path.exists(out)


@pytest.mark.parametrize("kind", ["sparse", "shared_dense"])
def test_full_rank_kinds_need_rank_and_report_the_truncation_error(pipe, tiny_sd1_dir, edit_files, tmp_path, capsys, kind):
    out = str(tmp_path / "l.safetensors")
    base = ["export", "--edit", edit_files[kind], "--model", tiny_sd1_dir, "--format", "lora-diffusers", "--out", out]
    rc, _, err = _run(base, capsys)
    assert rc == 2 and "--rank" in err and not os.path.exists(out)
    # a truncated export: the printed error is the SVD tail of ΔW, computed here independently
    rc, so, err = _run(base + ["--rank", "4"], capsys)
    assert rc == 0, err
    assert "truncated: relative error" in so
    from pure_fast.edits.io import load_edit

    e = load_edit(edit_files[kind])
    kv = kv_weights(pipe.unet)
    dropped = total = 0.0
    for n in e.target_weights():
        d = e.delta(n, kv[n])
        s = torch.linalg.svdvals(d)
        dropped += float(s[4:].pow(2).sum())
        total += float(s.pow(2).sum())
    assert f"{(dropped / total) ** 0.5:.3e}" in so
    # full rank: the LoRA is the exact ΔW
    rc, so, err = _run(base[:-1] + [str(tmp_path / "full.safetensors"), "--rank", "64", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(so)["rel_error"] < 1e-12
    assert _max_err(_fused(pipe, str(tmp_path / "full.safetensors")), _applied(pipe, edit_files[kind])) <= 1e-5


@pytest.mark.parametrize("kind", ["lowrank", "shared", "sparse"])
def test_unet_state_dict_reproduces_apply(pipe, tiny_sd1_dir, edit_files, tmp_path, capsys, kind):
    out = str(tmp_path / "u.safetensors")
    rc, so, err = _run(["export", "--edit", edit_files[kind], "--model", tiny_sd1_dir, "--format", "unet-state-dict",
                        "--out", out], capsys)
    assert rc == 0, err
    sd = load_file(out)
    unet = copy.deepcopy(pipe.unet)
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    assert not unexpected
    got, want = kv_weights(unet), _applied(pipe, edit_files[kind])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_export_refusals_are_one_line(pipe, tiny_sd1_dir, edit_files, tmp_path, capsys):
    from pure_fast.edits.patch import ConceptPatch, PatchEdit

    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    d, d_in = kv_weights(pipe.unet)[layer + ".to_k.weight"].shape
    p = PatchEdit(method="acterase", family="sd1", concepts={"forget": ["x"]}, options={},
                  patches={layer: [ConceptPatch(torch.linalg.qr(torch.randn(d, 2))[0].contiguous(), torch.zeros(2), torch.ones(2))]},
                  shapes={layer: (d, d_in)})
    patch = str(tmp_path / "patch.safetensors")
    p.save(patch)
    out = str(tmp_path / "o.safetensors")
    cases = {
        "patch": (["export", "--edit", patch, "--model", tiny_sd1_dir, "--format", "lora-kohya", "--out", out], "activation"),
        "sd_needs_model": (["export", "--edit", edit_files["lowrank"], "--format", "unet-state-dict", "--out", out], "--model"),
        "ldm_names_need_model": (["export", "--edit", edit_files["lowrank"], "--format", "lora-kohya", "--kohya-names", "ldm",
                                  "--out", out], "--model"),
        "bad_rank": (["export", "--edit", edit_files["lowrank"], "--format", "lora-kohya", "--rank", "0", "--out", out], "--rank"),
        "bad_dtype": (["export", "--edit", edit_files["lowrank"], "--format", "lora-kohya", "--dtype", "int4", "--out", out], "dtype"),
        "not_st": (["export", "--edit", edit_files["lowrank"], "--format", "lora-kohya", "--out", str(tmp_path / "x.bin")], ".safetensors"),
        "out_in_model": (["export", "--edit", edit_files["lowrank"], "--model", tiny_sd1_dir, "--format", "lora-kohya",
                          "--out", os.path.join(tiny_sd1_dir, "x.safetensors")], "inside"),
        "other_model": (["export", "--edit", edit_files["shared"], "--model", "toy", "--format", "lora-kohya", "--out", out], "model"),
    }
    for name, (argv, needle) in cases.items():
        rc, _, err = _run(argv, capsys)
        assert rc in (1, 2), name
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert not os.path.exists(out), name
    assert not os.path.exists(os.path.join(tiny_sd1_dir, "x.safetensors"))


@pytest.mark.parametrize("method,extra", [("uce", []), ("cure", []),
                                          pytest.param("space", ["--rank", "64"], marks=pytest.mark.slow)])
def test_real_method_edits_export_to_lora(pipe, tiny_sd1_dir, tmp_path, capsys, method, extra):
    """Edits computed by the methods themselves (not hand-built): their LoRA fuses to what apply gives."""
    import pure_fast

    edit = pure_fast.erase(pipe, forget=["Van Gogh"], retain=["Claude Monet"], method=method, category="style",
                           progress=False)
    path = str(tmp_path / f"{method}.safetensors")
    edit.save(path)
    out = str(tmp_path / "l.safetensors")
    rc, so, err = _run(["export", "--edit", path, "--model", tiny_sd1_dir, "--format", "lora-kohya", "--out", out,
                        "--json", *extra], capsys)
    assert rc == 0, err
    rep = json.loads(so)
    assert rep["exact"] == (method != "space") and rep["rel_error"] < 1e-12
    assert _max_err(_fused(pipe, out), _applied(pipe, path)) <= 1e-5
