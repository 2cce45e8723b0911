"""Image grids (PNG) for before/after comparisons."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw


def _upscale(img: Image.Image, min_side: int) -> Image.Image:
    if img.width >= min_side:
        return img
    f = -(-min_side // img.width)
    return img.resize((img.width * f, img.height * f), Image.NEAREST)


def grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
         col_labels: Sequence[str] | None = None, min_side: int = 96, gap: int = 4,
         split_after: int | None = None) -> Image.Image:
    """A grid of images; ``split_after`` draws a wider gap after that many columns (before | after)."""
    rows = [[_upscale(im.convert("RGB"), min_side) for im in r] for r in rows]
    w = max(im.width for r in rows for im in r)
    h = max(im.height for r in rows for im in r)
    ncol = max(len(r) for r in rows)
    label_w = 40 if row_labels else 0
    head_h = 16 if col_labels else 0
    extra = 12 if split_after else 0
    W = label_w + ncol * (w + gap) + extra
    H = head_h + len(rows) * (h + gap)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c in range(ncol):
        x = label_w + c * (w + gap) + (extra if split_after and c >= split_after else 0)
        if col_labels and c < len(col_labels):
            draw.text((x + 2, 2), col_labels[c], fill=(0, 0, 0))
        for r, row in enumerate(rows):
            if c < len(row):
                canvas.paste(row[c], (x, head_h + r * (h + gap)))
    if row_labels:
        for r, lab in enumerate(row_labels):
            draw.text((2, head_h + r * (h + gap) + h // 2 - 5), lab, fill=(0, 0, 0))
    return canvas
