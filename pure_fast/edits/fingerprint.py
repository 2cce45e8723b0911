"""Fingerprints of the cross-attention K/V weights an edit was made for.

A fingerprint is a BLAKE2b digest of (name, shape, bytes) of every ``attn2.to_k/to_v`` weight in canonical
order. Models are often loaded in another precision than the one an edit was made in, so three digests are
kept: of the weights as they are ('exact', with their dtype), and of their round-to-nearest casts to float16
and bfloat16. Two sets match when they share a digest of the same kind (and, for 'exact', the same dtype).
Digests are computed per tensor in threads (hashlib releases the GIL).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import torch

KINDS = ("exact", "float16", "bfloat16")


def _digest_one(name: str, t: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(name.encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(str(t.dtype).encode())
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    h.update(memoryview(data))
    return h.digest()


def digest(weights: Mapping[str, torch.Tensor], cast: torch.dtype | None = None) -> str:
    names = sorted(weights)
    tensors = [weights[n] if cast is None else weights[n].to(cast) for n in names]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parts = list(pool.map(_digest_one, names, tensors))
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


def fingerprints(weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    dtypes = {str(t.dtype).replace("torch.", "") for t in weights.values()}
    out = {"dtype": ",".join(sorted(dtypes)), "exact": digest(weights)}
    for kind, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        out[kind] = digest(weights, dt)
    return out


def matches(recorded: Mapping[str, str], weights: Mapping[str, torch.Tensor]) -> bool:
    """True when ``weights`` are the weights ``recorded`` describes (possibly in another precision)."""
    dtypes = ",".join(sorted({str(t.dtype).replace("torch.", "") for t in weights.values()}))
    if recorded.get("dtype") == dtypes and recorded.get("exact") == digest(weights):
        return True
    for kind, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        if recorded.get(kind) and recorded[kind] == digest(weights, dt):
            return True
    return False


def short(fp: Mapping[str, str] | None) -> str:
    if not fp:
        return "-"
    return f"{fp.get('exact', '')[:12]} ({fp.get('dtype', '?')})"
