"""Training data for the toy model: a caption bank with precomputed MiniLM states, and image batches.

MiniLM costs ~1.6 s per 64 captions on one CPU thread, more than a UNet step, so training draws captions
from a fixed bank encoded once (and cached as safetensors): for every (shape, colour, background) triple,
the canonical caption plus ``per_triple - 1`` captions sampled from all templates and surface forms.
A training sample picks a triple uniformly, one of its captions, and renders the triple (attributes the
caption does not mention are therefore uniformly random given the caption).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import torch

from . import world

BANK_VERSION = 1


def triples() -> list[tuple[str, str, str]]:
    return list(itertools.product(world.CATEGORIES["shape"], world.CATEGORIES["colour"], world.CATEGORIES["background"]))


def bank_captions(per_triple: int = 40, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out = []
    for s, c, b in triples():
        caps = [world.canonical_prompt(s, c, b)]
        labels = {"shape": s, "colour": c, "background": b}
        while len(caps) < per_triple:
            caps.append(world.sample_caption(labels, rng)[0])
        out.append(caps)
    return out


def _key(per_triple: int, seed: int, max_tokens: int) -> str:
    caps = bank_captions(per_triple, seed)
    h = hashlib.sha256(json.dumps([BANK_VERSION, caps, max_tokens]).encode()).hexdigest()[:16]
    return h


def build_bank(per_triple: int = 40, seed: int = 0, cache_dir: str | None = None, batch: int = 256, progress=True):
    """Returns dict(embeds fp16 [U, T, 384], index long [n_triples, per_triple] into embeds, null long index,
    captions list[str] of the U unique captions). Cached in ``cache_dir`` when given."""
    from safetensors.torch import load_file, save_file

    from .text import MAX_TOKENS, encode_tokens

    caps = bank_captions(per_triple, seed)
    unique = sorted(set(itertools.chain.from_iterable(caps)) | {""})
    key = _key(per_triple, seed, MAX_TOKENS)
    path = os.path.join(cache_dir, f"caption_bank_{key}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        t = load_file(path)
        embeds = t["embeds"]
    else:
        from ..progress import progress_bar

        parts = []
        with progress_bar(total=len(unique), desc="encode captions", enabled=progress) as bar:
            for i in range(0, len(unique), batch):
                e, _, _ = encode_tokens(unique[i : i + batch])
                parts.append(e.half())
                bar.update(len(unique[i : i + batch]))
        embeds = torch.cat(parts)
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            save_file({"embeds": embeds}, path + ".tmp")
            os.replace(path + ".tmp", path)
    pos = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([[pos[c] for c in row] for row in caps], dtype=torch.long)
    return {"embeds": embeds, "index": index, "null": pos[""], "captions": unique}


def image_batch(rng: np.random.Generator, n: int, size: int, per_triple: int):
    """(images float [n, 3, H, W] in [-1, 1], triple index [n], caption slot [n])."""
    tr = triples()
    ti = rng.integers(len(tr), size=n)
    ci = rng.integers(per_triple, size=n)
    imgs = np.stack([world.render(*tr[t], rng, size) for t in ti])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, torch.from_numpy(ti), torch.from_numpy(ci)


if __name__ == "__main__":  # python -m pure_fast.toy.data CACHE_DIR [per_triple]
    import sys

    torch.set_num_threads(1)
    b = build_bank(int(sys.argv[2]) if len(sys.argv) > 2 else 40, cache_dir=sys.argv[1])
    print(len(b["captions"]), tuple(b["embeds"].shape))
