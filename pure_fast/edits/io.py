"""Native edit files: safetensors tensors + the edit's JSON metadata under ``__metadata__['pure_fast']``.

Edit files are untrusted input. ``load_edit`` checks, in this order, and raises :class:`EditFileError` with
one line naming the file and the first problem:

1. the safetensors container (``fileio.read_safetensors_header``: header length, JSON object, every entry's
   shape and data offsets inside the file; then safetensors itself checks sizes against dtypes);
2. the metadata schema: required fields and their JSON types, optional fields' types, fingerprints as
   string maps, ``concepts['forget'|'retain'|'retain_prompts']`` as lists of strings, a supported format,
   version and kind, at most ``MAX_WEIGHTS`` weights each with a 2-D shape of positive ints < 2**20 and at
   most ``MAX_WEIGHT_ELEMENTS`` elements (a CSR weight is decoded densely: this bounds the allocation);
3. tensor dtypes (floats only for low-rank edits; int16/32/64 also allowed for CSR indices) and finite
   values (NaN/Inf refused);
4. the kind's own ``from_tensors``: tensor names, shapes that make the declared change, no extra tensors.

Checks against the target model (layer names, shapes, fingerprints, finiteness of the result) happen when
the edit is applied (``Edit.apply``). Nothing is ever unpickled.
"""
from __future__ import annotations

import json

import torch

from ..errors import EditFileError
from ..fileio import load_safetensors, save_safetensors
from ..ops.finite import finite_stats

KINDS: dict[str, type] = {}  # edit kind -> its Edit class; every kind registers (``edits/__init__`` imports them all)


def register(cls):
    KINDS[cls.kind] = cls
    return cls

REQUIRED = {"format": str, "format_version": int, "kind": str, "method": str, "family": str, "concepts": dict,
            "options": dict, "weights": dict}
OPTIONAL = {"base_fingerprint": dict, "result_fingerprint": dict, "created": str, "version": str, "edit_id": str,
            "stats": dict}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TENSOR_DTYPES = FLOAT_DTYPES + (torch.int16, torch.int32, torch.int64)  # integer tensors: CSR indices
FLOAT_ONLY_KINDS = ("lowrank",)
LIST_OF_STR_CONCEPTS = ("forget", "retain", "retain_prompts")
MAX_WEIGHTS = 4096  # SDXL has 140 K/V weights; a header listing more is not an edit for any supported model
MAX_WEIGHT_ELEMENTS = 1 << 26  # 64 Mi elements; SDXL's largest K/V weight has 1280 x 2048 = 2.6 Mi (a CSR edit
#                                is decoded densely, so this bounds what a hostile header can make us allocate)


def save_edit(edit, path: str) -> str:
    """Write an Edit (anything with ``meta()`` and ``tensors()``) as a native edit file (atomic)."""
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
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise EditFileError(f"{path}: metadata field {key!r} is missing or not a {typ.__name__}")
    for key, typ in OPTIONAL.items():
        if key in meta and not isinstance(meta[key], typ):
            raise EditFileError(f"{path}: metadata field {key!r} is not a {typ.__name__}")
    for key in ("base_fingerprint", "result_fingerprint"):
        fp = meta.get(key, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in fp.items()):
            raise EditFileError(f"{path}: metadata field {key!r} must map strings to strings")
    for key in LIST_OF_STR_CONCEPTS:
        v = meta["concepts"].get(key, [])
        if not (isinstance(v, list) and all(isinstance(c, str) for c in v)):
            raise EditFileError(f"{path}: concepts[{key!r}] must be a list of strings")
    if meta["format"] != "pure_fast.edit":
        raise EditFileError(f"{path}: unknown format {meta['format']!r}")
    if meta["format_version"] != 1:
        raise EditFileError(f"{path}: edit format version {meta['format_version']} is not supported; upgrade pure_fast")
    if meta["kind"] not in KINDS:
        raise EditFileError(f"{path}: unknown edit kind {meta['kind']!r} (known: {', '.join(sorted(KINDS))})")
    if len(meta["weights"]) > MAX_WEIGHTS:
        raise EditFileError(f"{path}: the edit lists {len(meta['weights'])} weights (at most {MAX_WEIGHTS} expected)")
    for name, shape in meta["weights"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and 0 < s < 1 << 20 for s in shape)):
            raise EditFileError(f"{path}: weight {name!r} has an invalid shape {shape!r}")
        if shape[0] * shape[1] > MAX_WEIGHT_ELEMENTS:
            raise EditFileError(f"{path}: weight {name!r} of shape {shape} is larger than any supported K/V weight "
                                f"({MAX_WEIGHT_ELEMENTS} elements); refusing to decode it")
    return meta


def load_edit(path: str):
    """Load and validate an edit file (never unpickles anything); returns the Edit of its kind."""
    tensors, raw_meta = load_safetensors(path)
    meta = parse_meta(raw_meta, path)
    for name, t in tensors.items():
        allowed = FLOAT_DTYPES if meta["kind"] in FLOAT_ONLY_KINDS else TENSOR_DTYPES
        if t.dtype not in allowed:
            raise EditFileError(
                f"{path}: tensor {name} has dtype {str(t.dtype).replace('torch.', '')}; an edit of kind "
                f"{meta['kind']!r} stores only {', '.join(sorted(str(d).replace('torch.', '') for d in allowed))}"
            )
        if t.is_floating_point():
            if finite_stats(t)[0]:
                raise EditFileError(f"{path}: tensor {name} contains NaN/Inf values")
    try:
        return KINDS[meta["kind"]].from_tensors(meta, tensors)
    except EditFileError as exc:
        raise EditFileError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EditFileError(f"{path}: malformed edit ({type(exc).__name__}: {exc})") from None

