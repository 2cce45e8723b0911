"""PURE end to end on a tiny pipeline: measured effect on the pooled cross-attention outputs.

Random weights make every prompt's activations share one dominant direction; the assertions below are
the ones that hold for PURE's formula regardless: with no retain set the forget-specific signal is
removed completely (and unrelated prompts are damaged); with a retain set the retain prompts barely move
while part of the forget signal is removed.
"""
import pytest

import pure_fast
from pure_fast.adapters import wrap_pipeline
from pure_fast.collect.activations import CollectOptions
from pure_fast.evaluate.metrics import edit_effect
from pure_fast.prompts import anchor_sets
from pure_fast.testing import FAST_COLLECT

OPTS = CollectOptions(size=32, seeds=(0,), steps=4, record_steps=2)


@pytest.fixture(scope="module")
def ad(tiny_sd1):
    return wrap_pipeline(tiny_sd1)


def test_no_retain_erases_forget_signal_and_hurts_others(ad):
    f, _ = anchor_sets(["Van Gogh"], [], "style")
    others = anchor_sets(["Claude Monet"], [], "style")[0]["Claude Monet"]
    with pytest.warns(UserWarning, match="no retain"):
        edit = pure_fast.erase(ad, ["Van Gogh"], [], category="style", **FAST_COLLECT)
    res = edit_effect(ad, edit, f, [], eval_retain=others, opts=OPTS)
    assert res["forget_energy_kept"] < 1e-3
    assert res["retain_change"] > 0.3  # nothing protects the shared directions


def test_retain_set_protects_neighbours(ad):
    f, r = anchor_sets(["Van Gogh"], ["Claude Monet", "Picasso"], "style")
    edit = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet", "Picasso"], category="style", **FAST_COLLECT)
    res = edit_effect(ad, edit, f, r, opts=OPTS)
    assert res["retain_change"] < 0.05
    assert res["forget_energy_kept"] < 0.95


def test_multi_concept_in_one_call(ad):
    f, r = anchor_sets(["Van Gogh", "Picasso"], [], "style")
    with pytest.warns(UserWarning):
        edit = pure_fast.erase(ad, ["Van Gogh", "Picasso"], [], category="style", **FAST_COLLECT)
    for concept in ("Van Gogh", "Picasso"):
        res = edit_effect(ad, edit, {concept: f[concept]}, [], opts=OPTS)
        assert res["forget_energy_kept"] < 1e-3


def test_deterministic_edit_file(ad, tmp_path):
    a = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], category="style", **FAST_COLLECT)
    b = pure_fast.erase(ad, ["Van Gogh"], ["Claude Monet"], category="style", **FAST_COLLECT)
    for e in (a, b):
        e.created, e.edit_id, e.stats = "t", "id", {}
    a.save(str(tmp_path / "a.safetensors"))
    b.save(str(tmp_path / "b.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
