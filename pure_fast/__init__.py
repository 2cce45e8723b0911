"""pure_fast: closed-form concept erasure for text-to-image diffusion models.

Import is lean: torch only. diffusers, transformers, triton and the native extension are imported
when a function that needs them is called.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "erase", "load_model", "load_edit", "Edit"]


def __getattr__(name):  # lazy public API
    if name == "erase":
        from .api import erase

        return erase
    if name == "load_model":
        from .adapters import load_model

        return load_model
    if name == "load_edit":
        from .edits.io import load_edit

        return load_edit
    if name == "Edit":
        from .edits.edit import Edit

        return Edit
    raise AttributeError(f"module 'pure_fast' has no attribute {name!r}")
