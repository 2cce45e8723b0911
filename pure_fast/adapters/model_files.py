"""What a model's files say, read before loading anything: the pipeline class, the model family, pickle-only
components, single-file arguments. Shared by the full-pipeline loader (``loading.py``) and the text-only
one (``text_only.py``), so both refuse the same inputs with the same messages."""
from __future__ import annotations

import json
import os

from ..errors import ModelLoadError, UsageError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def pipeline_class_name(folder: str) -> str:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ModelLoadError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); "
            "give a diffusers folder, or a .safetensors file with --config DIR"
        )
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {index}: {exc}") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str):
        raise ModelLoadError(f"{index} has no _class_name; is this a diffusers pipeline folder?")
    return name


def pickle_only_components(folder: str) -> list[str]:
    """Components (sub-folders) of a diffusers folder that hold pickle weights and no .safetensors."""
    out = []
    for comp in sorted(os.listdir(folder)):
        d = os.path.join(folder, comp)
        if not os.path.isdir(d):
            continue
        files = os.listdir(d)
        if any(f.endswith(PICKLE_SUFFIXES) for f in files) and not any(f.endswith(".safetensors") for f in files):
            out.append(comp)
    return out


def check_single_file_spec(spec: str, config: str | None) -> None:
    """Refuse a single-file ``spec`` that is not a .safetensors file, or comes without a ``config`` folder."""
    lower = spec.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{spec} is a pickle-based checkpoint, which is never loaded (it can run code); "
            "convert it to .safetensors and pass --config DIR"
        )
    if not lower.endswith(".safetensors"):
        raise ModelLoadError(f"{spec} is not a .safetensors file or a diffusers folder")
    if config is None:
        raise UsageError(
            f"{spec} is a single-file checkpoint: also pass --config DIR, a local diffusers folder of the same "
            "model family (its configs are used; nothing is downloaded)"
        )
    if not os.path.isdir(config):
        raise ModelLoadError(f"--config {config} is not a folder (expected a local diffusers pipeline folder)")


def family_from(class_name: str, unet_config: dict) -> str:
    """'sdxl', 'sd2' or 'sd1' from the pipeline class name and the UNet config."""
    if "XL" in class_name:
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection", False):
        return "sd2"
    return "sd1"


def quiet_libraries():
    """diffusers (imported here) and transformers: errors only, no loading bars (``progress.quiet_third_party``)."""
    import diffusers  # noqa: F401 - imported here so that quiet_third_party switches them
    import transformers  # noqa: F401

    from ..progress import quiet_third_party

    quiet_third_party()
