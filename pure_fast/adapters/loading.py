"""Loading models from local files only: a diffusers folder, or one .safetensors file plus a config folder.

Paths are checked here first, because diffusers' own messages for a missing path or an offline config
lookup point at the Hub. Pickle-based checkpoints (.ckpt/.pt/.bin/.pth) are refused: loading them can run
arbitrary code. Folders are loaded with ``use_safetensors=True``, so a component stored only as pickle
``.bin`` weights is refused (with the component named) instead of being unpickled. After loading, every
UNet parameter is checked finite (one native pass): NaN/Inf weights make every activation, basis and edit
meaningless, so they are refused with the first offending tensor named.
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import ModelLoadError, NumericalError, UsageError
from ..ops.finite import finite_stats
from .base import ModelAdapter
from .model_files import PICKLE_SUFFIXES, check_single_file_spec, family_from  # noqa: F401 (re-exported)
from .model_files import pickle_only_components as _pickle_only_components
from .model_files import pipeline_class_name as _pipeline_class_name
from .model_files import quiet_libraries as _quiet_diffusers

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return DTYPES[key]


def parse_device(name) -> torch.device:
    try:
        dev = torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu or cuda")
    return dev


def check_finite_parameters(module: torch.nn.Module, what: str = "UNet") -> None:
    """Refuse a model whose parameters hold NaN/Inf (names the first bad tensor and the count)."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and p.numel():
            bad, _ = finite_stats(p.detach())
            if bad:
                raise NumericalError(
                    f"the {what} weight {name} holds {bad} NaN/Inf value(s); the checkpoint is corrupt "
                    "(re-download or re-convert it)"
                )


def _pipeline_class(name: str):
    import diffusers

    if "XL" in name:
        return diffusers.StableDiffusionXLPipeline
    if name.startswith("StableDiffusion"):
        return diffusers.StableDiffusionPipeline
    raise ModelLoadError(f"pipeline type {name} is not supported (supported: StableDiffusion 1.x/2.x, SDXL)")


def load_pipeline(spec: str, config: str | None = None, dtype: torch.dtype | None = None):
    """A diffusers pipeline from a local folder or a single safetensors file + config folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.path.exists(spec):
        raise ModelLoadError(f"model path {spec} does not exist")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if os.path.isdir(spec):
        cls = _pipeline_class(_pipeline_class_name(spec))
        pickled = _pickle_only_components(spec)
        if pickled:
            raise ModelLoadError(
                f"{spec}: component(s) {', '.join(pickled)} have only pickle weights (.bin/.ckpt), which are never "
                "loaded (they can run code); convert the folder to safetensors (save_pretrained(..., "
                "safe_serialization=True) in a trusted environment)"
            )
        kwargs["use_safetensors"] = True
        _quiet_diffusers()
        try:
            if cls.__name__ == "StableDiffusionPipeline":
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_pretrained(spec, **kwargs)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot load the diffusers folder {spec}: {str(exc).splitlines()[0]}") from None
    else:
        check_single_file_spec(spec, config)
        cls = _pipeline_class(_pipeline_class_name(config))
        _quiet_diffusers()
        try:
            if cls.__name__ == "StableDiffusionPipeline":
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_single_file(spec, config=config, **kwargs)
        except Exception as exc:  # diffusers raises many types for a bad checkpoint
            raise ModelLoadError(
                f"cannot load {spec} with config {config}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of(pipe) -> str:
    return family_from(type(pipe).__name__, dict(pipe.unet.config))


def wrap_pipeline(pipe, device=None, dtype=None) -> ModelAdapter:
    if isinstance(pipe, ModelAdapter):
        return pipe
    from .sd import SD2Adapter, SDAdapter
    from .sdxl import SDXLAdapter

    family = family_of(pipe)
    cls = {"sd1": SDAdapter, "sd2": SD2Adapter, "sdxl": SDXLAdapter}[family]
    device = torch.device(device) if device is not None else pipe.unet.device
    if dtype is None:
        dtype = pipe.unet.dtype
    pipe.to(device)
    return cls(pipe, pipe.unet, device=device, dtype=dtype)


def is_toy_spec(spec) -> bool:
    """Does a --model value name the toy model (None, 'toy', or a toy weights folder)?"""
    return spec is None or spec == "toy" or _is_toy_weights_folder(os.fspath(spec))


def _is_toy_weights_folder(path: str) -> bool:
    """A toy model weights folder (config.json + unet.safetensors, no model_index.json)."""
    return (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json"))
            and os.path.isfile(os.path.join(path, "unet.safetensors"))
            and os.path.isfile(os.path.join(path, "config.json")))


PARTS = ("all", "text", "kv")


def load_model(spec=None, *, config=None, device="cpu", dtype=None, parts: str = "all") -> ModelAdapter:
    """``parts``: 'all' (the whole pipeline), 'text' (text encoders + K/V weights read lazily from the files:
    what UCE, CURE and SPACE use, ``text_only.TextOnlyAdapter``) or 'kv' (K/V weights only: exports and
    fingerprints). The toy model is small and always loaded whole."""
    if parts not in PARTS:
        raise ValueError(f"parts={parts!r}; use one of {', '.join(PARTS)}")
    device = parse_device(device)
    dtype = parse_dtype(dtype)
    if spec is None or spec == "toy":
        try:
            from .toy import load_toy
        except ImportError:
            raise ModelLoadError("the toy model is not available in this installation; pass --model PATH") from None
        return load_toy(device=device, dtype=dtype or torch.float32)
    spec = os.fspath(spec)
    if _is_toy_weights_folder(spec):  # written by `pure-fast apply --model toy --out DIR`
        from .toy import load_toy

        adapter = load_toy(device=device, dtype=dtype or torch.float32, weights_dir=spec)
        adapter.source = {"model": os.path.abspath(spec), "config": None}
        return adapter
    if parts != "all":
        from .text_only import load_text_only

        return load_text_only(spec, config=config, device=device, dtype=dtype, text=parts == "text")
    pipe = load_pipeline(spec, config=config, dtype=dtype)
    check_finite_parameters(pipe.unet)
    adapter = wrap_pipeline(pipe, device=device, dtype=dtype or pipe.unet.dtype)
    adapter.source = {"model": os.path.abspath(spec), "config": os.path.abspath(config) if config else None}
    return adapter
