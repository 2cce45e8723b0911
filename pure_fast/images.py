"""Image grids (PNG) for before/after comparisons."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw


def _upscale(img: Image.Image, min_side: int) -> Image.Image:
    if img.width >= min_side:
        return img
    f = -(-min_side // img.width)
    return img.resize((img.width * f, img.height * f), Image.NEAREST)


LABEL_CHARS = 28  # row labels (prompts) wrap at this many characters per line


def _wrap(label: str, height: int) -> str:
    """A row label wrapped to LABEL_CHARS per line, with as many lines as the row's height holds."""
    import textwrap

    lines = textwrap.wrap(label, LABEL_CHARS) or [""]
    fit = max(1, height // 12)
    if len(lines) > fit:
        lines = lines[:fit]
        lines[-1] = lines[-1][: LABEL_CHARS - 3] + "..."
    return "\n".join(lines)


def grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
         col_labels: Sequence[str] | None = None, min_side: int = 96, gap: int = 4,
         split_after: int | None = None) -> Image.Image:
    """A grid of images; ``split_after`` draws a wider gap after that many columns (before | after)."""
    rows = [[_upscale(im.convert("RGB"), min_side) for im in r] for r in rows]
    w = max(im.width for r in rows for im in r)
    h = max(im.height for r in rows for im in r)
    ncol = max(len(r) for r in rows)
    row_labels = [_wrap(lab, h) for lab in row_labels] if row_labels else row_labels
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = (max(probe.textlength(line) for lab in row_labels for line in lab.split("\n")) + 8
               if row_labels else 0)
    label_w = int(max(label_w, 40)) if row_labels else 0
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
            n = lab.count("\n") + 1
            draw.multiline_text((2, head_h + r * (h + gap) + max(0, h // 2 - 6 * n)), lab, fill=(0, 0, 0), spacing=2)
    return canvas
