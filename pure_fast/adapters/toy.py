"""The toy model family: a UNet2DConditionModel conditioned on MiniLM token states.

Same interface as the SD adapters; the base class's ``denoise`` / ``generate`` run it unchanged. v1 (16x16)
works in pixel space: latents are pixels in [-1, 1] (3 x size x size). v2 (32x32, ``config.json`` has
``"latent": {"kind": "space_to_depth", "factor": 2}``) works on the latents of an exact fixed "VAE":
latents are the pixels space-to-depth'ed (3 f^2 x size/f x size/f), and ``decode`` depth-to-spaces them
back before mapping to uint8, as an SD pipeline decodes with its VAE (scale factor f).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .base import Conditioning, ModelAdapter, TokenEmbeddings


@dataclass
class ToyPipe:
    """The minimum the base class needs from a pipeline: ``scheduler`` (and the unet, for symmetry)."""

    unet: Any
    scheduler: Any
    config: dict


class ToyAdapter(ModelAdapter):
    family = "toy"
    default_size = 16
    default_collect_size = 16
    default_guidance = 2.0  # measured on the shipped model: best per-concept accuracy (card.py)
    bos_is_first = True  # [CLS]

    def __init__(self, pipe: ToyPipe, unet, device="cpu", dtype=torch.float32):
        super().__init__(pipe, unet, device, dtype)
        self.max_tokens = int(pipe.config.get("text_encoder", {}).get("max_tokens", 32))
        self.null_caption = pipe.config.get("null_caption", "")
        self._neg_cache: torch.Tensor | None = None
        latent = pipe.config.get("latent") or {"kind": "pixels"}
        if latent.get("kind") not in ("pixels", "space_to_depth"):
            from ..errors import ModelLoadError

            raise ModelLoadError(f"toy model config: unknown latent kind {latent.get('kind')!r}")
        self.vae_scale_factor = int(latent.get("factor", 1)) if latent["kind"] == "space_to_depth" else 1

    # ---- text -------------------------------------------------------------------------------------
    def encode_tokens(self, prompts: Sequence[str]) -> TokenEmbeddings:
        from ..toy.text import encode_tokens

        e, m, i = encode_tokens(list(prompts), "cpu", self.max_tokens)
        return TokenEmbeddings(e.to(self.device, self.dtype), m.to(self.device), i.to(self.device))

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning(self.encode_tokens(prompts).embeds)

    def encode_negative(self, n: int) -> Conditioning:
        if self._neg_cache is None:
            self._neg_cache = self.encode_tokens([self.null_caption]).embeds
        return Conditioning(self._neg_cache.expand(n, -1, -1).contiguous())

    def tokenize(self, prompt: str) -> list[str]:
        from ..toy.text import wordpieces

        return wordpieces(prompt)

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_tokens

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenize(prompt)) + 2  # [CLS] ... [SEP]

    # ---- sampling ---------------------------------------------------------------------------------
    def latent_shape(self, size: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if size % f:
            from ..errors import UsageError

            raise UsageError(f"size {size} is not a multiple of the toy model's VAE scale factor {f}")
        return (3 * f * f, size // f, size // f)

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images [B, H, W, 3] (tensor)."""
        x = latents.detach().float()
        if self.vae_scale_factor > 1:
            x = torch.nn.functional.pixel_shuffle(x, self.vae_scale_factor)  # exact inverse of the encoding
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)

    def make_scheduler(self, name: str | None = None):
        if name is None:
            name = "ddim"
        return super().make_scheduler(name)

    def decode(self, latents: torch.Tensor):
        from PIL import Image

        arr = self._pixels(latents).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]

    def decode_array(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 [B, H, W, 3] (what the detectors take)."""
        return self._pixels(latents).cpu().numpy()


def load_toy(device="cpu", dtype=torch.float32, weights_dir: str | Path | None = None) -> ToyAdapter:
    """The shipped toy model (``pure_fast/toy/weights``) as a ToyAdapter. Raises ModelLoadError when the
    weights (or the MiniLM text encoder package) are missing."""
    from ..progress import quiet_third_party
    from ..toy.model import load_unet, sample_scheduler
    from ..toy.text import model_dir

    model_dir()  # fail early, with the install hint, if MiniLM is missing
    quiet_third_party()  # diffusers' "should be kept in float32: []", transformers' "Loading weights" bars
    unet, meta = load_unet(weights_dir, device=device, dtype=dtype)
    sched = sample_scheduler(meta.get("scheduler"))
    adapter = ToyAdapter(ToyPipe(unet=unet, scheduler=sched, config=meta), unet, device=device, dtype=dtype)
    if "default_guidance" in meta:
        adapter.default_guidance = float(meta["default_guidance"])
    size = meta.get("size")
    if size:
        adapter.default_size = adapter.default_collect_size = int(size)
    return adapter


def weights_available(weights_dir: str | Path | None = None) -> bool:
    """True when the toy model can be loaded here: its weights (config.json + unet.safetensors), the
    detector weights, and the MiniLM text encoder package are all present. Loads nothing."""
    from ..toy.model import WEIGHTS_DIR

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    if not all((d / n).is_file() for n in ("config.json", "unet.safetensors", "detector.safetensors")):
        return False
    try:
        from ..toy.text import model_dir

        return Path(model_dir()).is_dir()
    except Exception:  # noqa: BLE001 - ModelLoadError or a broken install: not available
        return False
