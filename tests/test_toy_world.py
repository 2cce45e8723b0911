"""The toy world: deterministic renders, caption splits, detectors on renders."""
import numpy as np
import pytest

from pure_fast.toy import world


def test_render_is_deterministic():
    a = world.render("star", "blue", "checker", 123)
    b = world.render("star", "blue", "checker", np.random.default_rng(123))
    assert a.dtype == np.uint8 and a.shape == (16, 16, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, world.render("star", "blue", "checker", 124))
    i1, c1, l1 = world.batch(5, 6)
    i2, c2, l2 = world.batch(5, 6)
    assert np.array_equal(i1, i2) and c1 == c2 and l1 == l2


@pytest.mark.parametrize("size", [16, 32])
def test_every_concept_renders(size):
    for s in world.CATEGORIES["shape"]:
        for c in world.CATEGORIES["colour"]:
            for b in world.CATEGORIES["background"]:
                img = world.render(s, c, b, 0, size)
                assert img.shape == (size, size, 3)
    # different concepts give different pictures
    base = world.render("circle", "red", "plain", 0)
    assert not np.array_equal(base, world.render("square", "red", "plain", 0))
    assert not np.array_equal(base, world.render("circle", "blue", "plain", 0))
    assert not np.array_equal(base, world.render("circle", "red", "stripes", 0))


def test_world_sizes():
    assert all(len(v) >= 5 for v in world.CATEGORIES.values())
    assert len(world.templates("all")) >= 12
    assert world.templates("anchor") and world.templates("heldout")
    assert not set(world.templates("anchor")) & set(world.templates("heldout"))
    for c in world.all_concepts():
        assert len(world.surface_forms(c, "all")) >= 4
        assert not set(world.surface_forms(c, "anchor")) & set(world.surface_forms(c, "heldout"))
        assert world.category_of(c) in world.CATEGORIES
        assert c not in world.neighbours(c)
        assert set(world.neighbours(c)) < set(world.CATEGORIES[world.category_of(c)])


def test_prompt_splits_use_their_forms():
    for c in ["red", "star", "stripes"]:
        held = set(world.surface_forms(c, "heldout"))
        anch = set(world.surface_forms(c, "anchor"))
        for p in world.anchor_prompts(c, 12):
            assert any(f in p for f in anch)
            assert not any(t.split("{")[0] and t.split("{")[0] in p for t in [] )
        for p in world.heldout_prompts(c, 8):
            assert any(f in p for f in held)
        # anchor prompts come from anchor templates only
        stems = [t.replace("{", "|").split("|")[0] for t in world.templates("heldout")]
        heldout_only = [s for s in stems if len(s) > 4]
        for p in world.anchor_prompts(c, 12):
            assert not any(p.startswith(s) for s in heldout_only)
    prompts = world.canonical_prompts("red")
    assert len(prompts) == 25 and all(lab["colour"] == "red" for _, lab in prompts)
    assert prompts[0][0] == "a red circle on a plain background"


def test_sample_caption_constrains_only_mentioned():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = world.random_labels(rng)
        cap, mentioned = world.sample_caption(labels, rng, template_split="anchor", form_split="anchor")
        for cat, on in mentioned.items():
            forms = world.surface_forms(labels[cat], "anchor")
            if on:
                assert any(f in cap for f in forms), (cap, labels)


def test_detectors_on_fresh_renders():
    from pure_fast.toy import detectors

    imgs, _, labs = world.batch(2024, 600)
    det = detectors.detect(imgs)
    for cat in world.CATEGORIES:
        acc = np.mean([d == l[cat] for d, l in zip(det[cat], labs)])
        assert acc >= 0.97, (cat, acc)
    assert det["probs"]["shape"].shape == (600, len(world.CATEGORIES["shape"]))
    assert detectors.features(imgs[:4]).shape[0] == 4
    # a 32 px render is resized for the CNN
    big = world.render_reference({"shape": "cross", "colour": "green", "background": "checker"}, size=32)
    d = detectors.detect(big)
    assert d["colour"] == ["green"]
