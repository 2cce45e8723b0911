"""The cross-attention K/V weights of a UNet, read by name from its safetensors file(s), one tensor at a time.

Text-space methods (UCE, CURE, SPACE), their exports and the fingerprints use only the ``attn2.to_k`` /
``attn2.to_v`` weights (SD1.5: 32 tensors, 19 M of the UNet's 860 M parameters; SDXL: 140 tensors, 341 M of
2.6 B). :class:`KVFiles` is a read-only mapping name -> tensor over exactly those: the header says which
tensors exist and their shapes; ``kv[name]`` reads that one tensor (``safetensors.safe_open``, memory-mapped,
in the dtype stored), checks it is finite, and returns it in the dtype the full pipeline would hold it in
(``dtype``: what ``--dtype`` asks for, else float32, the dtype diffusers builds a UNet in) on ``device``.
Nothing is cached: a caller that walks the mapping holds one tensor at a time.

Where the tensors are:

- a diffusers folder: ``unet/diffusion_pytorch_model.safetensors``, or the shards listed by
  ``unet/diffusion_pytorch_model.safetensors.index.json`` (what ``from_pretrained`` reads without a variant);
- a single-file checkpoint: ``model.diffusion_model.<LDM name>`` (``export/single_file.ldm_unet_key``), with
  the UNet config of the local ``--config`` folder.

The weight names (and their order: down blocks, up blocks, mid block, as ``named_modules`` lists them and
``adapters/layers.find_cross_attention_layers`` returns them) follow from the UNet config
(:func:`attn2_names`); a file that lacks one of them, or holds attn2 K/V tensors the config does not
explain, is refused in one line.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any, Iterator

import torch

from ..errors import ModelLoadError
from .layers import CrossAttnLayer

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
LDM_UNET_PREFIX = "model.diffusion_model."
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def attn2_layers(config: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``(module path, heads)`` of every ``attn2`` of a ``UNet2DConditionModel`` with this config, in
    ``named_modules`` order (down blocks, up blocks, mid block), as diffusers builds the UNet."""
    down = list(config.get("down_block_types") or ())
    up = list(config.get("up_block_types") or ())
    n = len(down)
    lpb = _per_block(config.get("layers_per_block", 2), n)
    tlpb = _per_block(config.get("transformer_layers_per_block", 1) or 1, n)
    heads = _per_block(config.get("num_attention_heads") or config.get("attention_head_dim") or 8, n)
    rev_tlpb = config.get("reverse_transformer_layers_per_block") or list(reversed(tlpb))
    rev_lpb, rev_heads = list(reversed(lpb)), list(reversed(heads))
    out = []
    for i, kind in enumerate(down):
        if "CrossAttn" in kind:
            per = _per_block(tlpb[i], int(lpb[i]))
            out += [(f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2", int(heads[i]))
                    for j in range(int(lpb[i])) for k in range(int(per[j]))]
    for i, kind in enumerate(up):
        if "CrossAttn" in kind:
            per = _per_block(rev_tlpb[i], int(rev_lpb[i]) + 1)
            out += [(f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2", int(rev_heads[i]))
                    for j in range(int(rev_lpb[i]) + 1) for k in range(int(per[j]))]
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid and "CrossAttn" in mid:
        out += [(f"mid_block.attentions.0.transformer_blocks.{k}.attn2", int(heads[-1]))
                for k in range(int(_per_block(tlpb[-1], 1)[0]))]
    return out


def attn2_names(config: Mapping[str, Any]) -> list[str]:
    """Every ``attn2`` K and V weight name (K then V per layer), in layer order."""
    return [f"{m}.to_{kv}.weight" for m, _ in attn2_layers(config) for kv in ("k", "v")]


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what}: {path} is not a JSON object")
    return data


def _header(path: str) -> dict:
    from ..fileio import read_safetensors_header

    return read_safetensors_header(path, ModelLoadError)


def folder_unet_files(folder: str) -> dict[str, str]:
    """Tensor name -> file for the UNet of a diffusers folder (one file, or the shards of the index)."""
    unet = os.path.join(folder, "unet")
    single = os.path.join(unet, WEIGHTS_NAME)
    if os.path.isfile(single):
        return {k: single for k in _header(single) if k != "__metadata__"}
    index = os.path.join(unet, INDEX_NAME)
    if os.path.isfile(index):
        weight_map = read_json(index, "UNet shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} has no weight_map (name -> shard file)")
        for shard in set(weight_map.values()):
            if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(unet, shard)):
                raise ModelLoadError(f"{index} lists the shard {shard!r}, which is not a file in {unet}")
        return {k: os.path.join(unet, v) for k, v in weight_map.items()}
    raise ModelLoadError(f"{folder}: no UNet safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME} in unet/); "
                         "pickle .bin weights are never loaded: re-save with safe_serialization=True")


class KVFiles(Mapping):
    """Read-only mapping K/V weight name -> tensor, read from the files on every access (module docstring).

    ``lazy`` tells consumers (fingerprints, exports) to walk it one tensor at a time. ``shapes`` and the
    stored dtypes come from the headers, without reading any tensor.
    """

    lazy = True

    def __init__(self, where: dict[str, tuple[str, str, tuple[int, ...], str]], layers: list[tuple[str, int]],
                 *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", source: str = "",
                 config: Mapping[str, Any] | None = None):
        self._where = dict(where)  # name -> (file, key in the file, shape, safetensors dtype string)
        self._layers = list(layers)
        self.dtype = dtype or torch.float32
        self.device = torch.device(device)
        self.source = source
        self.config = dict(config or {})  # the UNet config the names come from
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: w[2] for n, w in self._where.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def stored_dtypes(self) -> set[str]:
        return {w[3] for w in self._where.values()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def _handle(self, path: str):
        with self._lock:
            h = self._handles.get(path)
            if h is None:
                from safetensors import safe_open

                h = self._handles[path] = safe_open(path, framework="pt")
            return h

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype and all), checked finite."""
        path, key, shape, _ = self._where[name]
        try:
            t = self._handle(path).get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ModelLoadError(f"cannot read {key} from {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        if tuple(t.shape) != tuple(shape):
            raise ModelLoadError(f"{path}: {key} has shape {tuple(t.shape)}, its header says {tuple(shape)}")
        if t.is_floating_point():
            from ..errors import NumericalError
            from ..ops.finite import finite_stats

            bad, _ = finite_stats(t)
            if bad:
                raise NumericalError(f"the UNet weight {name} holds {bad} NaN/Inf value(s); the checkpoint is corrupt "
                                     "(re-download or re-convert it)")
        return t

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        return self.read(name).to(self.device, self.dtype)

    def layers(self) -> list[CrossAttnLayer]:
        """Every attn2 layer (``module`` is None: there is no UNet), in layer order."""
        out = []
        for path, heads in self._layers:
            d_out, d_in = self._where[f"{path}.to_k.weight"][2]
            out.append(CrossAttnLayer(name=path, module=None, d_out=int(d_out), d_in=int(d_in), heads=heads))
        return out

    def subset(self, names) -> "KVFiles":
        """The same files, only ``names`` (in that order); layers keep their K and V if either is kept."""
        names = list(names)
        paths = {n.rsplit(".", 2)[0] for n in names}
        return KVFiles({n: self._where[n] for n in names}, [l for l in self._layers if l[0] in paths],
                       dtype=self.dtype, device=self.device, source=self.source, config=self.config)

    def close(self) -> None:
        with self._lock:
            self._handles.clear()


def _kv_from(names_in_file: dict[str, str], headers: dict[str, dict], config: Mapping[str, Any], key_of,
             what: str, **kw) -> KVFiles:
    layers = attn2_layers(config)
    names = [f"{m}.to_{kv}.weight" for m, _ in layers for kv in ("k", "v")]
    if not names:
        raise ModelLoadError(f"{what}: the UNet config has no cross-attention (attn2) layers")
    where = {}
    for name in names:
        key = key_of(name)
        path = names_in_file.get(key)
        info = headers.get(path, {}).get(key) if path else None
        if info is None:
            raise ModelLoadError(f"{what}: the UNet weight {key} is missing; the file does not match the UNet config "
                                 "(another model family, or fused K/V projections)")
        if info.get("dtype") not in _ST_DTYPES or len(info["shape"]) != 2:
            raise ModelLoadError(f"{what}: {key} is a {info.get('dtype')} tensor of shape {info['shape']}; expected "
                                 "a floating-point matrix")
        where[name] = (path, key, tuple(int(s) for s in info["shape"]), info["dtype"])
    expected = {key_of(n) for n in names}
    extra = sorted(k for k in names_in_file if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))
                   and k not in expected)
    if extra:
        raise ModelLoadError(f"{what}: {extra[0]} is not a cross-attention weight of this UNet config; the file does "
                             "not match the config")
    return KVFiles(where, layers, config=config, **kw)


def kv_from_folder(folder: str, *, dtype=None, device="cpu") -> KVFiles:
    """The K/V weights of a diffusers folder's UNet (config from ``unet/config.json``)."""
    config = read_json(os.path.join(folder, "unet", "config.json"), "UNet config")
    files = folder_unet_files(folder)
    headers = {p: _header(p) for p in set(files.values())}
    return _kv_from(files, headers, config, lambda n: n, f"{folder}/unet", dtype=dtype, device=device,
                    source=os.path.abspath(folder))


def kv_from_single_file(path: str, config_folder: str, *, dtype=None, device="cpu", header: dict | None = None) -> KVFiles:
    """The K/V weights of a single-file (LDM / SGM layout) checkpoint; names from ``config_folder``'s UNet."""
    from ..export.single_file import ldm_unet_key

    config = read_json(os.path.join(config_folder, "unet", "config.json"), "UNet config (--config)")
    header = header if header is not None else _header(path)
    names = {k: path for k in header if k != "__metadata__"}
    return _kv_from(names, {path: header}, config, lambda n: LDM_UNET_PREFIX + ldm_unet_key(n, config), path,
                    dtype=dtype, device=device, source=os.path.abspath(path))
