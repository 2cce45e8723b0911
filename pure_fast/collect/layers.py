"""Finding the cross-attention layers of a UNet."""
from __future__ import annotations

import torch

from ..adapters.base import CrossAttnLayer


def find_cross_attention_layers(unet: torch.nn.Module) -> list[CrossAttnLayer]:
    """Every ``*.attn2`` Attention module with to_k/to_v, in ``named_modules`` order (mid_block last).

    Refuses a UNet whose QKV projections were fused (diffusers' ``fuse_qkv_projections``): edits to
    ``to_k``/``to_v`` would be silently ignored there.
    """
    layers = []
    for name, mod in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        if getattr(mod, "fused_projections", False) or hasattr(mod, "to_kv"):
            from ..errors import ModelLoadError

            raise ModelLoadError(
                f"{name} has fused K/V projections (fuse_qkv_projections); call unfuse_qkv_projections() first"
            )
        to_k, to_v = getattr(mod, "to_k", None), getattr(mod, "to_v", None)
        if to_k is None or to_v is None:
            continue
        layers.append(
            CrossAttnLayer(
                name=name, module=mod, d_out=to_k.out_features, d_in=to_k.in_features, heads=int(mod.heads)
            )
        )
    return layers


def get_weight(unet: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """The parameter called ``name`` (e.g. 'mid_block...attn2.to_k.weight') inside the UNet."""
    mod_path, _, attr = name.rpartition(".")
    return getattr(unet.get_submodule(mod_path), attr)
