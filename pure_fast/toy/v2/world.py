"""Toy world v2: glyphs and shapes in colours on patterned backgrounds, 32x32 RGB, with captions.

Four concept categories, 64 concepts: ``glyph`` (A-Z and 0-9 from the bitmap font in ``font.py``; 36
identity-like members), ``shape`` (10), ``colour`` (10, told apart by hue), ``background`` (8 grey-level
patterns). An image shows ONE foreground object -- a glyph or a shape -- drawn in a colour on a background,
so an image has three attributes (``SLOTS``: object, colour, background) and its labels are
``{"glyph" or "shape": object, "colour": ..., "background": ...}``.

The interface is v1's (``pure_fast/toy/world.py``) generalised from three categories that are also the
three slots to four categories over three slots: templates have the slots ``{object}``, ``{colour}`` and
``{background}``; ``fill`` takes slot names or category names (``glyph=`` / ``shape=`` fill ``{object}``);
``canonical_prompt(obj, colour, background)`` and ``render(obj, colour, background, ...)`` take a glyph or a
shape as ``obj``; ``sample_caption``'s ``mentioned`` is keyed by the image's categories. Surface forms and
templates are split into an *anchor* part (what erasure methods see) and a *held-out* part (evaluation
only); the model is trained on both.

Rendering is a pure function of a seed: ``render_params`` draws every random quantity from a numpy
Generator in a fixed order; ``draw`` turns parameters into pixels with torch (batched, CPU or GPU, so the
trainer renders on its device). Objects are looked up in a 128x128 canonical mask (nearest cell) at 4x
supersampling and box-filtered, which anti-aliases edges; backgrounds are sampled the same way.
"""
from __future__ import annotations

import colorsys
import functools
from typing import Iterator, Sequence

import numpy as np
import torch

from . import font

SIZE = 32  # pixels (glyph strokes are ~3.3 px wide at 32 px)

CATEGORIES: dict[str, list[str]] = {
    "glyph": list(font.CHARACTERS),
    "shape": ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart", "crescent", "arrow"],
    "colour": ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "purple", "magenta"],
    "background": ["plain", "stripes", "checker", "dots", "gradient", "grid", "diagonal", "waves"],
}
OBJECT_CATEGORIES = ("glyph", "shape")
SLOTS = ("object", "colour", "background")
SLOT_OF = {"glyph": "object", "shape": "object", "colour": "colour", "background": "background"}
OBJECTS: list[str] = CATEGORIES["glyph"] + CATEGORIES["shape"]

# Hue (degrees) of each colour; renders jitter it by at most +-HUE_JITTER. Neighbouring centres are >= 28
# degrees apart, so the hue detector's cells (half-way to the neighbours) are >= 14 degrees wide per side.
HUES: dict[str, float] = {"red": 0.0, "orange": 30.0, "yellow": 58.0, "lime": 88.0, "green": 122.0,
                          "teal": 158.0, "cyan": 190.0, "blue": 225.0, "purple": 265.0, "magenta": 305.0}
HUE_JITTER = 4.0

_DIGIT_WORDS = dict(zip("0123456789", ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                       "nine"]))


def _glyph_forms(ch: str) -> dict[str, list[str]]:
    if ch.isdigit():
        return {"anchor": [f"digit {ch}", f"number {ch}", f"numeral {ch}"],
                "heldout": [f"figure {ch}", f"number {_DIGIT_WORDS[ch]}"]}
    return {"anchor": [f"letter {ch}", f"capital {ch}", f"uppercase {ch}"],
            "heldout": [f"upper-case letter {ch}", f"glyph {ch}"]}


# Surface forms: the first anchor form is the canonical name. Object forms are nouns, colour and background
# forms adjectives ("a crimson letter Q on a stripy background").
SURFACE_FORMS: dict[str, dict[str, list[str]]] = {
    **{ch: _glyph_forms(ch) for ch in CATEGORIES["glyph"]},
    # shapes
    "circle": {"anchor": ["circle", "disc", "round shape"], "heldout": ["disk", "round blob"]},
    "square": {"anchor": ["square", "box", "block"], "heldout": ["four-sided tile", "quadrilateral with equal sides"]},
    "triangle": {"anchor": ["triangle", "three-sided shape", "wedge"], "heldout": ["pyramid outline", "trigon"]},
    "star": {"anchor": ["star", "five-pointed star", "starburst"], "heldout": ["pentagram", "spiky star shape"]},
    "cross": {"anchor": ["cross", "plus sign", "plus shape"], "heldout": ["swiss cross", "addition symbol"]},
    "diamond": {"anchor": ["diamond", "rhombus", "lozenge"], "heldout": ["tilted square", "kite-like rhomb"]},
    "hexagon": {"anchor": ["hexagon", "six-sided shape", "hex"], "heldout": ["honeycomb cell", "six-sided polygon"]},
    "heart": {"anchor": ["heart", "heart shape", "love heart"], "heldout": ["valentine", "cardioid symbol"]},
    "crescent": {"anchor": ["crescent", "crescent moon", "sickle"], "heldout": ["lunar crescent", "moon sliver"]},
    "arrow": {"anchor": ["arrow", "right arrow", "arrowhead"], "heldout": ["pointer", "direction sign"]},
    # colours
    "red": {"anchor": ["red", "crimson", "scarlet"], "heldout": ["tomato-red", "cherry-coloured"]},
    "orange": {"anchor": ["orange", "tangerine", "amber"], "heldout": ["pumpkin-coloured", "apricot"]},
    "yellow": {"anchor": ["yellow", "lemon", "golden"], "heldout": ["canary-yellow", "banana-coloured"]},
    "lime": {"anchor": ["lime", "chartreuse", "lime-green"], "heldout": ["yellow-green", "acid-green"]},
    "green": {"anchor": ["green", "emerald", "jade"], "heldout": ["grass-green", "leafy green"]},
    "teal": {"anchor": ["teal", "turquoise", "aquamarine"], "heldout": ["cyan-green", "peacock-coloured"]},
    "cyan": {"anchor": ["cyan", "aqua", "sky-blue"], "heldout": ["ice-blue", "cerulean"]},
    "blue": {"anchor": ["blue", "cobalt", "ultramarine"], "heldout": ["sapphire", "royal-blue"]},
    "purple": {"anchor": ["purple", "violet", "amethyst"], "heldout": ["lavender", "plum-coloured"]},
    "magenta": {"anchor": ["magenta", "fuchsia", "hot-pink"], "heldout": ["rose-coloured", "pink-purple"]},
    # backgrounds
    "plain": {"anchor": ["plain", "blank", "solid grey"], "heldout": ["empty", "uniform"]},
    "stripes": {"anchor": ["striped", "stripy", "pinstriped"], "heldout": ["lined", "banded"]},
    "checker": {"anchor": ["checkered", "chequerboard", "checked"], "heldout": ["chessboard", "tiled"]},
    "dots": {"anchor": ["dotted", "polka-dot", "spotted"], "heldout": ["speckled", "dotty"]},
    "gradient": {"anchor": ["gradient", "fading", "shaded"], "heldout": ["ombre", "smoothly darkening"]},
    "grid": {"anchor": ["grid", "gridded", "graph-paper"], "heldout": ["lattice", "mesh"]},
    "diagonal": {"anchor": ["diagonal-striped", "slanted", "diagonally hatched"], "heldout": ["oblique-lined", "slashed"]},
    "waves": {"anchor": ["wavy", "rippled", "undulating"], "heldout": ["wave-patterned", "squiggly"]},
}

# Templates: slots {object} {colour} {background}; a template may omit slots (the render then draws that
# attribute at random and the caption does not constrain it).
TEMPLATES: dict[str, list[str]] = {
    "anchor": [
        "a {colour} {object} on a {background} background",
        "a {colour} {object}",
        "a {object} on a {background} background",
        "{colour} {object}, {background} background",
        "a picture of a {colour} {object} over a {background} background",
        "a {object} coloured {colour}",
        "a {colour} symbol on a {background} background",
        "a {background} background",
        "an icon of a {colour} {object}",
        "a small image of a {object}",
    ],
    "heldout": [
        "an image showing a {colour} {object} against a {background} backdrop",
        "{background} backdrop with a {colour} {object} in the middle",
        "the {object} is {colour}",
        "a drawing of a {object}, painted {colour}",
        "something {colour} in front of a {background} pattern",
        "a {colour} {object} drawn on a {background} canvas",
    ],
}
CANONICAL_TEMPLATE = TEMPLATES["anchor"][0]
SPLITS = ("anchor", "heldout", "all")

_CONCEPT_CATEGORY = {c: cat for cat, members in CATEGORIES.items() for c in members}

# Dev / test split, fixed here: about a third of each category is dev (glyphs: every third character,
# A D G ... 1 4 7). Defaults chosen on the toy world may be chosen on DEV concepts only; reported numbers
# use TEST concepts only. v1's dev concepts stay dev.
DEV_CONCEPTS: dict[str, list[str]] = {
    "glyph": list(font.CHARACTERS[::3]),
    "shape": ["square", "cross", "heart"],
    "colour": ["orange", "green", "cyan"],
    "background": ["plain", "dots", "grid"],
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


def slot_of(concept: str) -> str:
    """The template slot a concept fills: 'object' (glyphs and shapes), 'colour' or 'background'."""
    return SLOT_OF[category_of(concept)]


def split_of(concept: str) -> str:
    """'dev' or 'test' (see DEV_CONCEPTS)."""
    return "dev" if concept in DEV_CONCEPTS[category_of(concept)] else "test"


def neighbours(concept: str) -> list[str]:
    """The other members of the concept's category."""
    return [c for c in CATEGORIES[category_of(concept)] if c != concept]


def slot_members(slot: str) -> list[str]:
    return OBJECTS if slot == "object" else CATEGORIES[slot]


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
    """The slots ('object', 'colour', 'background') a template mentions."""
    return [s for s in SLOTS if "{" + s + "}" in template]


def labels_of(obj: str | None, colour: str, background: str) -> dict[str, str]:
    """The label dict of an image: ``{category_of(obj): obj, "colour": ..., "background": ...}``."""
    out = {category_of(obj): obj} if obj is not None else {}
    return {**out, "colour": colour, "background": background}


def object_of(labels: dict) -> str | None:
    """The object (glyph or shape) of a label dict, None when it names none."""
    for cat in OBJECT_CATEGORIES:
        if labels.get(cat) is not None:
            return labels[cat]
    return labels.get("object")


# ---- captions ---------------------------------------------------------------------------------------
def _fix_articles(text: str) -> str:
    """a/an by the next word. Only lower-case "a"/"an" (or a capitalised one opening the text) are
    articles: "letter A" is a glyph."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        w, nxt = words[i], words[i + 1]
        if nxt and (w in ("a", "an") or (i == 0 and w in ("A", "An"))):
            want = "an" if nxt[0].lower() in "aeiou" else "a"
            words[i] = want if w[0].islower() else want.capitalize()
    return " ".join(words)


def fill(template: str, **forms: str | None) -> str:
    """Fill a template with surface forms (strings used as given), fixing a/an. Keys are slot names or
    category names (``glyph=`` and ``shape=`` fill ``{object}``)."""
    by_slot = {s: "" for s in SLOTS}
    for key, value in forms.items():
        slot = key if key in SLOTS else SLOT_OF.get(key)
        if slot is None:
            raise KeyError(f"unknown slot {key!r}; use one of {SLOTS} or a category")
        if value:
            by_slot[slot] = value
    return _fix_articles(" ".join(template.format(**by_slot).split()))  # an empty slot leaves no double space


def sample_caption(
    labels: dict[str, str], rng: np.random.Generator, *, template_split: str = "all", form_split: str = "all"
) -> tuple[str, dict[str, bool]]:
    """A caption for an image with ``labels``. Returns (caption, mentioned), where ``mentioned[category]``
    says whether the caption constrains that attribute (keys: the image's categories)."""
    tpls = templates(template_split)
    tpl = tpls[int(rng.integers(len(tpls)))]
    slots = template_slots(tpl)
    cats = [c for c in CATEGORIES if labels.get(c) is not None]
    forms = {}
    for cat in cats:
        if SLOT_OF[cat] in slots:
            choices = surface_forms(labels[cat], form_split)
            forms[SLOT_OF[cat]] = choices[int(rng.integers(len(choices)))]
    return fill(tpl, **forms), {cat: SLOT_OF[cat] in slots for cat in cats}


def _prompts(concept: str, n: int | None, split: str, seed: int) -> list[str]:
    """Prompts mentioning ``concept`` (forms and templates of ``split``); the other mentioned slots cycle
    over their members. Deterministic; without ``n`` every (template, form) pair once."""
    slot = slot_of(concept)
    tpls = [t for t in templates(split) if slot in template_slots(t)]
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
        kw = {slot: f}
        for other in template_slots(t):
            if other != slot:
                members = slot_members(other)
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


def canonical_prompt(obj: str, colour: str, background: str) -> str:
    """The canonical template filled with the canonical names of an object (glyph or shape), a colour and a
    background."""
    return fill(CANONICAL_TEMPLATE, object=canonical_name(obj), colour=canonical_name(colour),
                background=canonical_name(background))


def canonical_prompts(concept: str) -> list[tuple[str, dict[str, str]]]:
    """The canonical prompts of ``concept``: the canonical template with canonical names, the concept fixed
    and the two other slots enumerated (the object slot over glyphs and shapes). Returns (prompt, labels)."""
    slot = slot_of(concept)
    others = [s for s in SLOTS if s != slot]
    out = []
    for a in slot_members(others[0]):
        for b in slot_members(others[1]):
            pick = {slot: concept, others[0]: a, others[1]: b}
            out.append((canonical_prompt(pick["object"], pick["colour"], pick["background"]),
                        labels_of(pick["object"], pick["colour"], pick["background"])))
    return out


# ---- rendering --------------------------------------------------------------------------------------
SUPERSAMPLE = 4
MASK_RES = 128  # canonical object masks: MASK_RES^2 cells covering [-MASK_EXTENT, MASK_EXTENT]^2
MASK_EXTENT = 1.2


def _polygon(points):
    return [(float(x), float(y)) for x, y in points]


def _draw_shape(d, name: str, to_px) -> None:
    """Draw shape ``name`` (unit half-extent, centre 0) with PIL's ``d``; ``to_px`` maps units to cells."""
    def poly(pts, fill=255):
        d.polygon([to_px(x, y) for x, y in pts], fill=fill)

    def disc(cx, cy, r, fill=255):
        (x0, y0), (x1, y1) = to_px(cx - r, cy - r), to_px(cx + r, cy + r)
        d.ellipse([x0, y0, x1, y1], fill=fill)

    def rect(x0, y0, x1, y1):
        poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])

    if name == "circle":
        disc(0, 0, 1.0)
    elif name == "square":
        rect(-0.85, -0.85, 0.85, 0.85)
    elif name == "triangle":
        poly([(0, -1.0), (1.05, 0.8), (-1.05, 0.8)])
    elif name == "star":
        poly([((1.08 if k % 2 == 0 else 0.42) * np.cos(-np.pi / 2 + k * np.pi / 5),
               (1.08 if k % 2 == 0 else 0.42) * np.sin(-np.pi / 2 + k * np.pi / 5)) for k in range(10)])
    elif name == "cross":
        rect(-0.36, -1.0, 0.36, 1.0)
        rect(-1.0, -0.36, 1.0, 0.36)
    elif name == "diamond":
        poly([(0, -1.1), (0.72, 0), (0, 1.1), (-0.72, 0)])
    elif name == "hexagon":
        poly([(np.cos(k * np.pi / 3), np.sin(k * np.pi / 3)) for k in range(6)])
    elif name == "heart":
        disc(-0.45, -0.38, 0.52)
        disc(0.45, -0.38, 0.52)
        poly([(-0.95, -0.22), (0.95, -0.22), (0, 0.98)])
    elif name == "crescent":
        disc(0, 0, 1.0)
        disc(0.5, -0.2, 0.82, fill=0)
    elif name == "arrow":
        rect(-1.0, -0.3, 0.1, 0.3)
        poly([(0.05, -0.85), (1.05, 0), (0.05, 0.85)])
    else:
        raise KeyError(f"unknown shape {name!r}")


@functools.lru_cache(maxsize=None)
def _canonical_masks_np() -> np.ndarray:
    """float32 [len(OBJECTS) + 1, MASK_RES, MASK_RES] in {0, 1}; the last one is empty (no object).
    Glyphs span [-1, 1] vertically (7 font rows) and [-5/7, 5/7] horizontally; shapes have half-extent 1."""
    from PIL import Image, ImageDraw

    cell = MASK_RES / (2 * MASK_EXTENT)

    def to_px(x, y):
        return ((x + MASK_EXTENT) * cell, (y + MASK_EXTENT) * cell)

    out = np.zeros((len(OBJECTS) + 1, MASK_RES, MASK_RES), np.float32)
    for k, name in enumerate(OBJECTS):
        img = Image.new("L", (MASK_RES, MASK_RES), 0)
        d = ImageDraw.Draw(img)
        if category_of(name) == "glyph":
            bm = font.bitmap(name)
            u = 2.0 / font.ROWS  # one font cell in units
            x0, y0 = -font.COLS * u / 2, -1.0
            for r, c in zip(*np.nonzero(bm)):
                a, b = to_px(x0 + c * u, y0 + r * u)
                e, f = to_px(x0 + (c + 1) * u, y0 + (r + 1) * u)
                d.rectangle([a, b, e - 1, f - 1], fill=255)  # PIL rectangles include their end cells
        else:
            _draw_shape(d, name, to_px)
        out[k] = np.asarray(img, dtype=np.float32) / 255.0 >= 0.5
    return out


@functools.lru_cache(maxsize=4)
def _canonical_masks(device: str) -> torch.Tensor:
    return torch.from_numpy(_canonical_masks_np()).to(device)


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else int(rng))


def colour_rgb(colour: str, rng: np.random.Generator | None = None) -> np.ndarray:
    h = HUES[colour]
    if rng is None:
        sat, val = 0.92, 0.95
    else:
        rng = _rng(rng)
        h = h + rng.uniform(-HUE_JITTER, HUE_JITTER)
        sat, val = rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0)
    return np.array(colorsys.hsv_to_rgb((h % 360.0) / 360.0, sat, val))


def render_params(obj: str | None, colour: str, background: str, rng=None) -> dict:
    """Every random quantity of one render, drawn from ``rng`` (a Generator or an int seed) in a fixed
    order. ``obj`` None: no object (background only; the detectors' "none" class)."""
    rng = _rng(rng)
    if background not in CATEGORIES["background"]:
        raise KeyError(f"unknown background {background!r}")
    if obj is not None and obj not in OBJECTS:
        raise KeyError(f"unknown object {obj!r}")
    lo, hi, level = rng.uniform(0.10, 0.22), rng.uniform(0.45, 0.60), rng.uniform(0.25, 0.45)
    glyph = obj is not None and category_of(obj) == "glyph"
    scale = rng.uniform(0.34, 0.38) if glyph else rng.uniform(0.31, 0.36)  # half-extent / image size
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04)
    rgb = colour_rgb(colour, rng)
    return {"object": OBJECTS.index(obj) if obj is not None else len(OBJECTS),
            "background": CATEGORIES["background"].index(background), "lo": lo, "hi": hi, "level": level,
            "scale": scale, "cx": cx, "cy": cy, "rgb": rgb}


def _pattern(name: str, lo, hi, level, x, y, size: int) -> torch.Tensor:
    """Grey levels of background ``name`` at pixel coordinates x, y ([1, N, N]) for per-image levels
    lo, hi, level ([B, 1, 1]); pattern geometry scales with size/16 (periods in pixels at 32 px)."""
    s = size / 16.0

    def on(mask, a, b):
        return torch.where(mask, a, b)

    if name == "plain":
        return level.expand(-1, *x.shape[1:])
    if name == "stripes":  # vertical, 4 px on / 4 px off
        return on(torch.floor(x / (2 * s)) % 2 == 0, hi, lo)
    if name == "checker":  # 8 px cells
        return on((torch.floor(x / (4 * s)) + torch.floor(y / (4 * s))) % 2 == 0, hi, lo)
    if name == "dots":  # 4x4 px dots on an 8 px grid
        return on((torch.floor(x / s) % 4 < 2) & (torch.floor(y / s) % 4 < 2), hi + 0.1, lo)
    if name == "gradient":  # dark top -> light bottom
        return lo + (hi + 0.1 - lo) * (y / size)
    if name == "grid":  # 2 px lines every 8 px
        return on((torch.floor(x / s) % 4 == 0) | (torch.floor(y / s) % 4 == 0), hi, lo)
    if name == "diagonal":  # 45-degree stripes
        return on(torch.floor((x + y) / (2 * s)) % 2 == 0, hi, lo)
    if name == "waves":  # horizontal stripes bent by a sine of period 16 px
        return on(torch.floor((y + 1.5 * s * torch.sin(2 * np.pi * x / (8 * s))) / (2 * s)) % 2 == 0, hi, lo)
    raise KeyError(f"unknown background {name!r}")


def _backgrounds(kind: torch.Tensor, lo, hi, level, xx, yy, size: int) -> torch.Tensor:
    """Grey levels [B, N, N]: image b gets pattern ``CATEGORIES['background'][kind[b]]``."""
    out = torch.empty((len(kind), *xx.shape), dtype=xx.dtype, device=xx.device)
    for k, name in enumerate(CATEGORIES["background"]):
        sel = (kind == k).nonzero().flatten()
        if len(sel):
            out[sel] = _pattern(name, lo[sel, None, None], hi[sel, None, None], level[sel, None, None],
                                xx[None], yy[None], size)
    return out


def draw(params: Sequence[dict], size: int = SIZE, device="cpu") -> torch.Tensor:
    """Float images [B, H, W, 3] in [0, 1] (not rounded) for a list of ``render_params`` results."""
    dev = torch.device(device)
    dt = torch.float32  # sub-sample coordinates are multiples of 1/8: exact

    def col(key):
        return torch.tensor([p[key] for p in params], dtype=dt, device=dev)

    n = size * SUPERSAMPLE
    c = (torch.arange(n, dtype=dt, device=dev) + 0.5) / SUPERSAMPLE  # pixel coordinates of sub-samples
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    kind = torch.tensor([p["background"] for p in params], device=dev)
    bg = _backgrounds(kind, col("lo"), col("hi"), col("level"), xx, yy, size)
    # object: sub-sample -> unit coordinates -> nearest cell of the canonical mask
    r = (col("scale") * size)[:, None, None]
    ux = (xx[None] - (col("cx") * size)[:, None, None]) / r
    uy = (yy[None] - (col("cy") * size)[:, None, None]) / r
    ix = torch.floor((ux + MASK_EXTENT) / (2 * MASK_EXTENT) * MASK_RES).long()
    iy = torch.floor((uy + MASK_EXTENT) / (2 * MASK_EXTENT) * MASK_RES).long()
    inside = (ix >= 0) & (ix < MASK_RES) & (iy >= 0) & (iy < MASK_RES)
    obj = torch.tensor([p["object"] for p in params], device=dev)[:, None, None]
    masks = _canonical_masks(str(dev))
    alpha = torch.where(inside, masks[obj, iy.clamp(0, MASK_RES - 1), ix.clamp(0, MASK_RES - 1)].to(dt), 0.0)
    rgb = torch.tensor(np.stack([p["rgb"] for p in params]), dtype=dt, device=dev)[:, None, None, :]
    img = (1 - alpha[..., None]) * bg[..., None] + alpha[..., None] * rgb
    img = img.view(len(params), size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((2, 4))
    return img.float()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    return torch.clamp(torch.round(img.double() * 255.0), 0, 255).to(torch.uint8).cpu().numpy()


def render(obj: str | None, colour: str, background: str, rng=None, size: int = SIZE) -> np.ndarray:
    """Render one image: uint8 [size, size, 3]. ``obj`` is a glyph or a shape (None: background only);
    ``rng`` is a numpy Generator or an int seed."""
    return to_uint8(draw([render_params(obj, colour, background, rng)], size))[0]


def random_labels(rng: np.random.Generator) -> dict[str, str]:
    """Uniform over objects (glyphs and shapes alike), colours and backgrounds."""
    obj = OBJECTS[int(rng.integers(len(OBJECTS)))]
    colour = CATEGORIES["colour"][int(rng.integers(len(CATEGORIES["colour"])))]
    background = CATEGORIES["background"][int(rng.integers(len(CATEGORIES["background"])))]
    return labels_of(obj, colour, background)


def sample(rng: np.random.Generator, size: int = SIZE, *, template_split: str = "all", form_split: str = "all"):
    """One (image uint8 [H,W,3], caption, labels) triple; labels also holds 'mentioned' per category."""
    labels = random_labels(rng)
    img = render(object_of(labels), labels["colour"], labels["background"], rng, size)
    caption, mentioned = sample_caption(labels, rng, template_split=template_split, form_split=form_split)
    return img, caption, {**labels, "mentioned": mentioned}


def dataset(
    seed: int, n: int | None = None, size: int = SIZE, *, template_split: str = "all", form_split: str = "all"
) -> Iterator[tuple[np.ndarray, str, dict]]:
    """Deterministic stream of (image, caption, labels) from ``seed`` (endless when ``n`` is None)."""
    rng = np.random.default_rng(seed)
    i = 0
    while n is None or i < n:
        yield sample(rng, size, template_split=template_split, form_split=form_split)
        i += 1


def batch(seed: int, n: int, size: int = SIZE, **kw) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` samples from ``dataset(seed)`` stacked: images uint8 [n, H, W, 3], captions, labels."""
    imgs, caps, labs = [], [], []
    for img, cap, lab in dataset(seed, n, size, **kw):
        imgs.append(img)
        caps.append(cap)
        labs.append(lab)
    return np.stack(imgs), caps, labs


def render_reference(
    labels: Sequence[dict[str, str]] | dict[str, str], seed: int = 0, size: int = SIZE
) -> np.ndarray:
    """Reference renders (uint8 [B, H, W, 3]) for label dicts; missing attributes are drawn at random (a
    dict naming neither a glyph nor a shape gets a random object). Image i uses seed ``seed + i``."""
    if isinstance(labels, dict):
        labels = [labels]
    params = []
    for i, lab in enumerate(labels):
        rng = np.random.default_rng(seed + i)
        full = random_labels(rng)
        obj = object_of(lab) or object_of(full)
        params.append(render_params(obj, lab.get("colour") or full["colour"],
                                    lab.get("background") or full["background"], rng))
    return to_uint8(draw(params, size))
