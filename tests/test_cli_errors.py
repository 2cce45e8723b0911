"""More bad inputs for the CLI (tests/test_cli.py has the first 21): each ends in ONE line on stderr, exit code 2
(usage) or 1 (runtime), no traceback, no output file, and the input model folder untouched.

Covered here: pickle files in every place a file is read (model folder components, edit files by suffix
and by content), wrong-type paths (text file as model, folder / empty file / broken link as edit, folder as
--out), absurd option values, seeds out of range, templates, an edit for another model family, NaN in an
edit file and in model weights, the same edit stacked twice, unsupported or broken model_index.json, an
out-of-memory during collection (device, CPU allocator, MemoryError: reported with the option that lowers
memory), a missing native build (fallback without it; one line when it is forced), a bad backend variable.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from pure_fast.cli import main

FAST = ["--size", "32", "--seed", "0", "--steps", "4", "--record-steps", "2", "--quiet"]


def _tree_digest(folder: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def files(tiny_sd1_dir, tmp_path_factory):
    """Bad files, built once."""
    from safetensors.torch import load_file, save_file

    from pure_fast.edits.edit import LowRankEdit

    d = tmp_path_factory.mktemp("bad_inputs")
    f = {"dir": str(d)}
    # a folder whose unet and vae hold only pickle weights
    pk = d / "pickle_folder"
    shutil.copytree(tiny_sd1_dir, pk)
    for comp in ("unet", "vae"):
        for name in os.listdir(pk / comp):
            if name.endswith(".safetensors"):
                os.replace(pk / comp / name, pk / comp / "diffusion_pytorch_model.bin")
    f["pickle_folder"] = str(pk)
    # a folder whose UNet holds a NaN
    nan = d / "nan_model"
    shutil.copytree(tiny_sd1_dir, nan)
    wfile = nan / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(wfile))
    key = sorted(k for k in state if k.endswith("conv_in.weight"))[0]
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, str(wfile))
    f["nan_model"] = str(nan)
    # torch.save output (zip) and a pickle, under edit-like names
    torch.save({"a": torch.zeros(2)}, str(d / "zip.safetensors"))
    f["zip_edit"] = str(d / "zip.safetensors")
    (d / "edit.pt").write_bytes(b"\x80\x04\x95junk")
    f["pt_edit"] = str(d / "edit.pt")
    (d / "notes.txt").write_text("not a model")
    f["text"] = str(d / "notes.txt")
    (d / "empty.safetensors").write_bytes(b"")
    f["empty"] = str(d / "empty.safetensors")
    os.symlink(str(d / "nowhere"), str(d / "broken.safetensors"))
    f["broken"] = str(d / "broken.safetensors")
    (d / "folder").mkdir()
    f["folder"] = str(d / "folder")
    (d / "full").mkdir()
    (d / "full" / "x").write_text("x")
    f["full"] = str(d / "full")
    # unsupported / broken model_index.json
    (d / "flux").mkdir()
    (d / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    f["flux"] = str(d / "flux")
    (d / "brokenidx").mkdir()
    (d / "brokenidx" / "model_index.json").write_text("{not json")
    f["brokenidx"] = str(d / "brokenidx")
    # an edit for SDXL (layers the SD1 model lacks), one with NaN, one from a future format version
    name = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"
    sdxl = LowRankEdit(method="pure", family="sdxl", concepts={"forget": ["x"]}, options={},
                       factors={name: (torch.ones(64, 1), torch.ones(1, 64))}, shapes={name: (64, 64)})
    sdxl.save(str(d / "sdxl.safetensors"))
    f["sdxl_edit"] = str(d / "sdxl.safetensors")
    nan_edit = LowRankEdit(method="pure", family="sd1", concepts={"forget": ["x"]}, options={},
                           factors={name: (torch.full((64, 1), float("nan")), torch.ones(1, 64))},
                           shapes={name: (64, 64)})
    nan_edit.save(str(d / "nan_edit.safetensors"))
    f["nan_edit"] = str(d / "nan_edit.safetensors")
    meta = sdxl.meta()
    meta["format_version"] = 2
    from pure_fast.fileio import save_safetensors

    save_safetensors(sdxl.tensors(), str(d / "future.safetensors"), metadata={"pure_fast": json.dumps(meta)})
    f["future_edit"] = str(d / "future.safetensors")
    (d / "noslot.txt").write_text("a painting\n")
    f["noslot"] = str(d / "noslot.txt")
    return f


@pytest.fixture(scope="module")
def good_edit(tiny_sd1_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good") / "e.safetensors")
    assert main(["erase", "--model", tiny_sd1_dir, "--forget", "Van Gogh", "--retain", "Monet", "--category", "style",
                 "--out", out, *FAST]) == 0
    return out


def _check(argv, capsys, rc_expected, must=None, out=None, model=None):
    before = _tree_digest(model) if model else None
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if not l.startswith("pure-fast: warning:")]
    assert rc == rc_expected, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("pure-fast: error: "), err
    assert "Traceback" not in err
    if must:
        assert must.lower() in lines[0].lower(), lines[0]
    if out:
        assert not os.path.exists(out), "a failed run left an output behind"
        parent = os.path.dirname(out)
        assert not [n for n in os.listdir(parent) if n.startswith(".tmp-")], "temp files left behind"
    if model:
        assert _tree_digest(model) == before, "the input model was modified"
    return lines[0]


def _erase(model, out, *extra):
    return ["erase", "--model", model, "--forget", "Van Gogh", "--out", out, *FAST, *extra]


# ---- usage errors (exit 2) ------------------------------------------------------------------------------
USAGE = {
    "size_absurd": (["--size", "100000"], "size"),
    "size_tiny": (["--size", "2"], "size"),
    "steps_negative": (["--steps", "-1"], "steps"),
    "steps_not_int": (["--steps", "ten"], "invalid int"),
    "batch_size_zero": (["--batch-size", "0"], "batch_size"),
    "guidance_negative": (["--guidance", "-5"], "guidance"),
    "record_steps_past_schedule": (["--record-steps", "9"], "record_steps"),
    "retain_threshold_zero": (["--retain-threshold", "0"], "retain_threshold"),
    "threshold_nan": (["--forget-threshold", "nan"], "forget_threshold"),
    "unknown_option": (["--option", "frobnicate=1"], "unknown option"),
    "option_without_value": (["--option", "frobnicate"], "KEY=VALUE"),
    "seed_out_of_range": (["--seed", str(2**70)], "seed"),
    "empty_retain": (["--retain", "   "], "empty"),
    "duplicate_retain": (["--retain", "Monet", "--retain", "monet"], "duplicate"),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors(case, tiny_sd1_dir, tmp_path, capsys):
    extra, must = USAGE[case]
    out = str(tmp_path / "e.safetensors")
    _check(_erase(tiny_sd1_dir, out, *extra), capsys, 2, must, out=out)


def test_templates_missing_and_without_slot(tiny_sd1_dir, files, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    _check(_erase(tiny_sd1_dir, out, "--templates", str(tmp_path / "none.txt")), capsys, 2, "does not exist", out=out)
    _check(_erase(tiny_sd1_dir, out, "--templates", files["noslot"]), capsys, 2, "slot", out=out)


def test_out_is_a_folder(tiny_sd1_dir, files, capsys):
    _check(_erase(tiny_sd1_dir, files["folder"]), capsys, 2, "is a folder")
    assert os.path.isdir(files["folder"]) and not os.listdir(files["folder"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_unavailable(tiny_sd1_dir, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    _check(_erase(tiny_sd1_dir, out, "--device", "cuda"), capsys, 2, "--device cpu", out=out)


def test_prompts_file_missing(tiny_sd1_dir, tmp_path, capsys):
    out = str(tmp_path / "g")
    _check(["generate", "--model", tiny_sd1_dir, "--prompts-file", str(tmp_path / "none.txt"), "--out-dir", out],
           capsys, 2, "does not exist", out=out)


def test_bad_backend_variable(tiny_sd1_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PURE_FAST_BACKEND", "gpu-please")
    out = str(tmp_path / "e.safetensors")
    _check(_erase(tiny_sd1_dir, out), capsys, 2, "PURE_FAST_BACKEND", out=out)


# ---- files that are never unpickled ---------------------------------------------------------------------
def test_pickle_weights_folder_refused(files, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    msg = _check(_erase(files["pickle_folder"], out), capsys, 1, "never loaded", out=out, model=files["pickle_folder"])
    assert "unet" in msg and "vae" in msg and "safetensors" in msg


@pytest.mark.parametrize("which", ["pt_edit", "zip_edit"])
def test_pickle_edit_files_refused(which, files, tiny_sd1_dir, tmp_path, capsys):
    _check(["inspect", files[which]], capsys, 1, "never loaded")
    out = str(tmp_path / "o")
    _check(["apply", "--model", tiny_sd1_dir, "--edit", files[which], "--out", out], capsys, 1, ".safetensors",
           out=out, model=tiny_sd1_dir)


# ---- wrong-type paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("which,must", [("folder", "is a folder"), ("empty", "too short"), ("broken", "does not exist"),
                                        ("text", "not a valid safetensors")])
def test_edit_path_of_wrong_type(which, must, files, capsys):
    _check(["inspect", files[which]], capsys, 1, must)


def test_model_is_a_text_file(files, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    _check(_erase(files["text"], out), capsys, 1, "not a .safetensors file", out=out)


@pytest.mark.parametrize("which,must", [("flux", "not supported"), ("brokenidx", "cannot read")])
def test_model_index_unsupported_or_broken(which, must, files, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    _check(_erase(files[which], out), capsys, 1, must, out=out)


def test_apply_out_exists(tiny_sd1_dir, good_edit, files, capsys):
    _check(["apply", "--model", tiny_sd1_dir, "--edit", good_edit, "--out", files["full"]], capsys, 1, "already exists",
           model=tiny_sd1_dir)
    assert os.listdir(files["full"]) == ["x"]


def test_inspect_a_model_weight_file(tiny_sd1_dir, capsys):
    _check(["inspect", os.path.join(tiny_sd1_dir, "unet", "diffusion_pytorch_model.safetensors")], capsys, 1,
           "not a pure_fast edit")


# ---- edits that do not fit ------------------------------------------------------------------------------
def test_edit_for_another_model_family(tiny_sd1_dir, files, tmp_path, capsys):
    out = str(tmp_path / "o")
    _check(["apply", "--model", tiny_sd1_dir, "--edit", files["sdxl_edit"], "--out", out], capsys, 1,
           "another model family", out=out, model=tiny_sd1_dir)


def test_edit_with_nan_values(tiny_sd1_dir, files, tmp_path, capsys):
    out = str(tmp_path / "o")
    _check(["apply", "--model", tiny_sd1_dir, "--edit", files["nan_edit"], "--out", out], capsys, 1, "NaN",
           out=out, model=tiny_sd1_dir)


def test_edit_from_a_future_format(files, capsys):
    _check(["inspect", files["future_edit"]], capsys, 1, "upgrade")


def test_same_edit_stacked_twice(tiny_sd1_dir, good_edit, tmp_path, capsys):
    out = str(tmp_path / "o")
    _check(["apply", "--model", tiny_sd1_dir, "--edit", good_edit, "--edit", good_edit, "--out", out], capsys, 1,
           "other weights", out=out, model=tiny_sd1_dir)


def test_nan_in_model_weights(files, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    msg = _check(_erase(files["nan_model"], out), capsys, 1, "NaN/Inf", out=out, model=files["nan_model"])
    assert "conv_in.weight" in msg


# ---- resources: memory and the native build -------------------------------------------------------------
@pytest.mark.parametrize("exc", [
    lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 9000000000 bytes"),
    lambda: MemoryError(),
], ids=["cuda_oom", "cpu_alloc", "memory_error"])
def test_out_of_memory_names_the_option(exc, tiny_sd1_dir, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise exc()

    monkeypatch.setattr("pure_fast.methods.base.collect_activations", boom)
    out = str(tmp_path / "e.safetensors")
    msg = _check(_erase(tiny_sd1_dir, out), capsys, 1, "memory", out=out, model=tiny_sd1_dir)
    assert "--batch-size" in msg


def _no_native(monkeypatch):
    from pure_fast import _native

    def missing():
        raise _native.NativeUnavailable(
            f"the native extension pure_fast._C is not available (ImportError: test); rebuild it with: {_native.REBUILD}")

    monkeypatch.setattr(_native, "load", missing)


def test_missing_native_build_falls_back(tiny_sd1_dir, tmp_path, capsys, monkeypatch):
    """Without _C the torch references run: erase still works and its edit loads (finite check in torch)."""
    _no_native(monkeypatch)
    out = str(tmp_path / "e.safetensors")
    assert main(_erase(tiny_sd1_dir, out, "--retain", "Monet")) == 0, capsys.readouterr().err
    assert main(["inspect", out]) == 0


def test_missing_native_build_when_forced(tiny_sd1_dir, tmp_path, capsys, monkeypatch):
    _no_native(monkeypatch)
    monkeypatch.setenv("PURE_FAST_BACKEND", "native")
    out = str(tmp_path / "e.safetensors")
    msg = _check(_erase(tiny_sd1_dir, out, "--retain", "Monet"), capsys, 1, "pure_fast._C", out=out)
    assert "pip install" in msg


def test_debug_shows_the_traceback(files):
    """The control: with --debug the same error propagates (the one-line form is not hiding other output)."""
    from pure_fast.errors import EditFileError

    with pytest.raises(EditFileError):
        main(["inspect", files["empty"], "--debug"])


def test_no_unpickling_anywhere_in_the_package():
    """Static check: no call in pure_fast/, bench/ or tests/ can unpickle (torch.load, pickle, numpy allow_pickle).
    Tests exchange data through safetensors + JSON too (tests/test_ops_pooled_attention.py's worker)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"torch\.load\(|\bimport pickle\b|\bpickle\.loads?\(|allow_pickle\s*=\s*True|"
                         r"weights_only\s*=\s*False|\bimport dill\b|joblib\.load\(")
    hits = []
    for folder in ("pure_fast", "bench", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line.split("#", 1)[0]):
                    hits.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def _subcommands():
    import argparse

    from pure_fast.cli import build_parser

    sub = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)][0]
    return {name: sp for name, sp in sub.choices.items()}


@pytest.mark.parametrize("command", [n for n, sp in _subcommands().items() if any(a.required for a in sp._actions)])
def test_every_subcommand_without_its_required_options(command, capsys):
    _check([command], capsys, 2, "required")


def test_every_command_that_reads_edits_refuses_pickles(files, tiny_sd1_dir, tmp_path, capsys):
    """inspect / apply / generate / export / combine / revert: a pickle in place of a safetensors file is refused."""
    pt = files["pt_edit"]
    out = str(tmp_path / "out")
    cases = [
        ["inspect", pt],
        ["apply", "--model", tiny_sd1_dir, "--edit", pt, "--out", out],
        ["generate", "--model", tiny_sd1_dir, "--edit", pt, "--prompt", "x", "--out-dir", out],
        ["combine", "--edit", pt, "--edit", pt, "--out", out + ".safetensors"],
    ]
    if "export" in _subcommands():
        fmt = next(c for c in _subcommands()["export"]._option_string_actions["--format"].choices)
        cases.append(["export", "--edit", pt, "--format", fmt, "--out", out + ".safetensors"])
    if "revert" in _subcommands():
        cases.append(["revert", "--model", tiny_sd1_dir, "--revert-file", pt])
    for argv in cases:
        msg = _check(argv, capsys, 1, None, model=tiny_sd1_dir)
        assert "pickle" in msg or "safetensors" in msg, (argv[0], msg)
        assert not os.path.exists(out) and not os.path.exists(out + ".safetensors"), argv[0]
