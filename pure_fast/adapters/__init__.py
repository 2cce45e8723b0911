"""Model families. ``load_model(spec)`` returns a ModelAdapter for a local folder, a single file, or 'toy'."""
from __future__ import annotations

from .base import Conditioning, CrossAttnLayer, ModelAdapter, TokenEmbeddings

__all__ = ["Conditioning", "CrossAttnLayer", "ModelAdapter", "TokenEmbeddings", "load_model", "wrap_pipeline"]


def load_model(spec=None, *, config=None, device="cpu", dtype=None, parts="all"):
    """Load a model: None or 'toy' -> the shipped toy model; a diffusers folder; or a .safetensors file
    plus ``config`` (a local diffusers folder). Returns a ModelAdapter. ``parts='text'``: only the text
    encoder(s) and the K/V weights (read lazily), what UCE, CURE and SPACE use; ``'kv'``: only the K/V weights."""
    from .loading import load_model as _load

    return _load(spec, config=config, device=device, dtype=dtype, parts=parts)


def wrap_pipeline(pipe, device=None, dtype=None) -> ModelAdapter:
    """An adapter for an already loaded diffusers pipeline (or a ModelAdapter, returned as is)."""
    from .loading import wrap_pipeline as _wrap

    return _wrap(pipe, device=device, dtype=dtype)
