"""Single-file checkpoints: a diffusers SD1 / SD2 / SDXL pipeline as ONE state dict in the original key layout.

The layout is the one A1111, ComfyUI and diffusers' ``from_single_file`` read (the LDM / SGM checkpoints):

- UNet: ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``),
- VAE: ``first_stage_model.*`` (``encoder.down.{i}.block.{j}``, ``mid.attn_1.{q,k,v,proj_out}`` as 1x1 convs),
- text: SD1 ``cond_stage_model.transformer.text_model.*`` (HF CLIP names), SD2 ``cond_stage_model.model.*``
  (OpenCLIP names), SDXL ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L, HF names) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP: ``in_proj_weight`` = q/k/v stacked, ``text_projection``
  transposed, ``resblocks.{i}.ln_1`` / ``mlp.c_fc`` ...); the SDXL refiner's only encoder is
  ``conditioner.embedders.0.model.*``.

Every mapping here is the exact inverse of diffusers' ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
(diffusers/loaders/single_file_utils.py), so ``from_single_file(path, config=<diffusers folder>)`` gives
back every tensor bit-exactly. Known limits: diffusers' SD2 text encoder has 23 of OpenCLIP's 24 layers
(diffusers drops the last one on import), so an SD2 export has 23 ``resblocks`` and no ``text_projection``,
exactly what diffusers would read back; buffers the originals carry but diffusers does not keep
(``position_ids``, ``logit_scale``, EMA copies, scheduler tables) are not written.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

import torch

from .. import __version__
from ..errors import ModelLoadError
from ..fileio import save_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

# ---- UNet ---------------------------------------------------------------------------------------------
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_RE_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_RE_DOWNSAMPLE = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$")
_RE_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_RE_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_RE_UPSAMPLE = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$")


def _cfg(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _layers_per_block(config) -> int:
    lpb = _cfg(config, "layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ModelLoadError(f"UNet layers_per_block={list(lpb)} differs per block; the LDM layout needs one value")
        lpb = lpb[0]
    return int(lpb)


def _resnet_key(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise ModelLoadError(f"unknown UNet resnet parameter {rest!r}")
    return f"{_RESNET[head]}.{tail}"


def ldm_unet_key(diffusers_key: str, unet_config) -> str:
    """The LDM name (without ``model.diffusion_model.``) of one diffusers UNet parameter.

    ``unet_config``: the UNet's config (``unet.config`` or a dict) with ``layers_per_block`` and
    ``up_block_types``. Example (SD1.5): ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight``
    -> ``input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight``.
    """
    lpb = _layers_per_block(unet_config)
    stride = lpb + 1
    mod, _, param = diffusers_key.rpartition(".")
    if mod in _UNET_TOP:
        return f"{_UNET_TOP[mod]}.{param}"
    m = _RE_DOWN.match(diffusers_key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * stride + j
        return f"input_blocks.{i}.0.{_resnet_key(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    m = _RE_DOWNSAMPLE.match(diffusers_key)
    if m:
        return f"input_blocks.{1 + int(m[1]) * stride + lpb}.0.op.{m[2]}"
    m = _RE_MID.match(diffusers_key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            if j > 1:
                raise ModelLoadError(f"{diffusers_key}: the LDM middle block has two resnets")
            return f"middle_block.{2 * j}.{_resnet_key(rest)}"
        if j != 0:
            raise ModelLoadError(f"{diffusers_key}: the LDM middle block has one attention")
        return f"middle_block.1.{rest}"
    m = _RE_UP.match(diffusers_key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * stride + j
        return f"output_blocks.{i}.0.{_resnet_key(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    m = _RE_UPSAMPLE.match(diffusers_key)
    if m:
        b = int(m[1])
        up_types = _cfg(unet_config, "up_block_types", ())
        has_attn = b < len(up_types) and "Attn" in up_types[b]
        return f"output_blocks.{b * stride + lpb}.{2 if has_attn else 1}.conv.{m[2]}"
    raise ModelLoadError(f"UNet parameter {diffusers_key!r} has no place in the LDM layout")


def unet_to_ldm(unet: torch.nn.Module, prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """The UNet's state dict under LDM names (tensors are the module's own, not copies)."""
    if _cfg(unet.config, "mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ModelLoadError(f"UNet mid block {unet.config.mid_block_type!r} has no LDM layout here")
    out = {}
    for k, v in unet.state_dict().items():
        new = prefix + ldm_unet_key(k, unet.config)
        if new in out:
            raise ModelLoadError(f"two UNet parameters map to {new}")
        out[new] = v
    return out


# ---- VAE ----------------------------------------------------------------------------------------------
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RE_VAE_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_RE_VAE_DOWNSAMPLE = re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$")
_RE_VAE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_RE_VAE_UPSAMPLE = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$")
_RE_VAE_MID_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$")
_RE_VAE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def ldm_vae_key(diffusers_key: str, vae_config) -> tuple[str, bool]:
    """(LDM name without ``first_stage_model.``, whether the weight becomes a 1x1 conv)."""
    n_up = len(_cfg(vae_config, "up_block_types", ()))
    for part in ("encoder", "decoder"):
        if diffusers_key.startswith(part + ".conv_norm_out."):
            return diffusers_key.replace(".conv_norm_out.", ".norm_out."), False
        if diffusers_key.startswith((part + ".conv_in.", part + ".conv_out.")):
            return diffusers_key, False
    if diffusers_key.startswith(("quant_conv.", "post_quant_conv.")):
        return diffusers_key, False
    m = _RE_VAE_DOWN.match(diffusers_key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}", False
    m = _RE_VAE_DOWNSAMPLE.match(diffusers_key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    m = _RE_VAE_UP.match(diffusers_key)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}", False
    m = _RE_VAE_UPSAMPLE.match(diffusers_key)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    m = _RE_VAE_MID_RES.match(diffusers_key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}", False
    m = _RE_VAE_MID_ATTN.match(diffusers_key)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    raise ModelLoadError(f"VAE parameter {diffusers_key!r} has no place in the LDM layout")


def vae_to_ldm(vae: torch.nn.Module, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in vae.state_dict().items():
        new, conv = ldm_vae_key(k, vae.config)
        if conv and v.dim() == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[prefix + new] = v
    return out


# ---- text encoders ------------------------------------------------------------------------------------
def _text_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF CLIP state dict with every text-model key under ``text_model.`` (transformers 5 flattened
    ``CLIPTextModel``; ``CLIPTextModelWithProjection`` still wraps it)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if k.startswith("text_model.") or k == "text_projection.weight":
            out[k] = v
        else:
            out["text_model." + k] = v
    return out


def clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L in HF naming under ``prefix`` (SD1 / SDXL's first encoder)."""
    return {prefix + k: v for k, v in _text_state(text_encoder).items()}


_RE_OC_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OC_LAYER = {
    "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def open_clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP text model in OpenCLIP naming under ``prefix`` (SD2, SDXL's second encoder)."""
    sd = _text_state(text_encoder)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.t()
        else:
            m = _RE_OC_LAYER.match(k)
            if not m:
                raise ModelLoadError(f"text encoder parameter {k!r} has no place in the OpenCLIP layout")
            i, rest = int(m[1]), m[2]
            qm = re.match(r"^self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
            if qm:
                qkv.setdefault((i, qm[2]), {})[qm[1]] = v
                continue
            for old, new in _OC_LAYER.items():
                if rest.startswith(old):
                    out[f"{prefix}transformer.resblocks.{i}.{new}{rest[len(old):]}"] = v
                    break
            else:
                raise ModelLoadError(f"text encoder parameter {k!r} has no place in the OpenCLIP layout")
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ModelLoadError(f"text encoder layer {i} lacks some of q/k/v {kind}")
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


# ---- whole pipelines ----------------------------------------------------------------------------------
def detect_family(pipe) -> str:
    """'sdxl' (two encoders), 'sdxl_refiner' (only text_encoder_2), 'sd2' (linear-projection UNet), 'sd1'."""
    te, te2 = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    if te2 is not None:
        return "sdxl" if te is not None else "sdxl_refiner"
    if hasattr(pipe, "text_encoder_2"):
        return "sdxl"
    return "sd2" if bool(_cfg(pipe.unet.config, "use_linear_projection", False)) else "sd1"


def pipeline_to_ldm_state_dict(pipe, family: str | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One state dict in the original layout for a StableDiffusion(XL)Pipeline (or anything with the same
    components). ``family``: 'sd1' | 'sd2' | 'sdxl' | 'sdxl_refiner' (detected when None); ``dtype``: cast
    floating tensors (e.g. torch.float16 for distribution), else each keeps its own dtype."""
    family = family or detect_family(pipe)
    if family not in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        raise ModelLoadError(f"unknown family {family!r} for a single-file export; use sd1, sd2 or sdxl")
    sd: dict[str, torch.Tensor] = {}

    def add(part: dict[str, torch.Tensor]):
        for k, v in part.items():
            if k in sd:
                raise ModelLoadError(f"two tensors map to {k}")
            sd[k] = v

    if getattr(pipe, "unet", None) is None:
        raise ModelLoadError("the pipeline has no UNet")
    add(unet_to_ldm(pipe.unet))
    if getattr(pipe, "vae", None) is not None:
        add(vae_to_ldm(pipe.vae))
    te, te2 = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    if family == "sd1" and te is not None:
        add(clip_to_ldm(te, SD1_CLIP_PREFIX))
    elif family == "sd2" and te is not None:
        add(open_clip_to_ldm(te, SD2_OPENCLIP_PREFIX))
    elif family == "sdxl":
        if te is not None:
            add(clip_to_ldm(te, SDXL_CLIP_PREFIX))
        if te2 is not None:
            add(open_clip_to_ldm(te2, SDXL_OPENCLIP_PREFIX))
    elif family == "sdxl_refiner" and te2 is not None:
        add(open_clip_to_ldm(te2, SDXL_REFINER_OPENCLIP_PREFIX))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def save_single_file(pipe, path: str, family: str | None = None, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> str:
    """Write the pipeline as one ``.safetensors`` checkpoint in the original layout (atomically).

    Load it back with ``StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)``
    (resp. ``StableDiffusionXLPipeline``), or in A1111 / ComfyUI as a regular checkpoint.
    """
    family = family or detect_family(pipe)
    sd = pipeline_to_ldm_state_dict(pipe, family=family, dtype=dtype)
    meta = {"format": "pt", "pure_fast.family": family, "pure_fast.version": __version__}
    if metadata:
        meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return save_safetensors(sd, path, metadata=meta)
