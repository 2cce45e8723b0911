"""The model-family interface. Nothing outside ``adapters/`` knows a model family.

An adapter wraps one loaded model (a diffusers pipeline, or the toy model) and offers:

- ``encode(prompts)``: conditioning exactly as the family's pipeline computes it (``Conditioning``).
- ``encode_tokens(prompts)``: the token-level text embeddings that feed ``to_k``/``to_v`` plus the token
  attention mask and ids, for text-space methods (UCE, CURE, SPACE).
- ``cross_attention_layers()``: every ``attn2`` layer (module path, the module, shapes), in a fixed order.
- ``denoise(cond, seeds, ...)``: a denoising trajectory with classifier-free guidance, batched over prompts
  and seeds, that calls ``on_step(step_index, timestep)`` before each UNet call (collection hooks use it)
  and may stop early after ``max_steps``.
- ``generate(prompts, seeds, ...)``: finished images (PIL) for the same prompts / seeds.

Seeds: the initial noise of (prompt i, seed s) is drawn from ``torch.Generator('cpu').manual_seed(s)``
alone, so an image does not depend on how prompts are batched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .layers import CrossAttnLayer, find_cross_attention_layers
from .schedulers import make_scheduler


@dataclass
class Conditioning:
    """Conditioning for a batch of prompts, as the pipeline passes it to the UNet.

    ``embeds``: [B, T, d_in] encoder_hidden_states. ``added``: extra UNet kwargs batched like ``embeds``
    (SDXL: {"text_embeds": [B, 1280], "time_ids": [B, 6]}); empty for SD1/SD2 and the toy model.
    """

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx) -> "Conditioning":
        return Conditioning(self.embeds[idx], {k: v[idx] for k, v in self.added.items()})

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning(
            self.embeds.repeat_interleave(n, 0), {k: v.repeat_interleave(n, 0) for k, v in self.added.items()}
        )

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        keys = parts[0].added.keys()
        return Conditioning(
            torch.cat([p.embeds for p in parts]), {k: torch.cat([p.added[k] for p in parts]) for k in keys}
        )

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(
            self.embeds.to(device=device, dtype=dtype),
            {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.added.items()},
        )


@dataclass
class TokenEmbeddings:
    """Token-level text embeddings (what ``to_k``/``to_v`` multiply): [B, T, d_in], mask [B, T], ids [B, T].

    ``mask`` marks real tokens (BOS, words, EOS). ``last_subject`` is the index of the last word token
    (for CLIP: ``mask.sum() - 2``, the token before EOS).
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    ids: torch.Tensor

    @property
    def last_subject(self) -> torch.Tensor:
        return (self.mask.sum(1) - 2).clamp(min=0)


OnStep = Callable[[int, Any], None]


class ModelAdapter:
    """Base class. Subclasses set ``family`` and implement the methods below."""

    family: str = "base"
    default_size: int = 512  # generation resolution in pixels
    default_collect_size: int = 512  # resolution used by activation collection
    default_guidance: float = 7.5
    bos_is_first: bool = True  # token 0 is a start token

    def __init__(self, pipe, unet, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.pipe = pipe
        self.unet = unet
        self.device = torch.device(device)
        self.dtype = dtype

    # ---- text -------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        raise NotImplementedError

    def encode_negative(self, n: int) -> Conditioning:
        """Unconditional conditioning for CFG (empty negative prompt), batch n."""
        raise NotImplementedError

    def encode_tokens(self, prompts: Sequence[str]) -> TokenEmbeddings:
        raise NotImplementedError

    def tokenize(self, prompt: str) -> list[str]:
        """The word pieces of a prompt (no special tokens), for token-substitution attacks."""
        raise NotImplementedError

    max_prompt_tokens: int | None = None  # the text encoder's window; longer prompts are cut

    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens ``prompt`` has, special tokens included, before any truncation."""
        raise NotImplementedError

    free_text_after_use: bool = False  # set by whoever owns the adapter for one run (api.load_for)

    def done_with_text(self) -> None:
        """Called by the text-space methods once their token embeddings exist. An adapter that holds its
        text encoders only for them (``text_only.TextOnlyAdapter``) drops them then, when it was loaded for
        this one run (``free_text_after_use``); a full pipeline keeps them."""

    # ---- layers -----------------------------------------------------------------------------------
    def cross_attention_layers(self) -> list[CrossAttnLayer]:
        return find_cross_attention_layers(self.unet)

    def weight_names(self) -> list[str]:
        """Names (relative to the UNet) of every to_k / to_v weight, K then V per layer."""
        out = []
        for layer in self.cross_attention_layers():
            out += [layer.key_weight, layer.value_weight]
        return out

    # ---- sampling ---------------------------------------------------------------------------------
    def latent_shape(self, size: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def initial_noise(self, seeds: Sequence[int], size: int) -> torch.Tensor:
        c, h, w = self.latent_shape(size)
        noise = [torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.device, self.dtype)

    def make_scheduler(self, name: str | None = None):
        return make_scheduler(self.pipe.scheduler, name)

    def denoise(
        self,
        cond: Conditioning,
        seeds: Sequence[int],
        *,
        steps: int,
        size: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        max_steps: int | None = None,
        on_step: OnStep | None = None,
        on_x0: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Run ``max_steps`` (default all) of a ``steps``-step schedule for every (prompt, seed) pair.

        ``cond`` has one row per sample (prompts already repeated per seed), ``seeds`` one seed per row.
        Returns the final latents [B, C, h, w]. With CFG the UNet batch is [negative; positive].
        ``on_x0(step_index, x0)``: called after each step with the scheduler's prediction of the clean
        latents (``pred_original_sample``; schedulers without it are refused when ``on_x0`` is given).
        """
        size = size or self.default_size
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(steps, device=self.device)
        latents = self.initial_noise(seeds, size) * sched.init_noise_sigma
        do_cfg = guidance > 1.0
        cond = cond.to(self.device, self.dtype)
        if do_cfg:
            neg = self.encode_negative(len(cond)).to(self.device, self.dtype)
            both = Conditioning.cat([neg, cond])
        else:
            both = cond
        n = steps if max_steps is None else min(steps, max_steps)
        for i, t in enumerate(sched.timesteps[:n]):
            model_in = torch.cat([latents, latents]) if do_cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            if on_step is not None:
                on_step(i, t)
            pred = self.unet_forward(model_in, t, both)
            if do_cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
            out = sched.step(pred, t, latents)
            latents = out.prev_sample
            if on_x0 is not None:
                x0 = getattr(out, "pred_original_sample", None)
                if x0 is None:
                    raise ValueError(f"{type(sched).__name__} gives no x0 prediction; use the ddim scheduler")
                on_x0(i, x0)
        return latents

    def unet_forward(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        kwargs = {}
        if cond.added:
            kwargs["added_cond_kwargs"] = cond.added
        return self.unet(x, t, encoder_hidden_states=cond.embeds, return_dict=False, **kwargs)[0]

    def decode(self, latents: torch.Tensor):
        """Latents -> list of PIL images."""
        raise NotImplementedError

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = 25,
        size: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        batch_size: int = 4,
        progress: bool = True,
        desc: str = "generate",
    ) -> list[list[Any]]:
        """Images[i][j] for prompt i and seed j (PIL). Same seeds -> same noise, with or without an edit.

        The progress bar counts denoising steps (UNet calls of every batch), the work that takes the time.
        Inside a torch.distributed process group each rank runs a contiguous block of the batches and every
        rank receives all images (``pure_fast.distributed``): the same images as one process."""
        from .. import distributed

        pairs = [(i, j) for i in range(len(prompts)) for j in range(len(seeds))]
        images: list[list[Any]] = [[None] * len(seeds) for _ in prompts]
        starts = range(0, len(pairs), batch_size)
        mine = distributed.split([len(pairs[s : s + batch_size]) for s in starts], "generate")
        done = []
        with torch.no_grad(), distributed.progress_bar(total=len(starts) * steps, desc=desc, enabled=progress,
                                                       unit="step") as bar, distributed.stage("generate"):
            for start in (starts[b] for b in mine):
                chunk = pairs[start : start + batch_size]
                cond = self.encode([prompts[i] for i, _ in chunk])
                lat = self.denoise(
                    cond, [seeds[j] for _, j in chunk], steps=steps, size=size,
                    guidance_scale=guidance_scale, scheduler=scheduler, on_step=lambda i, t: bar.update(1),
                )
                for (i, j), img in zip(chunk, self.decode(lat)):
                    images[i][j] = img
                    done.append((i, j))
        if distributed.active():
            distributed.gather_images(images, done)
        return images
