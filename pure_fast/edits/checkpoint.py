"""Writing edited models: a copy of a diffusers folder with the edited UNet tensors replaced.

Everything is written into a temporary folder beside the output and renamed at the end, so a failed or
interrupted run leaves no partial output; the input folder is only read.
"""
from __future__ import annotations

import glob
import os
import shutil

import torch

from ..errors import PureFastError
from ..fileio import atomic_dir, load_safetensors, save_safetensors


def check_new_output(out: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise PureFastError(f"output {out} already exists; choose a new path (nothing was written)")
    return out


def _unet_weight_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "unet", "*.safetensors")))
    if not files:
        raise PureFastError(
            f"{folder}/unet has no .safetensors weights (pickle .bin weights are not rewritten); "
            "re-save the pipeline with safe_serialization=True"
        )
    return files


def write_edited_folder(src: str, out: str, new_weights: dict[str, torch.Tensor]) -> str:
    """Copy diffusers folder ``src`` to ``out`` with UNet tensors ``new_weights`` (name -> value) replaced."""
    out = check_new_output(out)
    if os.path.exists(out):
        os.rmdir(out)  # empty: replaced atomically below
    src = os.path.abspath(src)
    if out == src or out.startswith(src + os.sep):
        raise PureFastError("--out must not be inside the input model folder (use --in-place to edit it)")
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        written: set[str] = set()
        for path in _unet_weight_files(tmp):
            tensors, meta = load_safetensors(path, PureFastError)
            hit = [k for k in tensors if k in new_weights]
            if not hit:
                continue
            for k in hit:
                if tuple(tensors[k].shape) != tuple(new_weights[k].shape):
                    raise PureFastError(f"{k}: the file holds shape {tuple(tensors[k].shape)}, the edit {tuple(new_weights[k].shape)}")
                tensors[k] = new_weights[k].detach().to("cpu", tensors[k].dtype)
                written.add(k)
            save_safetensors(tensors, path, metadata=meta or None)
        missing = set(new_weights) - written
        if missing:
            raise PureFastError(f"{len(missing)} edited tensor(s) not found in {src}/unet (e.g. {sorted(missing)[0]})")
    return out
