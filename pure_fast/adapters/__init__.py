"""Model families. ``load_model(spec)`` returns a ModelAdapter for a local folder, a single file, or 'toy'."""
from __future__ import annotations

from .base import Conditioning, CrossAttnLayer, ModelAdapter, TokenEmbeddings

__all__ = ["Conditioning", "CrossAttnLayer", "ModelAdapter", "TokenEmbeddings", "load_model", "wrap_pipeline"]


def load_model(spec=None, *, config=None, device="cpu", dtype=None):
    """Load a model: None or 'toy' -> the shipped toy model; a diffusers folder; or a .safetensors file
    plus ``config`` (a local diffusers folder). Returns a ModelAdapter."""
    from .loading import load_model as _load

    return _load(spec, config=config, device=device, dtype=dtype)


def wrap_pipeline(pipe, device=None, dtype=None) -> ModelAdapter:
    """An adapter for an already loaded diffusers pipeline (or a ModelAdapter, returned as is)."""
    from .loading import wrap_pipeline as _wrap

    return _wrap(pipe, device=device, dtype=dtype)
