"""Stable Diffusion 1.x and 2.x (diffusers ``StableDiffusionPipeline``).

Prompts are encoded by the pipeline's own ``encode_prompt`` (last hidden state of the CLIP text model, as
the pipeline passes it to the UNet); the negative prompt for CFG is the empty string, as in the pipeline.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UsageError
from .base import Conditioning, ModelAdapter, TokenEmbeddings


class SDAdapter(ModelAdapter):
    family = "sd1"
    default_guidance = 7.5

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The pipeline's own default resolution: UNet ``sample_size`` x VAE scale factor (SD1.5 512,
        SD2 768, SD2-base 512, SDXL 1024), read from the model's config rather than assumed per family."""
        sample = self.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_scale_factor

    @property
    def default_collect_size(self) -> int:
        """Half the native resolution (activations are spatial means: half the side keeps them at a quarter
        of the cost), rounded down to a latent size every UNet level can halve; SD1.5 256, SD2 384, SDXL 512."""
        step = self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        return max(step, (self.default_size // 2) // step * step)

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if size % (8 if f >= 8 else f) != 0:
            raise UsageError(f"image size {size} must be a multiple of {8 if f >= 8 else f}")
        return (self.unet.config.in_channels, size // f, size // f)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return Conditioning(embeds.to(self.dtype))

    def encode_negative(self, n: int) -> Conditioning:
        return self.encode([""] * n)

    def _tokenize(self, prompts: Sequence[str]):
        tok = self.pipe.tokenizer
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt")

    @torch.no_grad()
    def encode_tokens(self, prompts: Sequence[str]) -> TokenEmbeddings:
        t = self._tokenize(prompts)
        embeds = self.encode(prompts).embeds
        return TokenEmbeddings(embeds, t.attention_mask.to(embeds.device), t.input_ids.to(embeds.device))

    def tokenize(self, prompt: str) -> list[str]:
        return self.pipe.tokenizer.tokenize(prompt)

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor):
        vae = self.pipe.vae
        dtype = vae.dtype
        upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae = vae.to(torch.float32)
        lat = latents.to(vae.dtype) / vae.config.scaling_factor
        image = vae.decode(lat, return_dict=False)[0]
        if upcast:
            vae.to(dtype)
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")


class SD2Adapter(SDAdapter):
    family = "sd2"
