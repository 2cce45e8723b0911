"""Toy world v2: deterministic renders, distinct glyphs, caption splits, the dev/test split, detectors."""
import itertools

import numpy as np
import pytest

from pure_fast.toy.v2 import font, world


def test_world_sizes():
    sizes = {cat: len(m) for cat, m in world.CATEGORIES.items()}
    assert sum(sizes.values()) >= 50 and len(sizes) >= 4
    assert sizes["glyph"] >= 20 and sizes["shape"] >= 10 and sizes["colour"] >= 10 and sizes["background"] >= 8
    assert set("ABCDEFGHIJKLMNOPQRSTUVWXYZ") <= set(world.CATEGORIES["glyph"])
    assert len(set(world.all_concepts())) == len(world.all_concepts())
    # colours are told apart by hue: neighbouring centres >= 28 degrees apart, far beyond the jitter
    hues = sorted(world.HUES.values())
    gaps = np.diff(hues + [hues[0] + 360])
    assert gaps.min() >= 28 > 2 * world.HUE_JITTER


def test_render_is_a_pure_function_of_the_seed():
    a = world.render("Q", "blue", "waves", 123)
    b = world.render("Q", "blue", "waves", np.random.default_rng(123))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, world.render("Q", "blue", "waves", 124))
    i1, c1, l1 = world.batch(5, 6)
    i2, c2, l2 = world.batch(5, 6)
    assert np.array_equal(i1, i2) and c1 == c2 and l1 == l2
    # batched drawing gives each image exactly its single render
    rng = np.random.default_rng(9)
    objs = ["A", "star", None, "7"]
    params = [world.render_params(o, "red", bg, np.random.default_rng(k)) for k, (o, bg) in
              enumerate(zip(objs, ["plain", "grid", "dots", "diagonal"]))]
    batch = world.to_uint8(world.draw(params))
    for k, (o, bg) in enumerate(zip(objs, ["plain", "grid", "dots", "diagonal"])):
        assert np.array_equal(batch[k], world.render(o, "red", bg, k))
    del rng


def test_every_concept_renders_and_changes_the_picture():
    base = world.render("circle", "red", "plain", 0)
    for c in world.all_concepts():
        cat = world.category_of(c)
        lab = {"object": "circle", "colour": "red", "background": "plain"}
        lab[world.SLOT_OF[cat]] = c
        img = world.render(lab["object"], lab["colour"], lab["background"], 0)
        assert img.shape == (32, 32, 3)
        if c not in ("circle", "red", "plain"):
            assert not np.array_equal(img, base), c


def test_every_glyph_is_distinct():
    chars = font.CHARACTERS
    bms = {c: font.bitmap(c) for c in chars}
    for a, b in itertools.combinations(chars, 2):
        assert (bms[a] != bms[b]).sum() >= 3, (a, b)
    # rendered with identical parameters (same colour, background, placement), glyphs differ in pixels:
    # at least 20 of the 1024 pixels by more than 64 grey levels (one font cell is ~11 pixels; the closest
    # pairs differ in 3 cells)
    renders = {c: world.render(c, "blue", "plain", 7).astype(int) for c in chars}
    for a, b in itertools.combinations(chars, 2):
        differ = (np.abs(renders[a] - renders[b]).max(-1) > 64).sum()
        assert differ >= 20, (a, b, differ)


def test_surface_forms_and_templates_split_disjoint():
    assert not set(world.templates("anchor")) & set(world.templates("heldout"))
    assert world.CANONICAL_TEMPLATE in world.templates("anchor")
    seen: dict[str, str] = {}
    for c in world.all_concepts():
        anch, held = world.surface_forms(c, "anchor"), world.surface_forms(c, "heldout")
        assert len(anch) >= 2 and len(held) >= 2
        assert not set(anch) & set(held)
        for f in anch + held:  # no form names two concepts
            assert seen.setdefault(f, c) == c, (f, c, seen[f])
    assert world.surface_forms("Q", "anchor") == ["letter Q", "capital Q", "uppercase Q"]


def test_prompts_use_their_split():
    for c in ["Q", "7", "star", "teal", "waves"]:
        anch, held = world.surface_forms(c, "anchor"), world.surface_forms(c, "heldout")
        for p in world.anchor_prompts(c, 12):
            assert any(f in p for f in anch), p
        for p in world.heldout_prompts(c, 8):
            assert any(f in p for f in held), p
        held_stems = [t.split("{")[0] for t in world.templates("heldout") if len(t.split("{")[0]) > 4]
        assert not any(p.startswith(s) for p in world.anchor_prompts(c) for s in held_stems)
    # a/an: articles fixed, the glyph "A" left alone
    assert world.canonical_prompt("A", "orange", "grid") == "an orange letter A on a grid background"
    assert world.fill("a {colour} {object}", colour="amber", glyph="uppercase A") == "an amber uppercase A"
    prompts = world.canonical_prompts("Q")
    assert len(prompts) == 10 * 8 and all(lab["glyph"] == "Q" for _, lab in prompts)
    assert prompts[0][0] == "a red letter Q on a plain background"
    colour_prompts = world.canonical_prompts("teal")
    assert len(colour_prompts) == len(world.OBJECTS) * 8
    assert {world.object_of(lab) for _, lab in colour_prompts} == set(world.OBJECTS)


def test_sample_caption_mentions_what_it_constrains():
    rng = np.random.default_rng(0)
    for _ in range(80):
        labels = world.random_labels(rng)
        cap, mentioned = world.sample_caption(labels, rng, template_split="anchor", form_split="anchor")
        assert set(mentioned) == {c for c in labels}
        for cat, on in mentioned.items():
            forms = world.surface_forms(labels[cat], "anchor")
            assert any(f in cap for f in forms) == on or not on, (cap, labels)
            if on:
                assert any(f in cap for f in forms), (cap, labels)


def test_dev_test_split_is_fixed_and_a_third():
    assert world.DEV_CONCEPTS["glyph"] == list("ADGJMPSVY147")
    for cat, members in world.CATEGORIES.items():
        dev, test = world.DEV_CONCEPTS[cat], world.TEST_CONCEPTS[cat]
        assert set(dev) | set(test) == set(members) and not set(dev) & set(test)
        assert 0.25 <= len(dev) / len(members) <= 0.4, cat
        assert all(world.split_of(c) == "dev" for c in dev) and all(world.split_of(c) == "test" for c in test)
    # the multi-concept benchmark erases up to 20 test glyphs and keeps others
    assert len(world.TEST_CONCEPTS["glyph"]) >= 20 + 3
    with pytest.raises(KeyError):
        world.split_of("not a concept")


@pytest.fixture(scope="module")
def detectors():
    from pure_fast.toy.v2 import detectors as d

    if not (d.WEIGHTS_DIR / "detector.safetensors").exists():
        pytest.skip("v2 detector weights not shipped")
    return d


def test_detectors_shipped_accuracy(detectors):
    import json

    info = json.loads((detectors.WEIGHTS_DIR / "detector.json").read_text())["heldout"]
    for cat, acc in info["category_accuracy"].items():
        assert acc >= 0.98, (cat, acc)
    for c in world.CATEGORIES["glyph"]:
        assert info["concept_accuracy"][c] >= 0.98, (c, info["concept_accuracy"][c])


def test_detectors_on_fresh_renders(detectors):
    # every glyph and shape detectable on renders the detector never saw (seed distinct from its training
    # and held-out sets)
    objs = world.OBJECTS
    params = [world.render_params(o, world.CATEGORIES["colour"][k % 10], world.CATEGORIES["background"][k % 8],
                                  np.random.default_rng(50_000 + k)) for k, o in enumerate(objs * 3)]
    imgs = world.to_uint8(world.draw(params))
    det = detectors.detect(imgs)
    want = objs * 3
    acc = np.mean([d == w for d, w in zip(det["object"], want)])
    assert acc >= 0.97, [(w, d) for d, w in zip(det["object"], want) if d != w]
    assert det["glyph"][0] == "A" and det["shape"][0] == "none"
    assert det["probs"]["glyph"].shape == (len(imgs), len(world.CATEGORIES["glyph"]))
    col = np.mean([d == world.CATEGORIES["colour"][k % 10] for k, d in enumerate(det["colour"])])
    bg = np.mean([d == world.CATEGORIES["background"][k % 8] for k, d in enumerate(det["background"])])
    assert col >= 0.97 and bg >= 0.97, (col, bg)
    assert detectors.features(imgs[:4]).shape == (4, 128)
    empty = world.render(None, "red", "stripes", 3)
    d = detectors.detect(empty)
    assert d["colour"] == ["none"] and d["object"] == ["none"]
