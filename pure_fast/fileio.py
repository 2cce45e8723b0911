"""Safe file writing and reading: temp file + atomic rename; safetensors headers checked before use."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile

from .errors import EditFileError, PureFastError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise PureFastError(f"output folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (which must not exist)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise PureFastError(f"output folder's parent {parent} does not exist; create it first")
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            raise PureFastError(f"{path} appeared while writing; not overwritten")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> str:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


def read_safetensors_header(path: str, err=EditFileError) -> dict:
    """Parse and sanity-check a safetensors header without reading tensor data."""
    if not os.path.exists(path):
        raise err(f"{path} does not exist")
    if os.path.isdir(path):
        raise err(f"{path} is a folder, not a .safetensors file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise err(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise err(f"{path} is not a valid safetensors file (bad header length {n})")
            raw = f.read(n)
    except OSError as exc:
        raise err(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise err(f"{path} is not a valid safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise err(f"{path} is not a valid safetensors file (header is not an object)")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise err(f"{path}: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list):
            raise err(f"{path}: tensor {name!r} has a malformed header entry")
        off = info["data_offsets"]
        if len(off) != 2 or not all(isinstance(o, int) and o >= 0 for o in off) or off[0] > off[1] or off[1] > data_len:
            raise err(f"{path}: tensor {name!r} points outside the file")
        if not all(isinstance(s, int) and 0 <= s < 2**40 for s in info["shape"]):
            raise err(f"{path}: tensor {name!r} has an absurd shape {info['shape']}")
    return header


def load_safetensors(path: str, err=EditFileError) -> tuple[dict, dict]:
    """(tensors, metadata) after the header check; safetensors verifies sizes against dtypes."""
    header = read_safetensors_header(path, err)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise err(f"{path} is not a valid safetensors file: {str(exc).splitlines()[0]}") from None
    return tensors, header.get("__metadata__", {}) or {}
