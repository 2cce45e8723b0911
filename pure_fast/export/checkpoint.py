"""Writing edited models: a new folder, one single-file checkpoint, or the input folder itself (in place).

Design choices:

- **Byte patching, not re-serialising.** Edited UNet tensors are written by overwriting their byte ranges
  inside the existing ``.safetensors`` file (same name, dtype, shape, offsets; the header is kept verbatim),
  so every other byte of the model stays identical, metadata included, whatever tool wrote the file. New
  values are cast to the dtype the file stores (a float32 model loaded from float16 files is written back
  as float16).
- **New outputs** (``write_edited_folder``): the input folder is copied into a temporary folder beside the
  output, patched there, and renamed at the end; a failed run leaves nothing, and the input is only read.
  ``--out`` inside the input folder is refused.
- **In place** (``apply_in_place``) happens only when asked. The edit is applied in memory first (that
  checks fingerprints, shapes and finiteness); then a *revert file* is written (the original tensors as
  stored, plus a JSON record: which file holds each tensor, BLAKE2b digests of every changed tensor's bytes
  before and after, of each weight file's header, of ALL cross-attention K/V tensors after the edit, and
  the edits); only then is each weight file replaced
  atomically (a patched copy beside it, fsync, ``os.replace``). ``revert_in_place`` checks that the file
  still holds exactly the bytes the edit wrote and that no K/V weight changed since (else it refuses:
  a later in-place edit, or something else, changed the model) and
  writes the originals back the same way, so the file is bit-identical to the one before the edit.
  Several in-place edits give several revert files; they must be reverted last-first (the digest check
  enforces it).
- Revert files are named ``pure_fast_revert-<time>-<id>.safetensors`` and live in the folder of the
  first weight file they restore (``unet/`` for diffusers folders); they are never taken for weights.
- **Toy weights folders** (``config.json`` + ``unet.safetensors``, the layout of ``pure_fast/toy/weights``)
  are handled like diffusers folders; ``pure_fast.load_model(DIR)`` loads them (``load_toy(weights_dir=...)``),
  so every command takes them as ``--model DIR``.
"""
from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import uuid

import torch

from ..adapters import load_model
from ..errors import EditFileError, PureFastError, UsageError
from ..fileio import atomic_dir, atomic_path, load_safetensors, read_safetensors_header, save_safetensors
from ..toy.model import WEIGHTS_DIR
from .single_file import save_single_file

REVERT_PREFIX = "pure_fast_revert-"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def check_new_output(out: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise PureFastError(f"output {out} already exists; choose a new path (nothing was written)")
    return out


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ---- model folders ----------------------------------------------------------------------------------------
def is_toy_folder(folder: str) -> bool:
    """A toy weights folder: ``config.json`` + ``unet.safetensors`` and no ``model_index.json``."""
    return (os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "model_index.json"))
            and os.path.isfile(os.path.join(folder, "unet.safetensors"))
            and os.path.isfile(os.path.join(folder, "config.json")))


def toy_weights_dir() -> str:
    return str(WEIGHTS_DIR)


def model_folder(spec) -> str | None:
    """The folder whose files hold the model's UNet weights ('toy' -> the shipped weights), or None for a
    single-file checkpoint."""
    if spec is None or spec == "toy":
        return toy_weights_dir()
    return os.path.abspath(spec) if os.path.isdir(spec) else None


def load_model_any(spec, *, config=None, device="cpu", dtype=None, parts="all"):
    """``pure_fast.load_model`` plus toy weights folders (as written by ``pure-fast apply --model toy``)."""
    return load_model(spec, config=config, device=device, dtype=dtype, parts=parts)  # toy folders included


def unet_weight_files(folder: str) -> list[str]:
    """The ``.safetensors`` files holding the UNet weights of a diffusers or toy folder (revert files and
    temporary files excluded)."""
    if is_toy_folder(folder):
        return [os.path.join(folder, "unet.safetensors")]
    files = sorted(
        f for f in glob.glob(os.path.join(folder, "unet", "*.safetensors"))
        if not os.path.basename(f).startswith((REVERT_PREFIX, ".tmp-"))
    )
    if not files:
        raise PureFastError(
            f"{folder}/unet has no .safetensors weights (pickle .bin weights are not rewritten); "
            "re-save the pipeline with safe_serialization=True"
        )
    return files


_unet_weight_files = unet_weight_files  # old name


# ---- raw safetensors access ---------------------------------------------------------------------------------
def _header(path: str) -> tuple[dict, int, bytes]:
    """(parsed header, data start offset, raw header bytes) after fileio's sanity checks."""
    header = read_safetensors_header(path, PureFastError)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return header, 8 + n, raw


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _locate(files: list[str], names) -> dict[str, dict[str, dict]]:
    """file -> {name: header entry} for every file holding one of ``names`` (a folder with weight variants,
    e.g. ``diffusion_pytorch_model.fp16.safetensors`` beside the float32 file, has each name in several
    files: all of them are written); an error names the first name no file holds."""
    where: dict[str, dict[str, dict]] = {}
    found: set[str] = set()
    for path in files:
        header, _, _ = _header(path)
        for k, info in header.items():
            if k != "__metadata__" and k in names:
                where.setdefault(path, {})[k] = info
                found.add(k)
    missing = sorted(set(names) - found)
    if missing:
        raise PureFastError(f"{len(missing)} edited tensor(s) not found in the model's UNet files (e.g. {missing[0]})")
    return where


def _encode(name: str, value: torch.Tensor, info: dict) -> bytes:
    dt = _ST_DTYPES.get(info["dtype"])
    if dt is None:
        raise PureFastError(f"{name}: the file stores dtype {info['dtype']}, which is not rewritten")
    if list(value.shape) != list(info["shape"]):
        raise PureFastError(f"{name}: the file holds shape {tuple(info['shape'])}, the edit {tuple(value.shape)}")
    data = _raw(value.detach().to("cpu", dt))
    off = info["data_offsets"]
    if len(data) != off[1] - off[0]:
        raise PureFastError(f"{name}: {len(data)} bytes do not fit the file's {off[1] - off[0]}")
    return data


def _read_ranges(path: str, entries: dict[str, dict]) -> dict[str, bytes]:
    _, start, _ = _header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in entries.items():
            a, b = info["data_offsets"]
            f.seek(start + a)
            out[name] = f.read(b - a)
    return out


def _write_ranges(path: str, data: dict[str, bytes], entries: dict[str, dict]) -> None:
    _, start, _ = _header(path)
    with open(path, "r+b") as f:
        for name, b in data.items():
            f.seek(start + entries[name]["data_offsets"][0])
            f.write(b)
        f.flush()
        os.fsync(f.fileno())


def _patch_atomically(path: str, data: dict[str, bytes], entries: dict[str, dict]) -> None:
    """A patched copy of ``path`` beside it, then ``os.replace`` onto it (a crash leaves the old file)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
        _write_ranges(tmp, data, entries)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    except OSError:
        pass
    finally:
        os.close(dirfd)


# ---- new outputs --------------------------------------------------------------------------------------------
def write_edited_folder(src: str, out: str, new_weights: dict[str, torch.Tensor]) -> str:
    """Copy diffusers (or toy weights) folder ``src`` to ``out`` with UNet tensors ``new_weights`` (name ->
    value) replaced byte for byte; everything else is identical to ``src``."""
    out = check_new_output(out)
    src = os.path.abspath(src)
    if _inside(out, src):
        raise UsageError("--out must not be inside the input model folder (use --in-place to edit it)")
    if not new_weights:
        raise UsageError("the edits change no weights; nothing to write")
    if os.path.exists(out):
        os.rmdir(out)  # empty: replaced atomically below
    with atomic_dir(out) as tmp:
        # revert files of in-place edits belong to the input, not to the copy
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(REVERT_PREFIX + "*", ".tmp-*"))
        for path, entries in _locate(unet_weight_files(tmp), set(new_weights)).items():
            _write_ranges(path, {n: _encode(n, new_weights[n], entries[n]) for n in entries}, entries)
    return out


def write_single_file(model, out: str, *, dtype: torch.dtype | None = None, metadata: dict | None = None) -> str:
    """The (edited) pipeline of adapter ``model`` as one LDM/SGM ``.safetensors`` checkpoint (atomic)."""
    pipe = getattr(model, "pipe", None)
    if pipe is None or getattr(pipe, "vae", None) is None:
        raise UsageError(f"--format single-file needs a Stable Diffusion pipeline; the {getattr(model, 'family', '?')} "
                         "model has no LDM single-file layout (use --format folder)")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise PureFastError(f"output {out} already exists; choose a new path (nothing was written)")
    if not out.endswith(".safetensors"):
        raise UsageError(f"--out {out} must end in .safetensors for --format single-file")
    return save_single_file(pipe, out, dtype=dtype, metadata=metadata)


# ---- in place -------------------------------------------------------------------------------------------------
def apply_in_place(folder: str, new_weights: dict[str, torch.Tensor], edits=(), revert_file: str | None = None) -> dict:
    """Replace UNet tensors ``new_weights`` inside ``folder``'s weight files, after writing a revert file.

    ``new_weights`` must come from edits already applied (and so checked) in memory. Returns a report with
    the revert file's path. Nothing in ``folder`` changes before the revert file is safely on disk.
    """
    folder = os.path.abspath(folder)
    if not new_weights:
        raise UsageError("the edits change no weights; nothing to write")
    wfiles = unet_weight_files(folder)
    groups = _locate(wfiles, set(new_weights))
    guard = _guard_digest(folder, wfiles, new_weights)
    # revert-file keys are "<file relative to the folder>::<tensor name>"
    before_t, before_d, after_d, files, headers, patches = {}, {}, {}, {}, {}, {}
    for path, entries in groups.items():
        rel = os.path.relpath(path, folder)
        _, _, raw_header = _header(path)
        headers[rel] = _digest(raw_header)
        old = _read_ranges(path, entries)
        patches[path] = {}
        for name, info in entries.items():
            key = f"{rel}::{name}"
            new = _encode(name, new_weights[name], info)
            files[key] = rel
            before_d[key], after_d[key] = _digest(old[name]), _digest(new)
            before_t[key] = torch.frombuffer(bytearray(old[name]), dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
            patches[path][name] = new
    changed = sorted(n for n in before_d if before_d[n] != after_d[n])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    if revert_file is None:
        first = os.path.dirname(next(iter(groups)))
        revert_file = os.path.join(first, f"{REVERT_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}.safetensors")
    revert_file = os.path.abspath(revert_file)
    if os.path.exists(revert_file):
        raise PureFastError(f"revert file {revert_file} already exists; choose another --revert-file")
    record = {
        "format": "pure_fast.revert", "format_version": 1, "model": folder, "files": files,
        "before": before_d, "after": after_d, "headers": headers, "created": stamp, "guard": guard,
        "edits": [{"edit_id": e.edit_id, "method": e.method, "kind": e.kind, "family": e.family} for e in edits],
    }
    save_safetensors(before_t, revert_file, metadata={"pure_fast_revert": json.dumps(record, sort_keys=True)})
    done = []
    try:
        for path, entries in groups.items():
            _patch_atomically(path, patches[path], entries)
            done.append(path)
    except BaseException:
        # a file could not be replaced (disk full, interrupted): put back the ones already replaced, so the
        # folder is as before and the revert file is not needed
        rel_of = {p: os.path.relpath(p, folder) for p in groups}
        for path in done:
            orig = {n: _raw(before_t[f"{rel_of[path]}::{n}"]) for n in groups[path]}
            _patch_atomically(path, orig, groups[path])
        os.unlink(revert_file)
        raise
    return {"model": folder, "revert_file": revert_file, "weights": len(files), "changed": len(changed),
            "files": sorted(set(files.values()))}


_KV = re.compile(r"\.attn2\.to_[kv]\.weight$")


def _guard_digest(folder: str, files: list[str], new_weights=None) -> dict:
    """Digest of every cross-attention K/V tensor's bytes (with ``new_weights`` written, when given): a
    revert is refused unless the model is still in exactly the state the edit left, so in-place edits
    are undone last-first even when they change different weights."""
    parts = []
    for path in files:
        header, _, _ = _header(path)
        entries = {k: v for k, v in header.items() if k != "__metadata__" and (_KV.search(k) or (new_weights and k in new_weights))}
        cur = _read_ranges(path, entries)
        for k in entries:
            b = _encode(k, new_weights[k], entries[k]) if new_weights and k in new_weights else cur[k]
            parts.append((f"{os.path.relpath(path, folder)}::{k}", _digest(b)))
    h = hashlib.blake2b(digest_size=16)
    for k, d in sorted(parts):
        h.update(f"{k}:{d};".encode())
    return {"names": len(parts), "digest": h.hexdigest()}


def read_revert_file(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = load_safetensors(path, EditFileError)
    try:
        record = json.loads(meta["pure_fast_revert"])
    except (KeyError, json.JSONDecodeError):
        raise EditFileError(f"{path} is not a pure_fast revert file (no pure_fast_revert metadata)") from None
    if not isinstance(record, dict) or record.get("format") != "pure_fast.revert" or record.get("format_version") != 1:
        raise EditFileError(f"{path}: unknown revert file format")
    for key in ("files", "before", "after", "headers"):
        if not isinstance(record.get(key), dict):
            raise EditFileError(f"{path}: revert record field {key!r} is missing")
    if set(record["files"]) != set(tensors) or set(record["before"]) != set(tensors):
        raise EditFileError(f"{path}: the revert record does not list the tensors the file holds")
    return tensors, record


def revert_in_place(folder: str, revert_file: str, *, remove: bool = True) -> dict:
    """Restore the tensors saved in ``revert_file`` into ``folder`` bit-exactly (see the module notes)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"--model {folder} is not a folder")
    tensors, record = read_revert_file(revert_file)
    by_file: dict[str, dict[str, str]] = {}  # rel -> {tensor name: revert key}
    for key, rel in record["files"].items():
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.split(os.sep) or not key.startswith(rel + "::"):
            raise EditFileError(f"{revert_file}: bad file entry {rel!r}")
        by_file.setdefault(rel, {})[key[len(rel) + 2:]] = key
    data: dict[str, dict[str, bytes]] = {}
    entries_of: dict[str, dict[str, dict]] = {}
    for rel, names in by_file.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise PureFastError(f"{path} does not exist; is --model the folder the edit was applied to?")
        header, _, raw_header = _header(path)
        if _digest(raw_header) != record["headers"].get(rel):
            raise PureFastError(f"{path} is not the file the edit was written into (its header differs); nothing restored")
        entries = {n: header[n] for n in names if n in header}
        if len(entries) != len(names):
            raise PureFastError(f"{path} lacks tensors the revert file restores; nothing restored")
        current = _read_ranges(path, entries)
        for n, key in names.items():
            if _digest(current[n]) != record["after"].get(key):
                state = "already holds the original weights" if _digest(current[n]) == record["before"][key] else \
                    "was changed after this edit (revert later in-place edits first)"
                raise PureFastError(f"{n} in {path} {state}; nothing restored")
        data[path] = {}
        for n, info in entries.items():
            b = _encode(n, tensors[names[n]], info)
            if _digest(b) != record["before"][names[n]]:
                raise EditFileError(f"{revert_file}: tensor {n} does not match its recorded digest; nothing restored")
            data[path][n] = b
        entries_of[path] = entries
    guard = record.get("guard")
    if guard and _guard_digest(folder, unet_weight_files(folder))["digest"] != guard.get("digest"):
        raise PureFastError(f"the cross-attention weights of {folder} were changed after this edit (revert later "
                            "in-place edits first); nothing restored")
    for path, entries in entries_of.items():
        _patch_atomically(path, data[path], entries)
    if remove:
        os.unlink(revert_file)
    return {"model": folder, "restored": len(record["files"]), "files": sorted(by_file),
            "edits": [e.get("edit_id") for e in record.get("edits", [])], "revert_file_removed": remove}
