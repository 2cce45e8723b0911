"""Text-space methods touch only what they use: text encoder(s) + K/V tensors read from the files.

The text-only adapter (``adapters/text_only.py``) must give exactly what the full pipeline gives: the same
token embeddings, the same layers, the same K/V tensors (dtype included), hence bit-identical UCE / CURE /
SPACE edits, the same fingerprints, the same exports; for diffusers folders (one file or shards) and
single-file checkpoints; and a text-space erase on a diffusers folder never imports diffusers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from pure_fast import api
from pure_fast.adapters import load_model
from pure_fast.adapters.kv_files import attn2_layers
from pure_fast.edits.edit import kv_weights

PROMPTS = ["Van Gogh", "a painting of a cat by Claude Monet", "", "x " * 90]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd1_dir):
    """Tiny SD1 / SDXL folders, an SD1 folder with a sharded UNet, float16 single files (SD1, SDXL)."""
    from pure_fast.export.single_file import save_single_file
    from pure_fast.testing import build_tiny_pipeline, build_tiny_sdxl_distinct_widths

    d = tmp_path_factory.mktemp("text_only")
    out = {"sd1": (tiny_sd1_dir, None)}
    sdxl = build_tiny_sdxl_distinct_widths()
    sdxl.save_pretrained(str(d / "sdxl"), safe_serialization=True)
    out["sdxl"] = (str(d / "sdxl"), None)
    sd1 = build_tiny_pipeline("sd1")
    save_single_file(sd1, str(d / "sd1_fp16.safetensors"), dtype=torch.float16)
    out["sd1_single"] = (str(d / "sd1_fp16.safetensors"), tiny_sd1_dir)
    save_single_file(sdxl, str(d / "sdxl_fp16.safetensors"), dtype=torch.float16)
    out["sdxl_single"] = (str(d / "sdxl_fp16.safetensors"), str(d / "sdxl"))
    shutil.copytree(tiny_sd1_dir, d / "sd1_sharded")
    shutil.rmtree(d / "sd1_sharded" / "unet")
    sd1.unet.save_pretrained(str(d / "sd1_sharded" / "unet"), safe_serialization=True, max_shard_size="100KB")
    assert os.path.isfile(d / "sd1_sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json")
    out["sd1_sharded"] = (str(d / "sd1_sharded"), None)
    return out


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_layer_names_order_and_heads_follow_the_unet_config(arch):
    from pure_fast.adapters.layers import find_cross_attention_layers
    from pure_fast.testing import build_unet_architecture

    unet = build_unet_architecture(arch, device="meta")
    assert attn2_layers(dict(unet.config)) == [(l.name, l.heads) for l in find_cross_attention_layers(unet)]


@pytest.mark.parametrize("which,dtype", [("sd1", None), ("sdxl", None), ("sd1_single", None), ("sdxl_single", None),
                                         ("sd1_sharded", None), ("sdxl", "bfloat16"), ("sd1_single", "bfloat16")])
def test_embeddings_layers_and_kv_equal_the_full_pipeline(models, which, dtype):
    spec, config = models[which]
    full = load_model(spec, config=config, dtype=dtype)
    light = load_model(spec, config=config, dtype=dtype, parts="text")
    assert light.unet is None and light.family == full.family
    a, b = full.encode_tokens(PROMPTS), light.encode_tokens(PROMPTS)
    assert a.embeds.dtype == b.embeds.dtype and torch.equal(a.embeds, b.embeds)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids, b.ids)
    assert [full.tokenize(p) for p in PROMPTS] == [light.tokenize(p) for p in PROMPTS]
    key = lambda layers: [(l.name, l.d_out, l.d_in, l.heads) for l in layers]  # noqa: E731
    assert key(full.cross_attention_layers()) == key(light.cross_attention_layers())
    ref, lazy = kv_weights(full.unet), light.kv_weights()
    assert list(ref) == list(lazy)
    for name in ref:  # same values in the same dtype (float32 unless --dtype, as the pipeline holds them)
        t = lazy[name]
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name].detach())


def _same_edit(e1, e2):
    t1, t2 = e1.tensors(), e2.tensors()
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert e1.expected_shapes() == e2.expected_shapes() and list(e1.expected_shapes()) == list(e2.expected_shapes())
    assert e1.base_fingerprint == e2.base_fingerprint and e1.base_fingerprint["exact"]
    assert e1.result_fingerprint == e2.result_fingerprint and e1.result_fingerprint != e1.base_fingerprint


CASES = [("sd1", "uce"), ("sd1", "cure"), ("sd1", "space"), ("sdxl", "uce"), ("sdxl", "cure"),
         ("sd1_single", "uce"), ("sdxl_single", "cure"), ("sd1_sharded", "uce")]


@pytest.mark.parametrize("which,method", CASES)
def test_edits_and_fingerprints_are_bit_identical(models, which, method):
    spec, config = models[which]
    kw = {"guide": "art", "preserve_scale": 1.0} if method == "uce" else {}
    if method == "space":
        kw = {"mu": 0.05, "max_iter": 40, "history_every": 0}
    full = load_model(spec, config=config)
    light = api.load_for(method, spec, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e_full = api.erase(full, ["Van Gogh"], ["Claude Monet"], method=method, progress=False, **kw)
        e_light = api.erase(light, ["Van Gogh"], ["Claude Monet"], method=method, progress=False, **kw)
    _same_edit(e_full, e_light)
    # the encoders were freed once the embeddings existed (the tokenizer stays)
    assert all(m is None for _, m in light._encoders)
    # and the result fingerprint is the one of the weights apply writes
    e_light.apply(full)
    from pure_fast.edits import fingerprint as fp

    assert fp.matches(e_light.result_fingerprint, kv_weights(full.unet))


def test_an_adapter_the_caller_owns_keeps_its_encoders(models):
    spec, _ = models["sd1"]
    light = load_model(spec, parts="text")  # not api.load_for: the caller may erase again
    for _ in range(2):
        api.erase(light, ["Van Gogh"], ["Claude Monet"], method="cure", progress=False)
    assert all(m is not None for _, m in light._encoders)


def test_exports_from_the_kv_files_equal_exports_from_the_pipeline(models, tmp_path):
    from safetensors.torch import load_file

    from pure_fast.export.lora import export_lora, export_unet_state_dict

    spec, _ = models["sdxl"]
    full = load_model(spec)
    edit = api.erase(full, ["Van Gogh"], ["Claude Monet"], method="uce", progress=False)
    kv_only = load_model(spec, parts="kv")
    for fn, kw in ((export_lora, {"format": "kohya", "kohya_names": "ldm"}), (export_lora, {}),
                   (export_unet_state_dict, {})):
        a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
        fn(edit, full, a, **kw)
        fn(edit, kv_only, b, **kw)
        ta, tb = load_file(a), load_file(b)
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), fn.__name__


def test_text_space_erase_on_a_folder_imports_no_diffusers(models, tmp_path):
    spec, _ = models["sdxl"]
    out = str(tmp_path / "e.safetensors")
    code = ("import sys; from pure_fast.cli import main; "
            f"rc = main(['erase', '--model', {spec!r}, '--method', 'uce', '--forget', 'Van Gogh', '--retain', "
            f"'Monet', '--out', {out!r}, '--quiet']); "
            "print(rc, sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] == 'diffusers'}))")
    env = dict(os.environ, PURE_FAST_PROGRESS="0", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout
    assert os.path.isfile(out)


def test_nan_in_a_kv_tensor_is_refused_with_its_name(models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from pure_fast.cli import main

    spec, _ = models["sd1"]
    bad = tmp_path / "nan"
    shutil.copytree(spec, bad)
    wfile = bad / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(wfile))
    key = sorted(k for k in state if k.endswith("attn2.to_v.weight"))[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(wfile))
    out = str(tmp_path / "e.safetensors")
    rc = main(["erase", "--model", str(bad), "--method", "uce", "--forget", "Van Gogh", "--retain", "Monet", "--out", out,
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "NaN/Inf" in err and key in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_a_unet_file_that_does_not_match_its_config_is_refused(models, tmp_path):
    from pure_fast.errors import ModelLoadError

    spec, _ = models["sd1"]
    bad = tmp_path / "other_config"
    shutil.copytree(spec, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layers_per_block"] = 2  # the file has one layer per block
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(str(bad), parts="text")
