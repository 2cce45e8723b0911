"""The v2 toy model: a diffusers ``UNet2DConditionModel`` shaped like Stable Diffusion's, conditioned on frozen
all-MiniLM-L6-v2 token states (384-d), working on the latents of an exact, fixed "VAE".

The VAE is space-to-depth (``pixel_unshuffle``) by ``LATENT["factor"]`` = 4: a 32x32x3 image in [-1, 1] is an
8x8x48 latent and back, bit for bit (no learned weights, no information lost). The UNet therefore works at
8x8 as SD works in its 4-channel latent space (SD's VAE scale factor is 8; ours is 4). Factor 4 rather than 2
because the model has to be trained on CPU when no GPU is lent: at factor 2 (16x16x12 latents) the same widths
cost 2.37 GFLOP per sample forward and ~0.15 s per training sample on one core; at factor 4, 0.63 GFLOP and
0.045 s (batch 32, one thread; 0.030 s on two; ``pure_fast/toy/v2/README.md``). ``unet_config(factor=2)``
builds the 16x16 variant.

Shape (``UNET_CONFIG``), checked by ``sd_shape_violations`` (and the tests):

- 3 resolution levels (8, 4, 2), ``CrossAttnDownBlock2D`` x3, ``UNetMidBlock2DCrossAttn``,
  ``CrossAttnUpBlock2D`` x3: cross-attention at every level of the down path, the mid block and the up path
  (SD1.5's lowest level has none; SDXL's top level has none);
- transformer blocks with self-attention (``attn1``) and cross-attention (``attn2``), GEGLU feed-forward;
- widths 128 / 192 / 192 (K/V output of every ``attn2`` is 128 or 192 wide), heads of 32 channels
  (diffusers' ``attention_head_dim`` is the number of heads: 4 / 6 / 6). SD1.5: 320 / 640 / 1280 / 1280
  (K/V 320-1280, heads 8 x 40-160 ch); SDXL: 320 / 640 / 1280 (cross-attention only at 640 and 1280, heads
  of 64 ch, K/V 640-1280). Our K/V widths are 0.40x SD1.5's narrowest and 0.15x its widest, 0.20x SDXL's
  narrowest and 0.15x its widest; our heads are 0.8x SD1.5's narrowest and 0.5x SDXL's.
- 18.14M parameters (fp16 export 36 MB), 0.63 GFLOP per sample forward at 8x8 latents (``flop_counter``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import SCHEDULER_CONFIG, build_unet, n_params, sample_scheduler, train_scheduler  # noqa: F401 (v1's)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HEAD_CHANNELS = 32
LATENT = {"kind": "space_to_depth", "factor": 4}
IMAGE_SIZE = 32

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=48,
    out_channels=48,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(128, 192, 192),
    layers_per_block=1,
    norm_num_groups=32,
    cross_attention_dim=384,
    attention_head_dim=(4, 6, 6),  # diffusers: the number of heads per level (32 channels each)
    transformer_layers_per_block=1,
)

# SD reference widths (block_out_channels; cross-attention K/V output = the block width)
SD_WIDTHS = {"SD1.5": {"levels": (320, 640, 1280, 1280), "kv": (320, 1280), "head_channels": (40, 160)},
             "SDXL": {"levels": (320, 640, 1280), "kv": (640, 1280), "head_channels": (64, 64)}}

# the constraints on the shape
MIN_LEVELS = 3
MIN_KV_WIDTH = 128
MIN_HEAD_CHANNELS = 32


def unet_config(channels: tuple[int, ...] | None = None, heads: tuple[int, ...] | None = None,
                factor: int | None = None, **kw) -> dict:
    """UNET_CONFIG with other widths (heads default to width / 32), another latent ``factor`` (32/f px latents
    with 3 f^2 channels) or other fields."""
    cfg = dict(UNET_CONFIG, **kw)
    if factor is not None:
        cfg.update(sample_size=IMAGE_SIZE // factor, in_channels=3 * factor * factor, out_channels=3 * factor * factor)
    if channels is not None:
        channels = tuple(int(c) for c in channels)
        n = len(channels)
        cfg.update(block_out_channels=channels,
                   attention_head_dim=tuple(heads) if heads else tuple(max(1, c // HEAD_CHANNELS) for c in channels),
                   down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n)
    return cfg


def latent_of(unet_or_config) -> dict:
    """The exact VAE of a UNet (or its config): {"kind": "space_to_depth", "factor": f}, f from its channels."""
    cfg = unet_or_config.config if hasattr(unet_or_config, "config") else unet_or_config
    factor = int(round((int(cfg["in_channels"]) / 3) ** 0.5))
    if 3 * factor * factor != int(cfg["in_channels"]):
        raise ValueError(f"in_channels {cfg['in_channels']} is not 3 f^2: not a space-to-depth latent")
    return {"kind": "space_to_depth", "factor": factor}


# ---- the exact "VAE" ----------------------------------------------------------------------------------------
def encode_pixels(x: torch.Tensor, factor: int = LATENT["factor"]) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> latents [B, 3 f^2, H/f, W/f] (space-to-depth, exact)."""
    return torch.nn.functional.pixel_unshuffle(x, factor)


def decode_latents(z: torch.Tensor, factor: int = LATENT["factor"]) -> torch.Tensor:
    """Latents [B, 3 f^2, h, w] -> images [B, 3, h f, w f] (depth-to-space, the exact inverse)."""
    return torch.nn.functional.pixel_shuffle(z, factor)


# ---- the shape requirements -------------------------------------------------------------------------------
def sd_shape_violations(unet) -> list[str]:
    """What keeps ``unet`` from the required SD-like shape (empty = none): >= MIN_LEVELS resolution levels,
    cross-attention in every down block, the mid block and every up block, transformer blocks with self- and
    cross-attention, every cross-attention K/V output >= MIN_KV_WIDTH wide with heads >= MIN_HEAD_CHANNELS."""
    bad = []
    levels = len(unet.config.block_out_channels)
    if levels < MIN_LEVELS:
        bad.append(f"{levels} resolution levels < {MIN_LEVELS}")
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for name, block in blocks:
        tbs = [m for m in block.modules() if type(m).__name__ == "BasicTransformerBlock"]
        if not tbs:
            bad.append(f"{name} has no transformer block (no cross-attention)")
        for tb in tbs:
            if getattr(tb, "attn1", None) is None or getattr(tb, "attn2", None) is None:
                bad.append(f"{name}: a transformer block lacks self- or cross-attention")
                continue
            a2 = tb.attn2
            if a2.is_cross_attention is False or a2.to_k.in_features != unet.config.cross_attention_dim:
                bad.append(f"{name}: attn2 is not cross-attention on the text states")
            width = a2.to_k.out_features
            head = width // a2.heads
            if width < MIN_KV_WIDTH or a2.to_v.out_features < MIN_KV_WIDTH:
                bad.append(f"{name}: cross-attention K/V width {width} < {MIN_KV_WIDTH}")
            if head < MIN_HEAD_CHANNELS:
                bad.append(f"{name}: {a2.heads} heads of {head} channels < {MIN_HEAD_CHANNELS}")
    return bad


def shape_summary(unet) -> dict:
    """K/V widths and head sizes of every cross-attention layer, and the comparison with SD1.5 / SDXL."""
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]
    kv = sorted({m.to_k.out_features for _, m in layers})
    heads = sorted({m.to_k.out_features // m.heads for _, m in layers})
    return {"levels": len(unet.config.block_out_channels), "block_out_channels": list(unet.config.block_out_channels),
            "cross_attention_layers": len(layers), "kv_widths": kv, "head_channels": heads,
            "parameters": n_params(unet), "latent": latent_of(unet), "sd_reference": SD_WIDTHS}
