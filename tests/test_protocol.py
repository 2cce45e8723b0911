"""The benchmark protocol: seed guard, dev/test split, multi-concept sets, FID, report generation."""
from __future__ import annotations

import copy
import types

import numpy as np
import pytest

from pure_fast.errors import UsageError
from pure_fast.evaluate import protocol, report
from pure_fast.evaluate import toy_bench as tb
from pure_fast.evaluate.protocol import SeedOverlapError, SplitError
from pure_fast.toy import world


def _edit_with_seeds(seeds, method="pure"):
    return types.SimpleNamespace(method=method, options={"collect": {"seeds": list(seeds)}})


# ---- seeds ------------------------------------------------------------------------------------------------
def test_seed_sets_are_disjoint_and_large_enough():
    protocol.check_seed_sets(protocol.SEED_SETS)
    assert len(protocol.SEED_SETS) == 3 and all(len(s) >= 4 for s in protocol.SEED_SETS)
    report_seeds = {s for ss in protocol.SEED_SETS for s in ss}
    assert not report_seeds & set(protocol.TUNING_SEEDS)
    from pure_fast.collect.activations import CollectOptions

    assert not (report_seeds | set(protocol.TUNING_SEEDS)) & set(CollectOptions().seeds)  # the methods' defaults
    with pytest.raises(SeedOverlapError, match="overlap"):
        protocol.check_seed_sets([(1, 2, 3, 4), (4, 5, 6, 7)])
    with pytest.raises(UsageError, match="fewer than 4"):
        protocol.check_seed_sets([(1, 2, 3)])


def test_seed_guard_refuses_collection_and_tuning_seeds():
    edit = _edit_with_seeds([0, 1, 100])
    with pytest.raises(SeedOverlapError, match=r"\[100\].*collect"):
        protocol.check_eval_seeds([100, 101], edit)
    protocol.check_eval_seeds([101, 102], edit)  # fresh seeds pass
    protocol.check_eval_seeds([0, 1], _edit_with_seeds([], "uce"))  # text-space methods collect nothing
    with pytest.raises(SeedOverlapError, match="tuning"):
        protocol.check_eval_seeds([protocol.TUNING_SEEDS[0]], None, purpose="report")
    with pytest.raises(SeedOverlapError, match="tuning"):  # seeds a presets file says tuning used
        protocol.check_eval_seeds([7777], None, purpose="report", presets={"tuning_seeds": [7777]})
    with pytest.raises(SeedOverlapError, match="reported seed sets"):
        protocol.check_eval_seeds([protocol.SEED_SETS[1][0]], None, purpose="tune")


def test_settings_refuse_overlap_before_generating():
    s = tb.EvalSettings(seed_sets=((100, 101), (101, 102)))
    with pytest.raises(SeedOverlapError):
        s.validate()
    # evaluate_concept checks before any image is generated: a None adapter is never touched
    with pytest.raises(SeedOverlapError):
        tb.evaluate_concept(None, "red", tb.EvalSettings(seeds=(100,)), edit=_edit_with_seeds([100]))
    with pytest.raises(SeedOverlapError):
        tb.evaluate_concept(None, "red", tb.EvalSettings(seeds=protocol.TUNING_SEEDS, purpose="report"))
    with pytest.raises(SeedOverlapError):  # the greedy search's seeds count too
        tb.evaluate_concept(None, "red", tb.EvalSettings(seeds=(100,), greedy_search_seeds=(5,)),
                            edit=_edit_with_seeds([5]))
    with pytest.raises(SeedOverlapError):
        tb.evaluate_multi(None, ["red"], tb.EvalSettings(seeds=(100,)), edit=_edit_with_seeds([100]))


def test_collecting_methods_record_their_seeds_through_edit_files(toy, tmp_path):
    """PURE and ActErase record the collection seeds in the edit (and its file); the evaluation refuses them."""
    from pure_fast import api
    from pure_fast.edits.io import load_edit

    for method in ("pure", "acterase"):
        edit = api.erase(toy, ["red"], ["blue"], method=method, category="colour", progress=False, fingerprint=False,
                         steps=2, record_steps=1, seeds=(100,), batch_size=64)
        path = str(tmp_path / f"{method}.safetensors")
        edit.save(path)
        loaded = load_edit(path)
        assert protocol.edit_collection_seeds(edit) == protocol.edit_collection_seeds(loaded) == {100}
        with pytest.raises(SeedOverlapError, match="collect"):
            tb.evaluate_method(toy, method, ["red"], ["blue"], tb.EvalSettings(seeds=(100, 101)), edit=loaded)


# ---- concepts ---------------------------------------------------------------------------------------------
def test_split_enforcement():
    protocol.check_split(["red", "star", "stripes"], "test")
    protocol.check_split(world.DEV_CONCEPTS["colour"], "dev")
    with pytest.raises(SplitError, match="orange.*test concepts only"):
        protocol.check_split(["red", "orange"], "test")
    with pytest.raises(SplitError, match="dev concepts only"):
        protocol.check_split(["red"], "dev")
    test = protocol.split_concepts("test")
    assert all(world.split_of(c) == "test" for cs in test.values() for c in cs)
    # retention is measured on members of the same split
    assert tb.neighbours_in("red", "test") == [c for c in world.neighbours("red") if world.split_of(c) == "test"]
    items = tb._plan("red", tb.EvalSettings(seeds=(100,), split="test"))
    assert {it.tag for it in items if it.kind == "neighbour"} == set(tb.neighbours_in("red", "test"))
    for it in items:
        if it.kind in ("neighbour", "forget_canonical"):
            assert all(world.split_of(v) == "test" for v in it.labels.values()), it


def test_report_refuses_dev_concepts():
    bench = small_bench()
    report.quality_markdown(bench)
    bad = copy.deepcopy(bench)
    bad["protocol"]["concepts"]["colour"] = ["orange"]
    with pytest.raises(SplitError):
        report.quality_markdown(bad)
    with pytest.raises(SplitError):
        report.readme_block(bad)
    bad = copy.deepcopy(bench)
    bad["single"][1]["concepts"]["green"] = bad["single"][1]["concepts"]["red"]
    with pytest.raises(SplitError):
        report.quality_markdown(bad)


# ---- multi-concept sets -----------------------------------------------------------------------------------
def test_multi_concept_sets_v1():
    sets = protocol.multi_concept_sets()
    test = protocol.split_concepts("test")
    big = max(test, key=lambda c: len(test[c]))
    single = [s for s in sets if s["category"] is not None]
    assert [s["k"] for s in single] == [k for k in protocol.MULTI_K if k < len(test[big])]
    for s in single:
        assert len(s["forget"]) == s["k"] and set(s["forget"]) <= set(test[big])
    mixed = sets[-1]
    assert mixed["name"] == "mixed" and len({world.category_of(c) for c in mixed["forget"]}) == len(mixed["forget"]) >= 2
    assert all(world.split_of(c) == "test" for s in sets for c in s["forget"])


def test_multi_concept_sets_with_a_large_category():
    letters = [chr(65 + i) for i in range(26)]
    fake = types.SimpleNamespace(
        CATEGORIES={"glyph": letters, "shape": list("abcdef"), "colour": list("ghijkl"), "background": list("mnop")},
        DEV_CONCEPTS={"glyph": letters[:4], "shape": ["a", "b"], "colour": ["g", "h"], "background": ["m"]})
    fake.TEST_CONCEPTS = {c: [m for m in ms if m not in fake.DEV_CONCEPTS[c]] for c, ms in fake.CATEGORIES.items()}
    sets = protocol.multi_concept_sets(fake)
    assert [s["k"] for s in sets] == [1, 3, 10, 20, 3]
    assert sets[3]["forget"] == letters[4:24] and sets[-1]["forget"] == ["E", "c", "i"]


# ---- FID --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cov", ["shrunk", "diag", "full"])
def test_fid_on_known_distributions(cov):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    assert protocol.frechet_distance(x, x, covariance=cov)["fid"] == pytest.approx(0.0, abs=1e-6)
    y = rng.normal(size=(300, 16))
    same = protocol.frechet_distance(x, y, covariance=cov)["fid"]
    shifted = [protocol.frechet_distance(x, y + d, covariance=cov)["fid"] for d in (0.5, 1.0)]
    assert same < shifted[0] < shifted[1]
    # a mean shift of d in every one of 16 coordinates adds 16 d^2 to the mean term
    assert protocol.frechet_distance(x, x + 1.0, covariance=cov)["mean_term"] == pytest.approx(16.0)
    scaled = protocol.frechet_distance(x, 2 * x, covariance=cov)
    assert scaled["mean_term"] < 0.1 and scaled["cov_term"] > same


def test_fid_full_matches_gaussian_closed_form():
    """Two Gaussians with diagonal covariances: FID = |mu1-mu2|^2 + sum (s1 - s2)^2 (s = std)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 3)) * np.array([1.0, 2.0, 0.5])
    y = rng.normal(size=(20000, 3)) * np.array([2.0, 1.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    expect = 1.0 + 1.0 + 1.0 + 0.0
    for cov in ("full", "diag", "shrunk"):
        assert protocol.frechet_distance(x, y, covariance=cov)["fid"] == pytest.approx(expect, rel=0.05)
    with pytest.raises(ValueError):
        protocol.frechet_distance(x[:, :2], y)


def test_shrinkage_is_a_fraction_and_small_samples_stay_finite():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 128)), rng.normal(size=(20, 128))  # fewer images than dimensions
    d = protocol.frechet_distance(x, y)
    assert all(0.0 <= a <= 1.0 for a in d["shrinkage"]) and np.isfinite(d["fid"])
    assert d["fid"] < protocol.frechet_distance(x, y + 1.0)["fid"]


def test_spread():
    sp = protocol.spread([0.2, 0.4, 0.3])
    assert sp["mean"] == pytest.approx(0.3) and sp["half_range"] == pytest.approx(0.1) and len(sp["values"]) == 3
    assert protocol.spread([None, None])["mean"] is None


# ---- report generation from a small JSON ------------------------------------------------------------------
def _sp(values):
    return protocol.spread(values)


def small_bench() -> dict:
    """A bench-quality document shaped like ``quality_bench.bench_quality``'s, with made-up numbers."""
    def summary(h):
        return {"hmean": _sp([h, h + 0.02, h - 0.02]), "target_anchor": _sp([0.1, 0.2, 0.3]),
                "target_heldout": _sp([0.2, 0.2, 0.2]), "target_rate": _sp([0.15, 0.2, 0.25]),
                "attack": _sp([0.3, 0.3, 0.3]), "retention": _sp([0.9, 0.95, 1.0]), "quality": _sp([0.8, 0.8, 0.8]),
                "fid": _sp([0.012, 0.014, 0.016]), "fid_floor": _sp([0.004, 0.004, 0.004])}

    concept = {"spread": {"hmean": _sp([0.5, 0.6, 0.7])}, "hmean": 0.6}
    single = [{"method": "none", "variant": "unedited", "summary": summary(0.0), "concepts": {"red": concept},
               "categories": {"colour": _sp([0.0, 0.0, 0.0])}, "erase_s": {}, "erase_s_mean": None, "errors": {}},
              {"method": "pure", "variant": "tuned", "preset": True, "summary": summary(0.777),
               "concepts": {"red": concept}, "categories": {"colour": _sp([0.7, 0.8, 0.9])},
               "erase_s_mean": 3.5, "errors": {}, "options_by_category": {"colour": {"forget_threshold": 0.99}}},
              {"method": "pure", "variant": "paper", "summary": summary(0.333), "concepts": {"red": concept},
               "categories": {"colour": _sp([0.3, 0.3, 0.3])}, "erase_s_mean": 3.4, "errors": {},
               "options_by_category": {"colour": {"forget_threshold": 0.95}}}]
    msum = {"target_anchor": _sp([0.1, 0.1, 0.1]), "target_heldout": _sp([0.25, 0.3, 0.35]), "kept": _sp([0.9, 0.9, 0.9]),
            "other": _sp([1.0, 1.0, 1.0]), "quality": _sp([0.8, 0.8, 0.8]), "fid": _sp([0.02, 0.02, 0.02])}
    multi = [{"method": "pure", "variant": "tuned", "errors": {},
              "sets": {"colour-1": {"k": 1, "forget": ["red"], "erase_s": 2.0, "summary": msum},
                       "colour-3": {"k": 3, "forget": ["red", "yellow", "blue"], "erase_s": 4.0, "summary": msum}}}]
    return {"quick": True, "world": "pure_fast.toy.world", "seconds": 12.0, "unavailable": {},
            "protocol": {"seed_sets": [list(s) for s in protocol.SEED_SETS], "tuning_seeds": list(protocol.TUNING_SEEDS),
                         "concepts": {"colour": ["red"]}, "multi_sets": [{"forget": ["red", "yellow", "blue"]}],
                         "fid": "detector-CNN features"},
            "settings": tb.EvalSettings(greedy=False).to_json(), "single": single, "multi": multi,
            "provenance": {"command": "pure-fast bench-quality --quick", "commit": "abc123", "date": "2026-12-07T10:00:00",
                           "device": "cpu", "torch_threads": 2, "versions": {"torch": "x"}}}


def test_report_generation_from_a_small_json(tmp_path):
    import json

    bench = json.loads(json.dumps(tb.json_ready(small_bench())))  # what a reader of quality.json sees
    md = report.quality_markdown(bench)
    assert "0.777 ± 0.020" in md and "0.333 ± 0.020" in md and "colour-3" in md and "pure-fast bench-quality" in md
    block = report.readme_block(bench)
    assert "0.777 ± 0.020" in block and "Highest H-mean: pure (tuned)" in block and "kept 0.90 ± 0.00" in block
    # every number in the block is in the JSON (as a mean, half-range or value rounded)
    import re

    held = set()

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        elif isinstance(o, float) or isinstance(o, int):
            for nd in (2, 3):
                held.add(f"{o:.{nd}f}")

    walk(bench)
    numbers = re.findall(r"(?<![\w.])\d+\.\d+", block.split("\n", 1)[1])  # after the provenance line
    assert numbers and all(n in held for n in numbers), [n for n in numbers if n not in held]
    readme = "intro\n" + report.README_BEGIN + "\nold 0.660\n" + report.README_END + "\nrest\n"
    new = report.update_readme(readme, bench)
    assert "old 0.660" not in new and new.startswith("intro\n") and new.endswith(report.README_END + "\nrest\n")
    assert report.update_readme(new, bench) == new  # idempotent
    assert "0.777" not in report.update_readme(new, None) and "No `bench-quality` run" in report.update_readme(new, None)
    with pytest.raises(UsageError, match="no results block"):
        report.update_readme("no markers", bench)
    paths = report.write_bench(bench, str(tmp_path))
    assert sorted(p.rsplit(".", 1)[1] for p in paths.values()) == ["json", "md", "png"]


@pytest.mark.slow
def test_bench_quality_end_to_end_small(toy, tmp_path):
    """The whole benchmark on UCE with tiny settings: test concepts only, tuned/paper rows, spreads over three
    seed sets, the multi-concept sets, and the three report files."""
    from dataclasses import replace

    from pure_fast.evaluate import quality_bench as qb

    s = replace(qb.QUICK, n_anchor=1, n_heldout=1, n_forget_canonical=1)
    bench = qb.bench_quality(toy, ["uce"], quick=True, settings=s, multi_settings=replace(s, n_neighbour=1),
                             presets={"world": world.__name__, "tuning_seeds": [600],
                                      "methods": {"uce": {"options": {"erase_scale": 2.0}}}}, progress=False)
    assert [(r["method"], r["variant"]) for r in bench["single"]] == [("none", "unedited"), ("uce", "tuned"),
                                                                      ("uce", "paper")]
    tuned, paper = bench["single"][1], bench["single"][2]
    assert all(o["erase_scale"] == 2.0 for o in tuned["options_by_category"].values())
    assert all(o["erase_scale"] == 1.0 for o in paper["options_by_category"].values())
    assert 600 in bench["protocol"]["tuning_seeds"]
    for row in bench["single"]:
        assert len(row["summary"]["hmean"]["values"]) == 3 and row["summary"]["fid"]["mean"] is not None
        assert all(world.split_of(c) == "test" for c in row["concepts"])
    none_fid, floor = bench["single"][0]["summary"]["fid"]["mean"], bench["single"][0]["summary"]["fid_floor"]["mean"]
    assert none_fid >= 0 and floor >= 0
    names = [st["name"] for st in protocol.multi_concept_sets()]
    for mrow in bench["multi"]:
        assert list(mrow["sets"]) == names
        for st in mrow["sets"].values():
            assert len(st["summary"]["kept"]["values"]) == 3
    none_multi = bench["multi"][0]["sets"][names[0]]["summary"]
    assert none_multi["target_anchor"]["mean"] >= 0.75  # the unedited model draws what it is asked
    paths = report.write_bench(bench, str(tmp_path))
    assert "## Several concepts in one edit" in open(paths["md"]).read()


# ---- the sweep ------------------------------------------------------------------------------------------------
def _sweep_module():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "sweep_defaults.py")
    spec = importlib.util.spec_from_file_location("sweep_defaults", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_gives_every_method_the_same_budget_on_dev_seeds(tmp_path):
    sw = _sweep_module()
    plans = {m: sw.configurations(m) for m in sw.SWEEP}
    assert {len(p) for p in plans.values()} == {sw.BUDGET}
    for m, p in plans.items():
        assert len({tuple(sorted(map(str, c.items()))) for c in p}) == len(p)  # distinct configurations
        knobs = set(sw.SWEEP[m]) if isinstance(sw.SWEEP[m], dict) else set(sw.SWEEP[m][0])
        assert all(set(c) == knobs for c in p)
    assert sw.TUNE.purpose == "tune" and sw.TUNE.split == "dev"
    assert not set(sw.TUNE.seeds) & {s for ss in protocol.SEED_SETS for s in ss}
    # adding a knob is one line; the budget stays the same
    more = {**sw.SWEEP, "uce": {**sw.SWEEP["uce"], "lam": [0.5, 1.0]}}
    assert len(sw.configurations("uce", sweep=more)) == sw.BUDGET
    # the paper default's and the current toy default's values come first
    assert {"target_sparsity": 0.85} in plans["space"][:2] and {"target_sparsity": 0.2} in plans["space"][:2]
    assert plans["cure"][0] == {"alpha": 2.0}
    # report files from a small result document
    cfg = lambda o, h: {"options": o, "objective": h, "concepts": {"square": {  # noqa: E731
        "hmean": h, "target_anchor": 0.5, "target_heldout": 0.5, "retention": 1.0, "attack": 0.2, "quality": 0.9,
        "erase_s": 1.0}}}
    doc = {"world": world.__name__, "dev_concepts": {"shape": ["square"]}, "tuning_seeds": list(sw.TUNE.seeds),
           "budget": 2, "seconds": 3.0, "methods": {"cure": {"configurations": [cfg({"alpha": 2.0}, 0.4),
                                                                                  cfg({"alpha": 8.0}, 0.6)], "chosen": 1}},
           "provenance": {"command": "c", "date": "d", "commit": "x", "device": "cpu", "torch_threads": 1}}
    md = sw.markdown(doc)
    assert "`{'alpha': 8.0}` **(chosen)** | 0.600" in md
    assert sw.chart(doc, str(tmp_path / "s.png")).endswith("s.png")


def test_presets_are_read_for_their_world_only(tmp_path):
    import json

    p = tmp_path / "presets.json"
    p.write_text(json.dumps({"world": world.__name__, "tuning_seeds": [500], "methods": {"cure": {"options": {"alpha": 4.0}}}}))
    assert protocol.load_presets(str(p))["methods"]["cure"]["options"] == {"alpha": 4.0}
    p.write_text(json.dumps({"world": "pure_fast.toy.v2.world", "methods": {}}))
    assert protocol.load_presets(str(p)) is None
    assert protocol.load_presets(str(tmp_path / "missing.json")) is None
    from pure_fast.evaluate.quality_bench import variant_options

    presets = {"world": world.__name__, "methods": {"cure": {"options": {"alpha": 4.0}}, "space": {"options": {
        "target_sparsity": 0.35}}}}
    assert variant_options("cure", "tuned", "colour", presets).alpha == 4.0
    assert variant_options("cure", "paper", "colour", presets).alpha == 2.0
    assert variant_options("space", "tuned", "shape", presets).target_sparsity == 0.35
    assert variant_options("space", "paper", "shape", presets).target_sparsity == 0.85


def test_bench_quality_cli_refuses_own_seeds(tmp_path, capsys):
    from pure_fast.cli import main

    out = tmp_path / "never"
    assert main(["bench-quality", "--quick", "--seeds", "2", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fixed seed sets" in err and err.count("\n") == 1 and not out.exists()


def test_bench_quality_pipeline_with_a_stand_in_generator(monkeypatch, tmp_path):
    """Every step after generation (detection, per-set numbers, spreads, pooled FID, multi-concept sets, the
    report files) on the unedited row, with the diffusion model replaced by renders of a fixed scene: fast, and
    the numbers are known (a generator that always draws a red circle on stripes)."""
    from dataclasses import replace

    from pure_fast.evaluate import quality_bench as qb

    scene = world.render("circle", "red", "stripes", 0)

    def fake_generate(adapter, prompts, seeds, **kw):
        return np.stack([scene] * len(prompts)) if len(prompts) else np.zeros((0,) + scene.shape, np.uint8)

    monkeypatch.setattr(tb, "generate_arrays", fake_generate)
    s = replace(qb.QUICK, n_anchor=1, n_heldout=1, n_forget_canonical=1)
    bench = qb.bench_quality(None, [], quick=True, settings=s, multi_settings=replace(s, n_neighbour=1),
                             presets={"world": world.__name__, "methods": {}}, progress=False)
    row = bench["single"][0]
    red = row["concepts"]["red"]
    assert red["target"]["anchor"] == 1.0 and red["spread"]["target_anchor"]["half_range"] == 0.0
    assert row["concepts"]["circle"]["target"]["heldout"] == 1.0 and row["concepts"]["stripes"]["target"]["rate"] == 1.0
    assert len(row["summary"]["hmean"]["values"]) == 3 and row["summary"]["hmean"]["mean"] == 0.0  # erased nothing
    # the retention images all show one scene: far from renders of the asked labels, FID above its floor
    assert row["summary"]["fid"]["mean"] > row["summary"]["fid_floor"]["mean"] >= 0
    multi = bench["multi"][0]["sets"]
    assert list(multi) == [st["name"] for st in protocol.multi_concept_sets()]
    k1 = multi[next(iter(multi))]
    assert k1["summary"]["target_anchor"]["mean"] == (1.0 if k1["forget"] == ["red"] else 0.0)
    assert k1["summary"]["kept"]["mean"] == 0.0  # the other colours are never drawn
    paths = report.write_bench(tb.json_ready(bench), str(tmp_path))
    md = open(paths["md"]).read()
    assert "## Several concepts in one edit" in md and "none (unedited)" in md
    assert report.readme_block(tb.json_ready(bench)).count("none (unedited)") == 2


def test_reuse_collections_still_lets_the_closed_loop_see_the_edited_model(tiny_sd1, one_thread):
    """The sweep's collection cache serves the unedited model's collection again, but never a collection made
    while an edit is applied: PURE's loop rounds are the same inside and outside the cache."""
    import torch

    import pure_fast
    import pure_fast.methods.pure  # noqa: F401 - loaded before the cache patches it
    from pure_fast.adapters import wrap_pipeline

    sw = _sweep_module()
    ad = wrap_pipeline(tiny_sd1, device="cpu")
    kw = dict(category="style", progress=False, fingerprint=False, rounds=3, residual_tol=0.0, size=32, seeds=(0,),
              steps=4, record_steps=2)
    plain = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], **kw)
    with sw.reuse_collections() as cache:
        first = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], **kw)
        n = len(cache)
        again = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], **kw)
        assert len(cache) == n  # the second erase collected nothing new: all of it was served from the cache
    assert plain.stats["rounds"] >= 2 and n >= 2  # the loop ran, and its collections were keyed apart
    for e in (first, again):
        assert e.stats["rounds"] == plain.stats["rounds"]
        assert e.stats["residual"] == pytest.approx(plain.stats["residual"])
        for name, (u, d) in plain.factors.items():
            torch.testing.assert_close(e.factors[name][0] @ e.factors[name][1], u @ d)
