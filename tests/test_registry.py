"""The method seam: the registry, options metadata as the one source (CLI flag -> options -> edit -> inspect),
category presets, and an import graph without cycles."""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import pytest
import torch

import pure_fast
from pure_fast.cli import _method_option_values, build_parser, main
from pure_fast.edits.edit import LowRankEdit
from pure_fast.edits.io import load_edit
from pure_fast.errors import UsageError
from pure_fast.methods import EraseContext, Method, get_method, method_names, register
from pure_fast.methods.base import unregister
from pure_fast.options import option, option_specs, options_meta

PACKAGE = Path(pure_fast.__file__).parent


def test_every_method_is_registered_with_described_options():
    assert method_names() == ("pure", "uce", "cure", "space", "acterase")
    for name in method_names():
        m = get_method(name)
        assert m.name == name and m.description and is_dataclass(m.options)
        for f in fields(m.options):  # every option documents itself (nested option dataclasses: their fields)
            assert "help" in f.metadata or is_dataclass(f.default_factory() if callable(f.default_factory) else None), \
                (name, f.name)


def test_unknown_method_is_a_one_line_usage_error(capsys, tmp_path):
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        pure_fast.erase(None, ["red"], method="nope")
    assert main(["erase", "--forget", "red", "--method", "nope", "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method" in err and "'nope'" in err and "pure" in err
    assert not os.listdir(tmp_path)


# ---- a method registered from outside the package -------------------------------------------------------
@dataclass
class ShiftOptions:
    scale: float = option(1.0, range=(0, 10, "(]"), help="size of the rank-1 change of the first key weight")
    twice: bool = option(False, help="double it")


def _shift_edit(ctx):
    layer = ctx.adapter.cross_attention_layers()[0]
    s = ctx.options.scale * (2 if ctx.options.twice else 1)
    up = torch.full((layer.d_out, 1), float(s))
    down = torch.zeros(1, layer.d_in)
    down[0, 0] = 1.0
    return LowRankEdit(method="shift", family=ctx.adapter.family, concepts={"forget": ctx.forget},
                       options=ctx.options_meta(), factors={layer.key_weight: (up, down)},
                       shapes={layer.key_weight: (layer.d_out, layer.d_in)}, stats=ctx.stats())


@pytest.fixture
def shift_method():
    m = register(Method("shift", ShiftOptions, _shift_edit, "test method: a rank-1 shift of one key weight"))
    yield m
    unregister("shift")


def test_a_registered_method_is_reachable_from_the_api(tiny_sd1, shift_method):
    e = pure_fast.erase(tiny_sd1, ["anything"], method="shift", scale=0.5, progress=False)
    (name,) = e.target_weights()
    assert e.method == "shift" and e.options["scale"] == 0.5 and e.options["twice"] is False
    assert float(e.factors[name][0][0, 0]) == 0.5
    with pytest.raises(UsageError, match="scale=20"):
        pure_fast.erase(tiny_sd1, ["anything"], method="shift", scale=20, progress=False)
    with pytest.raises(UsageError, match="unknown option"):
        pure_fast.erase(tiny_sd1, ["anything"], method="shift", steps=3, progress=False)


def test_a_registered_method_gets_cli_flags(tiny_sd1_dir, tmp_path, capsys, shift_method):
    out = str(tmp_path / "shift.safetensors")
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "shift", "--forget", "anything", "--scale", "0.25",
                 "--twice", "--out", out, "--quiet"]) == 0
    e = load_edit(out)
    assert e.method == "shift" and e.options["scale"] == 0.25 and e.options["twice"] is True
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["scale"] == 0.25
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "shift", "--forget", "x", "--scale", "11",
                 "--out", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scale=11.0 is out of range; use a value in (0, 10]" in err
    assert not os.path.exists(tmp_path / "bad.safetensors")


# ---- options metadata: CLI flag -> options -> edit metadata -> inspect ----------------------------------
def _other_value(spec):
    """A valid value of ``spec`` different from its default."""
    if spec.kind is bool:
        return not spec.default
    if spec.choices:
        return next(c for c in spec.choices if c != spec.default)
    if spec.many:
        return (3, 4)
    if spec.kind is str:
        return "a thing"
    lo, hi, _ = spec.range
    if spec.kind is int:  # one below the default keeps the rules across fields (record_steps <= steps)
        return spec.default - 1 if spec.default is not None and spec.default - 1 > lo else lo + 1
    v = lo + 1.5 if hi == math.inf else (lo + hi) / 2
    return v if v != spec.default else v + 0.25


def _argv(spec, value):
    if spec.kind is bool:
        return [spec.flag if value else "--no-" + spec.flag[2:]]
    if spec.many:
        return [a for v in value for a in (spec.flag, str(v))]
    return [spec.flag, str(value)]


@pytest.mark.parametrize("method", method_names())
def test_every_flag_reaches_the_options_and_the_recorded_metadata(method):
    parser = build_parser()
    specs = [s for s in option_specs(get_method(method).options) if s.flag and s.kind is not None]
    assert specs
    for spec in specs:
        value = _other_value(spec)
        args = parser.parse_args(["erase", "--forget", "x", "--out", "e.safetensors", "--method", method,
                                  *_argv(spec, value)])
        assert _method_option_values(args) == {spec.name: value}
        opts = EraseContext.prepare(method, ["x"], values=_method_option_values(args)).options
        got, meta = opts, options_meta(opts)
        for part in spec.path:
            got, meta = getattr(got, part), meta[part]
        assert got == value and meta == (list(value) if spec.many else value), spec.path


def test_flag_to_inspect_round_trip(tiny_sd1_dir, tmp_path, capsys):
    out = str(tmp_path / "uce.safetensors")
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "uce", "--forget", "Van Gogh", "--lam", "0.25",
                 "--token-mode", "subject_to_eos", "--no-edit-values", "--option", "guide=art", "--out", out,
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    opts = json.loads(capsys.readouterr().out)["options"]
    got = (opts["lam"], opts["token_mode"], opts["edit_values"], opts["guide"])
    assert got == (0.25, "subject_to_eos", False, "art")
    assert load_edit(out).target_weights() and all(n.endswith("to_k.weight") for n in load_edit(out).target_weights())


def test_collection_flags_and_option_path_agree():
    """--seed/--steps/... and --option KEY=VALUE land in the same place (the nested collection options)."""
    parser = build_parser()
    a = parser.parse_args(["erase", "--forget", "x", "--out", "e.safetensors", "--seed", "3", "--seed", "4",
                           "--steps", "6", "--guidance", "2.5"])
    b = parser.parse_args(["erase", "--forget", "x", "--out", "e.safetensors", "--option", "seeds=[3, 4]",
                           "--option", "steps=6", "--option", "guidance_scale=2.5"])
    oa = EraseContext.prepare("pure", ["x"], values=_method_option_values(a)).options
    ob = EraseContext.prepare("pure", ["x"], values=_method_option_values(b)).options
    assert oa == ob and oa.collect.seeds == (3, 4) and oa.collect.steps == 6 and oa.collect.guidance_scale == 2.5


# ---- category presets ----------------------------------------------------------------------------------
def _opts(method, category, **kw):
    return EraseContext.prepare(method, ["red"], category=category, values=kw).options


def test_presets_give_the_options_they_gave_before():
    """The values the methods' own ``for_category`` returned before the presets moved to the category code."""
    defaults = {m: get_method(m).options() for m in method_names()}
    for cat in ("shape", "colour", "background"):
        p = _opts("pure", cat)
        assert (p.forget_threshold, p.retain_threshold) == (0.99, 0.9)
        assert p.collect == defaults["pure"].collect and p.center and p.max_rank is None
        assert _opts("space", cat).target_sparsity == 0.2
        for m in ("uce", "cure", "acterase"):
            assert _opts(m, cat) == defaults[m]
    for cat in ("style", "object", "celebrity", "nsfw", None):
        assert _opts("pure", cat) == defaults["pure"]
        assert _opts("space", cat).target_sparsity == 0.85
    assert _opts("cure", "nsfw").alpha == 5.0 and _opts("cure", "style").alpha == 2.0
    assert _opts("acterase", "celebrity").resolved_anchor() == "a person"
    assert _opts("acterase", "style").resolved_anchor() == ""
    # the caller's values win, field by field; collection values leave the preset's thresholds alone
    p = _opts("pure", "colour", forget_threshold=0.9, steps=3, record_steps=1)
    assert (p.forget_threshold, p.retain_threshold, p.collect.steps) == (0.9, 0.9, 3)
    assert _opts("cure", "nsfw", alpha=3).alpha == 3


# ---- import graph ---------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> pure_fast modules it imports (at any depth of its code, function bodies included); an import
    of an ancestor package is left out (importing a submodule always runs its parents first)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    assert "pure_fast.adapters.layers" in graph["pure_fast.adapters.base"]  # the graph sees real edges
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_cli_parser_with_method_flags_imports_no_diffusers():
    code = ("import sys; from pure_fast.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
