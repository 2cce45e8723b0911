"""A labelled grid of renders of every toy-world-v2 concept: ``python -m pure_fast.toy.v2.preview [--out PNG]``.

One tile per concept (its category's colour / background / object cycling so that every tile differs),
upscaled ``--scale`` times with nearest-neighbour so glyph cells stay visible; the concept's name and
split (dev/test) under each tile.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from . import world as W

DEFAULT_OUT = Path(__file__).resolve().parent / "preview.png"


def tiles(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    colours, bgs, objs = W.CATEGORIES["colour"], W.CATEGORIES["background"], W.OBJECTS
    out = []
    for k, c in enumerate(W.all_concepts()):
        cat = W.category_of(c)
        obj = c if cat in W.OBJECT_CATEGORIES else objs[(7 * k) % len(objs)]
        colour = c if cat == "colour" else colours[k % len(colours)]
        bg = c if cat == "background" else bgs[(k // 3) % len(bgs)]
        out.append((c, W.render(obj, colour, bg, seed + k)))
    return out


def grid_image(cols: int = 12, scale: int = 3, seed: int = 0):
    from PIL import Image, ImageDraw

    items = tiles(seed)
    size = items[0][1].shape[0] * scale
    label_h = 12
    rows = (len(items) + cols - 1) // cols
    img = Image.new("RGB", (cols * (size + 4), rows * (size + label_h + 4)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for i, (name, arr) in enumerate(items):
        x, y = (i % cols) * (size + 4) + 2, (i // cols) * (size + label_h + 4) + 2
        img.paste(Image.fromarray(arr).resize((size, size), Image.NEAREST), (x, y))
        d.text((x, y + size), f"{name} ({W.split_of(name)})", fill=(0, 0, 0))
    return img


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pure_fast.toy.v2.preview", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--scale", type=int, default=3)
    args = p.parse_args(argv)
    from ...fileio import atomic_path

    with atomic_path(args.out, suffix=".png") as tmp:
        grid_image(scale=args.scale).save(tmp, format="PNG")
    print(args.out)


if __name__ == "__main__":
    main()
