"""The toy model: a small pixel-space diffusers UNet2DConditionModel conditioned on MiniLM token states."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Sized for CPU training (~1-2 s per batch-64 step at 16x16 on one thread): two resolution levels with
# cross-attention at both, plus a cross-attention mid block.
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(64, 128),
    layers_per_block=1,
    norm_num_groups=16,
    cross_attention_dim=384,
    attention_head_dim=4,  # diffusers: the number of heads
    transformer_layers_per_block=1,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
)


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def sample_scheduler(config: dict | None = None):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(config or SCHEDULER_CONFIG), set_alpha_to_one=True)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_unet(weights_dir: str | os.PathLike | None = None, device="cpu", dtype=torch.float32):
    """The shipped (or given) UNet: ``config.json`` + ``unet.safetensors`` in ``weights_dir``.
    Returns (unet, meta) where meta is the config.json content (unet, scheduler, training info)."""
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    cfg_path, w_path = d / "config.json", d / "unet.safetensors"
    if not (cfg_path.exists() and w_path.exists()):
        raise ModelLoadError(
            f"toy model weights not found in {d} (expected config.json + unet.safetensors); "
            "train them with `python -m pure_fast.toy.train`"
        )
    meta = json.loads(cfg_path.read_text())
    unet = build_unet(meta["unet"])
    state = load_file(str(w_path))
    missing, unexpected = unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{w_path}: weights do not match config ({len(missing)} missing, {len(unexpected)} unexpected)")
    unet.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return unet, meta
