"""The CLI end to end on a saved tiny pipeline, and its one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pure_fast.cli import main

FAST_ARGS = ["--size", "32", "--seed", "0", "--steps", "4", "--record-steps", "2"]


@pytest.fixture(scope="module")
def edit_file(tiny_sd1_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("edits") / "vangogh.safetensors")
    rc = main(["erase", "--model", tiny_sd1_dir, "--forget", "Van Gogh", "--retain", "Claude Monet",
               "--category", "style", "--out", out, "--quiet", *FAST_ARGS])
    assert rc == 0 and os.path.isfile(out)
    return out


def test_erase_json_summary(tiny_sd1_dir, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    rc = main(["erase", "--model", tiny_sd1_dir, "--forget", "Picasso", "--category", "style",
               "--out", out, "--json", *FAST_ARGS])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "pure" and summary["changed_weights"] > 0
    assert set(summary["timings"]) >= {"collect_s", "estimate_s", "edit_s", "save_s"}


def test_inspect(edit_file, capsys):
    assert main(["inspect", edit_file]) == 0
    text = capsys.readouterr().out
    assert "pure" in text and "Van Gogh" in text and "ranks" in text
    assert main(["inspect", edit_file, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd1" and info["concepts"]["forget"] == ["Van Gogh"] and info["ranks"]


def test_apply_writes_loadable_folder_identical_except_edited(tiny_sd1_dir, edit_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pure_fast.edits.edit import kv_weights
    from pure_fast.edits.io import load_edit

    out = str(tmp_path / "edited")
    assert main(["apply", "--model", tiny_sd1_dir, "--edit", edit_file, "--out", out, "--quiet"]) == 0
    a = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True, safety_checker=None)
    b = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    edit = load_edit(edit_file)
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed == set(edit.target_weights())
    for comp in ("vae", "text_encoder"):
        for k, v in getattr(a, comp).state_dict().items():
            assert torch.equal(v, getattr(b, comp).state_dict()[k])
    edit.apply(a)
    wa, wb = kv_weights(a.unet), kv_weights(b.unet)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the input folder is untouched and no temp folder is left behind
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_generate_before_after(tiny_sd1_dir, edit_file, tmp_path):
    out = str(tmp_path / "gen")
    rc = main(["generate", "--model", tiny_sd1_dir, "--edit", edit_file, "--prompt", "art by Van Gogh",
               "--prompt", "art by Claude Monet", "--seed", "1", "--seed", "2", "--steps", "3", "--size", "32",
               "--out-dir", out, "--quiet"])
    assert rc == 0
    for sub in ("original", "edited"):
        assert sorted(os.listdir(os.path.join(out, sub))) == ["000_1.png", "000_2.png", "001_1.png", "001_2.png"]
    assert os.path.isfile(os.path.join(out, "grid.png"))
    meta = json.load(open(os.path.join(out, "prompts.json")))
    assert meta["prompts"] == ["art by Van Gogh", "art by Claude Monet"] and meta["seeds"] == [1, 2]


def _err(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("case", [
    "missing_model", "single_file_no_config", "pickle_ckpt", "empty_forget", "no_forget", "duplicate_forget",
    "overlap", "unreadable_edit", "missing_edit", "bad_threshold", "bad_category", "bad_method", "not_a_model_dir",
    "config_not_dir", "out_parent_is_a_file", "bad_dtype", "bad_device", "unknown_flag", "no_prompt", "bad_steps",
])
def test_bad_input_one_line(case, tiny_sd1_dir, edit_file, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    base = ["erase", "--model", tiny_sd1_dir, "--forget", "Van Gogh", "--out", out, "--quiet", *FAST_ARGS]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04pickle")
    (tmp_path / "m.safetensors").write_bytes(b"\x00" * 16)
    argv = {
        "missing_model": ["erase", "--model", str(tmp_path / "nope"), "--forget", "x", "--out", out],
        "single_file_no_config": ["erase", "--model", str(tmp_path / "m.safetensors"), "--forget", "x", "--out", out],
        "pickle_ckpt": ["erase", "--model", str(tmp_path / "m.ckpt"), "--forget", "x", "--out", out],
        "empty_forget": base[:3] + ["--forget", "  ", "--out", out],
        "no_forget": ["erase", "--model", tiny_sd1_dir, "--out", out],
        "duplicate_forget": base + ["--forget", "van gogh"],
        "overlap": base + ["--retain", "Van Gogh"],
        "unreadable_edit": ["inspect", str(junk)],
        "missing_edit": ["apply", "--model", tiny_sd1_dir, "--edit", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")],
        "bad_threshold": base + ["--forget-threshold", "1.5"],
        "bad_category": base + ["--category", "bogus"],
        "bad_method": base + ["--method", "magic"],
        "not_a_model_dir": ["erase", "--model", str(tmp_path), "--forget", "x", "--out", out],
        "config_not_dir": ["erase", "--model", str(tmp_path / "m.safetensors"), "--config", str(junk), "--forget", "x", "--out", out],
        # a missing --out folder is created (tests/test_newcomer.py); one under a file cannot be
        "out_parent_is_a_file": base[:5] + ["--out", str(junk / "dir" / "e.safetensors")],
        "bad_dtype": base + ["--dtype", "int3"],
        "bad_device": base + ["--device", "tpu"],
        "unknown_flag": base + ["--frobnicate"],
        "no_prompt": ["generate", "--model", tiny_sd1_dir, "--out-dir", str(tmp_path / "g")],
        "bad_steps": ["generate", "--model", tiny_sd1_dir, "--prompt", "x", "--steps", "0", "--out-dir", str(tmp_path / "g")],
    }[case]
    rc, err = _err(argv, capsys)
    assert rc in (1, 2), err
    assert err.startswith("pure-fast") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not os.path.exists(out)


def test_edit_for_other_weights_refused(tiny_sd1_other_dir, edit_file, tmp_path, capsys):
    out = str(tmp_path / "o")
    rc, err = _err(["apply", "--model", tiny_sd1_other_dir, "--edit", edit_file, "--out", out], capsys)
    assert rc == 1 and "other weights" in err and len(err.splitlines()) == 1
    assert not os.path.exists(out)


def test_module_entry_point_exit_code_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pure_fast", "inspect", str(tmp_path / "missing.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


def test_single_file_with_config_through_cli(tiny_sd1_dir, tmp_path, capsys):
    """A single .safetensors checkpoint (LDM keys) plus --config DIR loads and erases like the folder."""
    from diffusers import StableDiffusionPipeline

    from pure_fast.export.single_file import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True, safety_checker=None)
    ckpt = str(tmp_path / "model.safetensors")
    save_single_file(pipe, ckpt)
    out = str(tmp_path / "e.safetensors")
    rc = main(["erase", "--model", ckpt, "--config", tiny_sd1_dir, "--forget", "Van Gogh", "--retain", "Monet",
               "--category", "style", "--out", out, "--json", *FAST_ARGS])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "sd1" and summary["changed_weights"] > 0
    # the edit made from the single file applies to the folder model: same weights, same fingerprint
    from pure_fast.edits.io import load_edit

    load_edit(out).apply(pipe)
