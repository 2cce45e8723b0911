"""Stable Diffusion XL (diffusers ``StableDiffusionXLPipeline``).

Conditioning as the pipeline builds it: the penultimate hidden states of both text encoders concatenated
(768 + 1280 = 2048 on SDXL), the pooled projection of text_encoder_2 as ``text_embeds`` and the six
``time_ids`` (original size, crop top-left, target size) that depend on the resolution. The empty negative
prompt is all zeros when the model's config says ``force_zeros_for_empty_prompt`` (the SDXL default).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Conditioning
from .sd import SDAdapter


class SDXLAdapter(SDAdapter):
    family = "sdxl"
    default_guidance = 5.0

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(embeds.to(self.dtype), {"text_embeds": pooled.to(self.dtype)})

    def encode_negative(self, n: int) -> Conditioning:
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", True):
            one = self.encode([""])
            return Conditioning(
                torch.zeros_like(one.embeds).expand(n, -1, -1).contiguous(),
                {"text_embeds": torch.zeros_like(one.added["text_embeds"]).expand(n, -1).contiguous()},
            )
        return self.encode([""] * n)

    def time_ids(self, n: int, size: int) -> torch.Tensor:
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=self.dtype, device=self.device)
        return ids.expand(n, -1)

    def unet_forward(self, x, t, cond: Conditioning):
        size = x.shape[-1] * self.vae_scale_factor
        added = dict(cond.added)
        added.setdefault("time_ids", self.time_ids(x.shape[0], size))
        return self.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]
