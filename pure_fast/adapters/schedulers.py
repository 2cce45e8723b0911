"""Schedulers by name, built from a pipeline's scheduler config (so betas etc. match the model)."""
from __future__ import annotations

from ..errors import UsageError

NAMES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def make_scheduler(base, name: str | None):
    """A fresh scheduler: ``name`` one of NAMES (None = a copy of the pipeline's own)."""
    import diffusers

    if name is None:
        return base.__class__.from_config(base.config)
    key = name.lower()
    if key not in NAMES:
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(NAMES)}")
    return getattr(diffusers, NAMES[key]).from_config(base.config)
