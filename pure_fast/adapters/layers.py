"""The cross-attention layers of a UNet: what every method reads and every edit changes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelLoadError


@dataclass(frozen=True)
class CrossAttnLayer:
    """One cross-attention layer: ``module`` is the diffusers ``Attention`` named ``name`` in the UNet."""

    name: str  # module path inside the UNet, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    module: Any = field(repr=False, compare=False)
    d_out: int  # to_k.out_features == to_v.out_features == inner dim of the attention output
    d_in: int  # to_k.in_features == cross_attention_dim (text embedding width)
    heads: int

    @property
    def key_weight(self) -> str:
        return f"{self.name}.to_k.weight"

    @property
    def value_weight(self) -> str:
        return f"{self.name}.to_v.weight"


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
