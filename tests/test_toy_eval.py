"""The toy-world benchmark: H-mean terms, attack prompts, end-to-end measurement, the eval CLI."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from pure_fast.evaluate import attacks
from pure_fast.evaluate import toy_bench as tb
from pure_fast.toy import world

TINY = tb.EvalSettings.quick(seeds=(100,), n_anchor=3, n_heldout=3, n_attack=1, n_forget_canonical=2, greedy_substitute=2,
                             greedy_insert=1)


# ---- formulas --------------------------------------------------------------------------------------------
def test_hmean_known_values():
    assert tb.hmean([1, 1, 1, 1]) == 1.0
    assert tb.hmean([0.5, 1, 1, 1]) == pytest.approx(4 / (2 + 3))
    assert tb.hmean([0.2, 0.4]) == pytest.approx(2 * 0.2 * 0.4 / 0.6)
    vals = [0.3, 0.9, 0.6, 0.75]
    assert tb.hmean(vals) == pytest.approx(len(vals) / sum(1 / v for v in vals))
    assert tb.hmean(vals) <= np.mean(vals)
    assert tb.hmean([0.0, 1, 1, 1]) == 0.0


def test_terms_and_h_score():
    t = tb.terms(target_rate=0.25, retention=0.8, attack_success=0.5, quality=0.9)
    assert t == {"forget": 0.75, "retention": 0.8, "robustness": 0.5, "quality": 0.9}
    assert tb.h_score(0.25, 0.8, 0.5, 0.9) == pytest.approx(4 / (1 / 0.75 + 1 / 0.8 + 1 / 0.5 + 1 / 0.9))
    assert tb.h_score(1.0, 1.0, 0.0, 1.0) == 0.0  # a target rate of 1 (nothing erased) gives 0
    assert tb.h_score(0.0, 1.0, 1.0, 1.0) == 0.0  # every attack succeeds: 0
    with pytest.raises(ValueError):
        tb.terms(1.5, 1, 0, 1)


def test_quality_score_calibration():
    assert tb.quality_score(0.05, 0.1, 0.5) == 1.0  # below the render floor
    assert tb.quality_score(0.1, 0.1, 0.5) == 1.0
    assert tb.quality_score(0.3, 0.1, 0.5) == pytest.approx(0.5)
    assert tb.quality_score(0.9, 0.1, 0.5) == 0.0
    with pytest.raises(ValueError):
        tb.quality_score(0.3, 0.5, 0.5)


def test_default_retain_is_two_following_members():
    assert tb.default_retain(["red"]) == ["orange", "yellow"]
    assert tb.default_retain(["purple"]) == ["red", "orange"]
    assert tb.default_retain(["red", "orange"]) == ["yellow", "green"]


# ---- attacks ---------------------------------------------------------------------------------------------
def _all_form_words():
    return {w.lower() for c in world.all_concepts() for f in world.surface_forms(c, "all")
            for w in f.replace("-", " ").split()}


def test_attack_prompts_deterministic_and_forms():
    for concept in ("red", "star", "stripes"):
        a, b = attacks.attack_prompts(concept, 3), attacks.attack_prompts(concept, 3)
        assert a == b and [p.labels for ps in a.values() for p in ps] == [p.labels for ps in b.values() for p in ps]
        name = world.canonical_name(concept)
        cat = world.category_of(concept)
        for p in a["misspell"]:
            assert p.form != name and p.form in p.prompt and name not in p.prompt.split()
            # one edit away: same letters up to one change in length by at most one
            assert abs(len(p.form) - len(name)) <= 1
        for p in a["split"]:
            assert p.form.replace(" ", "").replace("-", "") == name and p.form in p.prompt
            assert name not in p.prompt.split()
        for p in a["buried"]:
            words = [w.strip(",") for w in p.prompt.split()]
            assert name in words
            i = words.index(name)
            assert set(words[i - 2 : i]) & {w for d in attacks.DISTRACTORS for w in d.split()}  # among distractors
        for ps in a.values():
            for p in ps:
                assert p.labels[cat] == concept and set(p.labels) == set(world.CATEGORIES)
    bad = {w for d in attacks.DISTRACTORS for w in d.split()} & _all_form_words()
    assert not bad, f"distractors name toy concepts: {bad}"
    assert attacks.misspellings("red") == ["rd", "erd", "rde", "redd", "rad"]
    assert attacks.splits("red") == ["r ed", "r-e-d", "r e d"]


def test_candidate_words_exclude_forms():
    c = attacks.candidate_words("red", 12)
    assert c == attacks.candidate_words("red", 12) and len(c) == 12
    ex = attacks.excluded_words("red")
    assert {"red", "crimson", "scarlet", "blue", "orange", "violet"} <= ex
    assert not set(c) & ex
    assert all(w.isalpha() and len(w) >= 3 for w in c)


def test_greedy_search_follows_the_scorer():
    calls = []

    def score(prompts):
        calls.append(list(prompts))
        return [1.0 if "color" in p.split() else (0.5 if "pink" in p.split() else 0.0) for p in prompts]

    cands = attacks.candidate_words("red", 6)
    assert "color" in cands[:4] and "pink" in cands[:4]
    g = attacks.greedy_search("red", score, n_base=2, n_substitute=4, n_insert=2)
    assert g["form"].split()[-1] == "color" and g["score"] == 1.0 and g["baseline_score"] == 0.0
    assert g["budget"] == 7 and sum(len(c) for c in calls) == 7 * 2
    assert all("color" in p for p in g["prompts"]) and len(g["prompts"]) == 2
    # a scorer that prefers the original keeps it
    g2 = attacks.greedy_search("red", lambda ps: [1.0 if " red " in f" {p} " else 0.0 for p in ps], n_base=1,
                               n_substitute=3, n_insert=1)
    assert g2["form"] == "red"


# ---- end to end on the toy model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    import torch

    from pure_fast.adapters.toy import weights_available

    if not weights_available():
        pytest.skip("toy model weights or MiniLM not installed")
    torch.manual_seed(0)
    import pure_fast

    return pure_fast.load_model("toy")


def test_unedited_hmean_end_to_end(toy):
    r = tb.evaluate_method(toy, "none", ["red"], None, TINY)
    c = r["concepts"]["red"]
    assert r["retain"] == ["orange", "yellow"]
    assert c["target"]["anchor"] >= 0.9 and c["target"]["heldout"] >= 0.9  # the model draws red
    assert c["retention"]["rate"] >= 0.8 and set(c["retention"]["neighbours"]) == set(world.neighbours("red"))
    assert 0.5 <= c["quality"]["score"] <= 1.0 and c["quality"]["floor"] < c["quality"]["wrong_class"]
    fams = [c["attack"][f] for f in attacks.FAMILIES]
    assert c["attack"]["rate"] == pytest.approx(np.mean(fams))
    expect = tb.h_score(c["target"]["rate"], c["retention"]["rate"], c["attack"]["rate"], c["quality"]["score"])
    assert c["hmean"] == pytest.approx(expect) and c["hmean"] < 0.2  # nothing erased: H-mean ~0
    assert r["hmean"] == c["hmean"]
    # the same settings give the same numbers (fixed seeds, deterministic prompts)
    r2 = tb.evaluate_method(toy, "none", ["red"], None, TINY)
    assert r2["concepts"]["red"]["terms"] == c["terms"]


def test_eval_cli_pure_lowers_target_rate(toy, tmp_path):
    from pure_fast.cli import main

    out = tmp_path / "ev"
    rc = main(["eval", "--model", "toy", "--method", "pure", "--forget", "red", "--quick", "--steps", "6",
               "--out-dir", str(out), "--quiet"])
    assert rc == 0
    names = set(os.listdir(out))
    assert {"eval.json", "eval.png", "samples_pure_red.png", "edit_pure.safetensors"} <= names
    doc = json.loads((out / "eval.json").read_text())
    res = {r["method"]: r for r in doc["results"]}
    before, after = res["none"]["concepts"]["red"], res["pure"]["concepts"]["red"]
    assert doc["provenance"]["command"].startswith("pure-fast eval") and doc["provenance"]["versions"]["torch"]
    assert before["target"]["rate"] >= 0.9
    # measured on the evaluation seeds (100+, never the collection seeds; 3-round closed loop): held-out
    # 1.0 -> 0.69, anchor 1.0 -> 0.88, retention 0.96, quality 0.86, H-mean 0 -> 0.49 (the old <= 0.5 bound
    # was measured on the collection seeds)
    assert after["target"]["heldout"] <= 0.8 and before["target"]["heldout"] >= 0.9
    assert after["target"]["rate"] <= before["target"]["rate"] - 0.1, (before["target"], after["target"])
    assert after["retention"]["rate"] >= 0.75 and after["quality"]["score"] >= 0.5
    assert after["hmean"] > before["hmean"] + 0.3
    assert not math.isnan(after["quality"]["score"])
    from PIL import Image

    assert Image.open(out / "eval.png").size[0] > 100 and Image.open(out / "samples_pure_red.png").size[0] > 100


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--forget", "tiger", "--quick"], "unknown toy concept"),
    (["eval", "--forget", "red", "--retain", "red"], "both forgotten and retained"),
    (["eval", "--forget", "red", "--method", "bogus"], "unknown method"),
    (["eval", "--forget", "red", "--model", "/nonexistent"], "only runs on the toy model"),
    (["eval", "--forget", "red", "--seeds", "0"], "--seeds"),
])
def test_eval_cli_bad_input(argv, needle, tmp_path, capsys):
    from pure_fast.cli import main

    out = tmp_path / "never"
    rc = main(argv + ["--out-dir", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_weights_available(tmp_path):
    from pure_fast.adapters.toy import weights_available

    assert weights_available(tmp_path) is False  # an empty folder has no weights
    from pure_fast.toy.model import WEIGHTS_DIR

    assert weights_available(WEIGHTS_DIR) == weights_available()


@pytest.mark.slow
def test_toy_demo_writes_outputs(toy, tmp_path):
    import argparse

    from pure_fast.evaluate.toy_demo import run_toy_demo

    out = tmp_path / "demo"
    assert run_toy_demo(argparse.Namespace(out_dir=str(out), quiet=True, tiny=False)) == 0
    assert {"edit.safetensors", "before_after.png", "prompts.txt", "summary.json"} <= set(os.listdir(out))
    s = json.loads((out / "summary.json").read_text())
    # measured on the demo's evaluation seeds 100/101 (never the collection seeds): held-out 1.00 -> 0.00 with
    # PURE's tuned toy default (contrast basis, one round; it was 0.58 with the variance basis and the loop),
    # issue 14's <= 0.15; retention 1.00 (bench/results/demo_summary.json)
    assert s["before"]["target"]["heldout"] >= 0.9 and s["after"]["target"]["heldout"] <= 0.15
    assert s["edit"]["file"] == "edit.safetensors" and s["edit"]["options"]["basis"] == "contrast"
    assert s["after"]["retention"]["rate"] >= 0.9 and s["verdict"].startswith("verdict: red is erased")


def test_demo_verdict_line_says_whether_the_concept_is_erased():
    from pure_fast.evaluate.toy_demo import verdict

    a = {"target": {"heldout": 0.10}, "retention": {"rate": 0.97}}
    assert verdict(a, "red").startswith("verdict: red is erased (held-out target rate 0.10")
    assert "neighbours kept" in verdict(a, "red")
    b = {"target": {"heldout": 0.40}, "retention": {"rate": 0.90}}
    assert "only partly erased" in verdict(b, "red") and "not fully kept" in verdict(b, "red")
