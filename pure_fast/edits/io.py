"""Native edit files: safetensors tensors + the edit's JSON metadata under ``__metadata__['pure_fast']``."""
from __future__ import annotations

import json

from ..errors import EditFileError
from ..fileio import load_safetensors, save_safetensors
from .edit import KINDS, Edit

REQUIRED = {"format": str, "format_version": int, "kind": str, "method": str, "family": str, "concepts": dict,
            "options": dict, "weights": dict}


def save_edit(edit: Edit, path: str) -> str:
    meta = json.dumps(edit.meta(), sort_keys=True)
    return save_safetensors(edit.tensors(), path, metadata={"pure_fast": meta})


def parse_meta(raw: dict, path: str) -> dict:
    if "pure_fast" not in raw:
        raise EditFileError(f"{path} is a safetensors file but not a pure_fast edit (no pure_fast metadata)")
    try:
        meta = json.loads(raw["pure_fast"])
    except json.JSONDecodeError:
        raise EditFileError(f"{path}: the pure_fast metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise EditFileError(f"{path}: the pure_fast metadata is not a JSON object")
    for key, typ in REQUIRED.items():
        if not isinstance(meta.get(key), typ):
            raise EditFileError(f"{path}: metadata field {key!r} is missing or not a {typ.__name__}")
    if meta["format"] != "pure_fast.edit":
        raise EditFileError(f"{path}: unknown format {meta['format']!r}")
    if meta["format_version"] != 1:
        raise EditFileError(f"{path}: edit format version {meta['format_version']} is not supported; upgrade pure_fast")
    if meta["kind"] not in KINDS:
        raise EditFileError(f"{path}: unknown edit kind {meta['kind']!r} (known: {', '.join(sorted(KINDS))})")
    for name, shape in meta["weights"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and 0 < s < 1 << 20 for s in shape)):
            raise EditFileError(f"{path}: weight {name!r} has an invalid shape {shape!r}")
    return meta


def load_edit(path: str) -> Edit:
    """Load and validate an edit file (never unpickles anything)."""
    _register_all()
    tensors, raw_meta = load_safetensors(path)
    meta = parse_meta(raw_meta, path)
    for name, t in tensors.items():
        if t.is_floating_point():
            from ..ops.finite import finite_stats

            if finite_stats(t)[0]:
                raise EditFileError(f"{path}: tensor {name} contains NaN/Inf values")
    try:
        return KINDS[meta["kind"]].from_tensors(meta, tensors)
    except EditFileError as exc:
        raise EditFileError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EditFileError(f"{path}: malformed edit ({type(exc).__name__}: {exc})") from None


def _register_all():
    """Import every module that registers an edit kind."""
    import importlib

    for mod in ("shared", "sparse", "patch"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{mod}":
                raise
