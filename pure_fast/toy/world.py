"""The toy world: a deterministic procedural renderer of small RGB images and their captions.

Three concept categories (shape, colour, background), each with five or six members. Every concept has
several surface forms and there are 16 caption templates; both are split into an *anchor* part (what
erasure methods see by default) and a *held-out* part (used only by the evaluation). The model is trained
on all of them.

Rendering: the background is drawn at the target size (grey levels only, low saturation, so the
foreground hue is measurable); the shape is drawn at 4x and box-filtered down to an alpha mask, then
composited in a saturated colour. Everything is a function of an explicit ``numpy.random.Generator`` or
an integer seed.
"""
from __future__ import annotations

import colorsys
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "cross"],
    "colour": ["red", "orange", "yellow", "green", "blue", "purple"],
    "background": ["plain", "stripes", "checker", "dots", "gradient"],
}

# Hue (degrees) of each colour; renders jitter it by at most +-HUE_JITTER.
HUES: dict[str, float] = {"red": 0.0, "orange": 30.0, "yellow": 58.0, "green": 120.0, "blue": 225.0, "purple": 285.0}
HUE_JITTER = 5.0

# Surface forms: the first anchor form is the canonical name. Colour and background forms are adjectives
# ("a crimson star", "on a stripy background"); shape forms are nouns.
SURFACE_FORMS: dict[str, dict[str, list[str]]] = {
    # shapes
    "circle": {"anchor": ["circle", "disc", "round shape"], "heldout": ["disk", "round blob"]},
    "square": {"anchor": ["square", "box", "block"], "heldout": ["four-sided tile", "quadrilateral with equal sides"]},
    "triangle": {"anchor": ["triangle", "three-sided shape", "wedge"], "heldout": ["pyramid outline", "trigon"]},
    "star": {"anchor": ["star", "five-pointed star", "starburst"], "heldout": ["pentagram", "spiky star shape"]},
    "cross": {"anchor": ["cross", "plus sign", "plus shape"], "heldout": ["swiss cross", "addition symbol"]},
    # colours
    "red": {"anchor": ["red", "crimson", "scarlet"], "heldout": ["tomato-red", "cherry-coloured"]},
    "orange": {"anchor": ["orange", "tangerine", "amber"], "heldout": ["pumpkin-coloured", "apricot"]},
    "yellow": {"anchor": ["yellow", "lemon", "golden"], "heldout": ["canary-yellow", "banana-coloured"]},
    "green": {"anchor": ["green", "emerald", "lime"], "heldout": ["grass-green", "leafy green"]},
    "blue": {"anchor": ["blue", "azure", "cobalt"], "heldout": ["sky-blue", "sapphire"]},
    "purple": {"anchor": ["purple", "violet", "magenta"], "heldout": ["lavender", "plum-coloured"]},
    # backgrounds
    "plain": {"anchor": ["plain", "blank", "solid grey"], "heldout": ["empty", "uniform"]},
    "stripes": {"anchor": ["striped", "stripy", "pinstriped"], "heldout": ["lined", "banded"]},
    "checker": {"anchor": ["checkered", "chequerboard", "checked"], "heldout": ["chessboard", "tiled"]},
    "dots": {"anchor": ["dotted", "polka-dot", "spotted"], "heldout": ["speckled", "dotty"]},
    "gradient": {"anchor": ["gradient", "fading", "shaded"], "heldout": ["ombre", "smoothly darkening"]},
}

# Templates: slots {shape} {colour} {background}; a template may omit slots (the render then draws that
# attribute at random and the caption does not constrain it).
TEMPLATES: dict[str, list[str]] = {
    "anchor": [
        "a {colour} {shape} on a {background} background",
        "a {colour} {shape}",
        "a {shape} on a {background} background",
        "{colour} {shape}, {background} background",
        "a picture of a {colour} {shape} over a {background} background",
        "a {shape} coloured {colour}",
        "a {colour} shape on a {background} background",
        "a {background} background",
        "an icon of a {colour} {shape}",
        "a small image of a {shape}",
    ],
    "heldout": [
        "an image showing a {colour} {shape} against a {background} backdrop",
        "{background} backdrop with a {colour} {shape} in the middle",
        "the {shape} is {colour}",
        "a drawing of a {shape}, painted {colour}",
        "something {colour} in front of a {background} pattern",
        "a {colour} {shape} drawn on a {background} canvas",
    ],
}
CANONICAL_TEMPLATE = TEMPLATES["anchor"][0]
SPLITS = ("anchor", "heldout", "all")

_CONCEPT_CATEGORY = {c: cat for cat, members in CATEGORIES.items() for c in members}

# Dev / test split of the concepts, fixed here (about a third of each category is dev). Any default chosen
# on the toy world (thresholds, sparsity, strengths, gates, protocol settings) may be chosen on DEV
# concepts only; reported numbers use TEST concepts only.
DEV_CONCEPTS: dict[str, list[str]] = {
    "shape": ["square", "cross"],
    "colour": ["orange", "green"],
    "background": ["plain", "dots"],
}
TEST_CONCEPTS: dict[str, list[str]] = {
    cat: [c for c in members if c not in DEV_CONCEPTS[cat]] for cat, members in CATEGORIES.items()
}


# ---- concepts ---------------------------------------------------------------------------------------
def all_concepts() -> list[str]:
    return [c for members in CATEGORIES.values() for c in members]


def category_of(concept: str) -> str:
    try:
        return _CONCEPT_CATEGORY[concept]
    except KeyError:
        raise KeyError(f"unknown toy concept {concept!r}; known: {', '.join(all_concepts())}") from None


def split_of(concept: str) -> str:
    """'dev' or 'test' (see DEV_CONCEPTS)."""
    return "dev" if concept in DEV_CONCEPTS[category_of(concept)] else "test"


def neighbours(concept: str) -> list[str]:
    """The other members of the concept's category."""
    return [c for c in CATEGORIES[category_of(concept)] if c != concept]


def surface_forms(concept: str, split: str = "anchor") -> list[str]:
    category_of(concept)
    forms = SURFACE_FORMS[concept]
    if split == "all":
        return forms["anchor"] + forms["heldout"]
    if split not in forms:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(forms[split])


def templates(split: str = "anchor") -> list[str]:
    if split == "all":
        return TEMPLATES["anchor"] + TEMPLATES["heldout"]
    if split not in TEMPLATES:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(TEMPLATES[split])


def template_slots(template: str) -> list[str]:
    return [cat for cat in CATEGORIES if "{" + cat + "}" in template]


# ---- captions ---------------------------------------------------------------------------------------
def _fix_articles(text: str) -> str:
    words = text.split(" ")
    for i in range(len(words) - 1):
        w = words[i]
        nxt = words[i + 1]
        if w.lower() in ("a", "an") and nxt:
            want = "an" if nxt[0].lower() in "aeiou" else "a"
            words[i] = want if w[0].islower() else want.capitalize()
    return " ".join(words)


def fill(template: str, shape: str | None = None, colour: str | None = None, background: str | None = None) -> str:
    """Fill a template with surface forms (strings used as given), fixing a/an."""
    return _fix_articles(template.format(shape=shape or "", colour=colour or "", background=background or ""))


def sample_caption(
    labels: dict[str, str], rng: np.random.Generator, *, template_split: str = "all", form_split: str = "all"
) -> tuple[str, dict[str, bool]]:
    """A caption for an image with ``labels`` ({category: concept}). Returns (caption, mentioned), where
    ``mentioned[category]`` says whether the caption constrains that attribute."""
    tpls = templates(template_split)
    tpl = tpls[int(rng.integers(len(tpls)))]
    slots = template_slots(tpl)
    forms = {}
    for cat in slots:
        choices = surface_forms(labels[cat], form_split)
        forms[cat] = choices[int(rng.integers(len(choices)))]
    return fill(tpl, **forms), {cat: cat in slots for cat in CATEGORIES}


def _prompts(concept: str, n: int | None, split: str, seed: int) -> list[str]:
    """Prompts mentioning ``concept`` (forms and templates of ``split``); the other mentioned attributes
    cycle over their categories. Deterministic; without ``n`` every (template, form) pair once."""
    cat = category_of(concept)
    tpls = [t for t in templates(split) if cat in template_slots(t)]
    forms = surface_forms(concept, split)
    rng = np.random.default_rng(seed)
    pairs = [(t, f) for t in tpls for f in forms]
    if n is None:
        n = len(pairs)
    out, seen = [], set()
    i = 0
    while len(out) < n and i < 50 * n + 100:
        t, f = pairs[i % len(pairs)]
        i += 1
        kw = {cat: f}
        for other in template_slots(t):
            if other != cat:
                members = CATEGORIES[other]
                other_forms = surface_forms(members[int(rng.integers(len(members)))], split)
                kw[other] = other_forms[int(rng.integers(len(other_forms)))]
        p = fill(t, **kw)
        if p in seen and i < 50 * n:
            continue
        seen.add(p)
        out.append(p)
    return out


def anchor_prompts(concept: str, n: int | None = None, seed: int = 0) -> list[str]:
    """Prompts for ``concept`` built only from anchor templates and anchor surface forms."""
    return _prompts(concept, n, "anchor", seed)


def heldout_prompts(concept: str, n: int | None = None, seed: int = 0) -> list[str]:
    """Prompts for ``concept`` built only from held-out templates and held-out surface forms."""
    return _prompts(concept, n, "heldout", seed)


def canonical_name(concept: str) -> str:
    """The canonical surface form of a concept (its first anchor form)."""
    return surface_forms(concept, "anchor")[0]


def canonical_prompt(shape: str, colour: str, background: str) -> str:
    """The canonical template filled with the canonical names of three concepts."""
    return fill(
        CANONICAL_TEMPLATE, shape=canonical_name(shape), colour=canonical_name(colour),
        background=canonical_name(background),
    )


def canonical_prompts(concept: str) -> list[tuple[str, dict[str, str]]]:
    """The canonical prompts of ``concept``: the canonical template with canonical names, the concept fixed
    and the two other categories enumerated. Returns (prompt, labels) pairs (labels: what it asks for)."""
    cat = category_of(concept)
    others = [c for c in CATEGORIES if c != cat]
    out = []
    for a in CATEGORIES[others[0]]:
        for b in CATEGORIES[others[1]]:
            labels = {cat: concept, others[0]: a, others[1]: b}
            out.append((canonical_prompt(labels["shape"], labels["colour"], labels["background"]), labels))
    return out


# ---- rendering --------------------------------------------------------------------------------------
SUPERSAMPLE = 4


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else int(rng))


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Grey-level background [size, size] in [0, 1]. Pattern geometry scales with size/16."""
    s = size / 16.0
    lo = rng.uniform(0.10, 0.22)
    hi = rng.uniform(0.45, 0.60)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if name == "plain":
        return np.full((size, size), rng.uniform(0.25, 0.45))
    if name == "stripes":  # vertical stripes, 2 px on / 2 px off at 16 px
        on = (np.floor(xx / (2 * s)) % 2) == 0
        return np.where(on, hi, lo)
    if name == "checker":  # 4 px cells at 16 px
        on = ((np.floor(xx / (4 * s)) + np.floor(yy / (4 * s))) % 2) == 0
        return np.where(on, hi, lo)
    if name == "dots":  # 2x2 dots on a 4 px grid at 16 px
        on = ((np.floor(xx / s) % 4) < 2) & ((np.floor(yy / s) % 4) < 2)
        return np.where(on, hi + 0.1, lo)
    if name == "gradient":  # top dark -> bottom light
        t = (yy + 0.5) / size
        return lo + (hi + 0.1 - lo) * t
    raise KeyError(f"unknown background {name!r}")


def _shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased alpha [size, size] in [0, 1]: a large, roughly centred shape."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(img)
    r = big * rng.uniform(0.31, 0.36)  # half-extent
    cx = big / 2 + rng.uniform(-0.04, 0.04) * big
    cy = big / 2 + rng.uniform(-0.04, 0.04) * big
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        h = r * 0.85
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 1.05, cy + r * 0.8), (cx - r * 1.05, cy + r * 0.8)], fill=255)
    elif name == "star":
        pts = []
        for k in range(10):
            ang = -np.pi / 2 + k * np.pi / 5
            rad = r * 1.08 if k % 2 == 0 else r * 0.42
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        d.polygon(pts, fill=255)
    elif name == "cross":
        w = r * 0.36
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
    else:
        raise KeyError(f"unknown shape {name!r}")
    a = np.asarray(img, dtype=np.float64) / 255.0
    return a.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def colour_rgb(colour: str, rng: np.random.Generator | None = None) -> np.ndarray:
    rng = _rng(rng) if rng is not None else None
    h = HUES[colour]
    if rng is None:
        sat, val = 0.92, 0.95
    else:
        h = h + rng.uniform(-HUE_JITTER, HUE_JITTER)
        sat, val = rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0)
    return np.array(colorsys.hsv_to_rgb((h % 360.0) / 360.0, sat, val))


def render(shape: str, colour: str, background: str, rng=None, size: int = 16) -> np.ndarray:
    """Render one image: uint8 [size, size, 3]. ``rng`` is a numpy Generator or an int seed."""
    rng = _rng(rng)
    bg = _background(background, size, rng)
    alpha = _shape_mask(shape, size, rng)[..., None]
    rgb = colour_rgb(colour, rng)[None, None, :]
    img = (1 - alpha) * bg[..., None] + alpha * rgb
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def random_labels(rng: np.random.Generator) -> dict[str, str]:
    return {cat: members[int(rng.integers(len(members)))] for cat, members in CATEGORIES.items()}


def sample(rng: np.random.Generator, size: int = 16, *, template_split: str = "all", form_split: str = "all"):
    """One (image uint8 [H,W,3], caption, labels) triple; labels also holds 'mentioned' per category."""
    labels = random_labels(rng)
    img = render(labels["shape"], labels["colour"], labels["background"], rng, size)
    caption, mentioned = sample_caption(labels, rng, template_split=template_split, form_split=form_split)
    return img, caption, {**labels, "mentioned": mentioned}


def dataset(
    seed: int, n: int | None = None, size: int = 16, *, template_split: str = "all", form_split: str = "all"
) -> Iterator[tuple[np.ndarray, str, dict]]:
    """Deterministic stream of (image, caption, labels) from ``seed`` (endless when ``n`` is None)."""
    rng = np.random.default_rng(seed)
    i = 0
    while n is None or i < n:
        yield sample(rng, size, template_split=template_split, form_split=form_split)
        i += 1


def batch(seed: int, n: int, size: int = 16, **kw) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` samples from ``dataset(seed)`` stacked: images uint8 [n, H, W, 3], captions, labels."""
    imgs, caps, labs = [], [], []
    for img, cap, lab in dataset(seed, n, size, **kw):
        imgs.append(img)
        caps.append(cap)
        labs.append(lab)
    return np.stack(imgs), caps, labs


def render_reference(
    labels: Sequence[dict[str, str]] | dict[str, str], seed: int = 0, size: int = 16
) -> np.ndarray:
    """Reference renders (uint8 [B, H, W, 3]) for label dicts; missing categories are drawn at random.
    Image i uses seed ``seed + i`` so references are reproducible."""
    if isinstance(labels, dict):
        labels = [labels]
    out = []
    for i, lab in enumerate(labels):
        rng = np.random.default_rng(seed + i)
        full = random_labels(rng)
        full.update({k: v for k, v in lab.items() if k in CATEGORIES})
        out.append(render(full["shape"], full["colour"], full["background"], rng, size))
    return np.stack(out)
