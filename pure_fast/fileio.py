"""Safe file writing and reading: temp file + atomic rename; safetensors headers checked before use.

Writing: ``atomic_path`` / ``atomic_dir`` write beside the target and rename at the end, so an error or an
interrupt leaves neither a partial output nor a temp file. An existing folder is never replaced by a file.

Reading: only safetensors (and JSON) is read. ``read_safetensors_header`` refuses, with one line, a missing
path, a folder, a pickle file (by suffix, or by its first bytes: the pickle protocol opcode or the zip
magic of ``torch.save``), a header length that is zero, larger than 100 MB or past the end of the file,
a header that is not a JSON object, ``__metadata__`` that is not a string map, and tensor entries whose
shape or data offsets are malformed or point outside the file. safetensors then checks each tensor's byte
size against its dtype and shape when the data is read.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile

from .errors import EditFileError, PureFastError, UsageError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _default_mode(base: int) -> int:
    """``base`` masked by the process umask: the mode open() / mkdir() would give a new file / folder."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise PureFastError(f"{path} is a folder; give a file path for this output")
    if not os.path.isdir(folder):
        raise PureFastError(f"output folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600; give the result the mode a plain open() would (or keep the replaced file's)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if os.path.isfile(path) else _default_mode(0o666))
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
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp creates 0700; a new folder gets the usual umask mode
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path, text: str) -> str:
    """Write a text file (UTF-8) through a temp file and an atomic rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return os.fspath(path)


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> str:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def _pickle_refusal(path: str) -> str:
    return (f"{path} is a pickle/torch.save file, which is never loaded (unpickling can run code); "
            "only .safetensors files are read (edit files are written by pure-fast erase; convert other "
            "checkpoints to .safetensors in a trusted environment)")


def read_safetensors_header(path: str, err=EditFileError) -> dict:
    """Parse and sanity-check a safetensors header without reading tensor data."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise err(f"{path} does not exist")
    if os.path.isdir(path):
        raise err(f"{path} is a folder, not a .safetensors file")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise err(_pickle_refusal(path))
    if not os.path.isfile(path):
        raise err(f"{path} is not a regular file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            # a pickle (protocol >= 2: 0x80, version) or torch.save zip never has a valid header length
            pickled = (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"
            if len(head) < 8:
                raise err(_pickle_refusal(path) if pickled else f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                if pickled:
                    raise err(_pickle_refusal(path))
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


# output folders a command created for its outputs; removed again (when still empty) if the command fails
_CREATED_DIRS: list[str] = []


def make_parents(path: str, flag: str = "--out") -> str:
    """Create the missing parent folders of the output ``path`` (as users expect); returns the absolute path."""
    out = os.path.abspath(path)
    missing, p = [], os.path.dirname(out)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"{flag} {path}: {p} is a file, not a folder")
    for d in reversed(missing):
        os.mkdir(d)
        _CREATED_DIRS.append(d)
    return out
