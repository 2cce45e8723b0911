"""A light adapter for the text-space methods (UCE, CURE, SPACE) and exports: text encoder(s) + K/V weights.

UCE, CURE and SPACE need the token embeddings that feed ``to_k`` / ``to_v`` and the ``attn2.to_k/to_v``
weights themselves, never the rest of the UNet or the VAE. :class:`TextOnlyAdapter` offers exactly that:

- ``encode_tokens`` / ``tokenize``: the embeddings the full pipeline's ``encode_prompt`` gives (SD1/SD2:
  the CLIP text model's last hidden state; SDXL: both encoders' penultimate hidden states concatenated,
  cast to text_encoder_2's dtype), computed by the transformers models alone, loaded from the folder's
  ``text_encoder*`` / ``tokenizer*`` sub-folders (``transformers.<Class>.from_pretrained``, the classes
  named in ``model_index.json``, the dtypes ``from_pretrained`` gives them in the pipeline: ``--dtype`` or
  as stored). For a single-file checkpoint only the text-encoder tensors are read from the file and
  converted by diffusers' own single-file converter, with the tokenizers and configs of ``--config``;
- ``kv_weights()``: a lazy :class:`~pure_fast.adapters.kv_files.KVFiles` mapping (one tensor per access);
- ``cross_attention_layers()``: the attn2 layers from the UNet config and the file headers (no module);
- ``release_text_encoders()``: drops the encoders once the embeddings exist (methods call it).

No diffusers import happens for a diffusers folder (a single file needs diffusers' converter). Results are
those of the full-pipeline adapters (tests/test_text_only.py compares embeddings, edits and fingerprints).
``unet`` and ``pipe`` are None: anything that needs the UNet module (collection, generation, ``apply`` in
memory) needs ``load_model(..., parts="all")``.
"""
from __future__ import annotations

import gc
import os
from typing import Sequence

import torch

from ..errors import ModelLoadError
from .base import ModelAdapter, TokenEmbeddings
from .kv_files import KVFiles, kv_from_folder, kv_from_single_file, read_json
from .model_files import check_single_file_spec, family_from, pickle_only_components, pipeline_class_name, quiet_libraries

TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
# single-file checkpoints: the key prefixes of each text encoder (SD1/SD2: one; SDXL: CLIP-L, then OpenCLIP bigG)
SINGLE_FILE_TEXT_PREFIXES = {"sd1": ("cond_stage_model.",), "sd2": ("cond_stage_model.",),
                             "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1.")}


def _text_components(index: dict, where: str) -> list[tuple[str, str, str, str]]:
    """``(tokenizer folder, tokenizer class, encoder folder, encoder class)`` per text encoder, in the
    pipeline's order (text_encoder, then text_encoder_2)."""
    out = []
    for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        t, e = index.get(tok), index.get(enc)
        if not (isinstance(e, list) and len(e) == 2 and e[1]):
            continue
        if e[1] not in TEXT_CLASSES or not (isinstance(t, list) and len(t) == 2 and t[1] in TOKENIZER_CLASSES):
            raise ModelLoadError(f"{where}: text components {tok}={t} / {enc}={e} are not supported (expected "
                                 f"{' or '.join(TEXT_CLASSES)} with a CLIP tokenizer)")
        out.append((tok, t[1], enc, e[1]))
    if not out:
        raise ModelLoadError(f"{where}: model_index.json names no text encoder")
    return out


def _quiet_transformers():
    import transformers  # noqa: F401 - imported here so that quiet_third_party switches it

    from ..progress import quiet_third_party

    quiet_third_party()


class TextOnlyAdapter(ModelAdapter):
    """Text encoder(s) + lazily read K/V weights of an SD1/SD2/SDXL model (module docstring)."""

    def __init__(self, family: str, encoders: list, kv: KVFiles, *, device="cpu", dtype=torch.float32):
        super().__init__(None, None, device=device, dtype=dtype)
        self.family = family
        self._encoders = list(encoders)  # [(tokenizer, text model)] in the pipeline's order
        self._tokenizer = self._encoders[0][0] if self._encoders else None
        self.kv = kv

    # ---- text -------------------------------------------------------------------------------------
    def _models(self):
        if not self._encoders or any(m is None for _, m in self._encoders):
            raise RuntimeError("the text encoders were released (release_text_encoders); load the model again")
        return self._encoders

    @staticmethod
    def _ids(tokenizer, prompts):
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")

    @torch.no_grad()
    def encode_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, T, d_in] encoder_hidden_states as the pipeline's ``encode_prompt`` computes them."""
        encoders = self._models()
        if self.family != "sdxl":
            tok, model = encoders[0]
            t = self._ids(tok, prompts)
            mask = t.attention_mask.to(self.device) if getattr(model.config, "use_attention_mask", False) else None
            embeds = model(t.input_ids.to(self.device), attention_mask=mask)[0]
            return embeds.to(dtype=model.dtype, device=self.device)
        states = []
        for tok, model in encoders:
            t = self._ids(tok, prompts)
            states.append(model(t.input_ids.to(self.device), output_hidden_states=True).hidden_states[-2])
        return torch.concat(states, dim=-1).to(dtype=encoders[-1][1].dtype, device=self.device)

    @torch.no_grad()
    def encode_tokens(self, prompts: Sequence[str]) -> TokenEmbeddings:
        t = self._ids(self._tokenizer, prompts)
        embeds = self.encode_embeds(prompts).to(self.dtype)
        return TokenEmbeddings(embeds, t.attention_mask.to(embeds.device), t.input_ids.to(embeds.device))

    def tokenize(self, prompt: str) -> list[str]:
        return self._tokenizer.tokenize(prompt)

    @property
    def max_prompt_tokens(self) -> int:
        return int(self._tokenizer.model_max_length)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self._tokenizer(prompt, truncation=False).input_ids)

    def release_text_encoders(self) -> None:
        """Drop the text models (the tokenizer stays: ``tokenize`` still works)."""
        self._encoders = [(tok, None) for tok, _ in self._encoders]
        gc.collect()

    def done_with_text(self) -> None:
        if self.free_text_after_use:
            self.release_text_encoders()

    # ---- layers -----------------------------------------------------------------------------------
    def cross_attention_layers(self):
        return self.kv.layers()

    def kv_weights(self) -> KVFiles:
        return self.kv

    @property
    def unet_config(self) -> dict:
        """The UNet's config (from ``unet/config.json``; no UNet is built)."""
        return self.kv.config

    def weight_names(self) -> list[str]:
        return list(self.kv)


def _load_encoders(components, folder: str, dtype):
    import transformers

    _quiet_transformers()
    out = []
    for tok_dir, tok_cls, enc_dir, enc_cls in components:
        kw = {"local_files_only": True}
        try:
            tok = getattr(transformers, tok_cls).from_pretrained(os.path.join(folder, tok_dir), **kw)
            if dtype is not None:
                kw["dtype"] = dtype
            model = getattr(transformers, enc_cls).from_pretrained(os.path.join(folder, enc_dir), use_safetensors=True,
                                                                   **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {enc_dir} / {tok_dir} of {folder}: {str(exc).splitlines()[0]}") from None
        out.append((tok, model.eval()))
    return out


def _load_single_file_encoders(path: str, header: dict, family: str, components, config: str, dtype):
    """Text encoders of a single-file checkpoint: only their tensors are read, converted by diffusers'
    ``create_diffusers_clip_model_from_ldm`` (what ``from_single_file`` calls) with ``config``'s configs."""
    import transformers
    from safetensors import safe_open

    _quiet_transformers()
    quiet_libraries()
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    prefixes = SINGLE_FILE_TEXT_PREFIXES[family]
    if len(prefixes) != len(components):
        raise ModelLoadError(f"{config}: {len(components)} text encoder(s) for a {family} checkpoint")
    out = []
    with safe_open(path, framework="pt") as f:
        for prefix, (tok_dir, tok_cls, enc_dir, enc_cls) in zip(prefixes, components):
            keys = [k for k in header if k.startswith(prefix)]
            if not keys:
                raise ModelLoadError(f"{path} holds no text encoder tensors ({prefix}*); a checkpoint without its "
                                     "text encoder cannot be used for text-space methods")
            state = {k: f.get_tensor(k) for k in keys}
            try:
                model = create_diffusers_clip_model_from_ldm(
                    getattr(transformers, enc_cls), state, subfolder=enc_dir, config=config, torch_dtype=dtype,
                    local_files_only=True)
                tok = getattr(transformers, tok_cls).from_pretrained(os.path.join(config, tok_dir), local_files_only=True)
            except Exception as exc:  # diffusers raises many types for a checkpoint that does not fit
                raise ModelLoadError(f"cannot load the text encoder {enc_dir} of {path} with config {config}: "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
            del state
            out.append((tok, model.eval()))
    return out


def load_text_only(spec: str, *, config: str | None = None, device="cpu", dtype=None,
                   text: bool = True) -> TextOnlyAdapter:
    """A :class:`TextOnlyAdapter` for a diffusers folder, or a ``.safetensors`` file plus ``config``.

    ``text=False``: no text encoders at all (exports and fingerprints need only the K/V weights).
    Paths are checked as ``loading.load_pipeline`` checks them (same messages)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.path.exists(spec):
        raise ModelLoadError(f"model path {spec} does not exist")
    if os.path.isdir(spec):
        folder, single = spec, None
    else:
        check_single_file_spec(spec, config)
        folder, single = config, spec
    class_name = pipeline_class_name(folder)
    if not ("XL" in class_name or class_name.startswith("StableDiffusion")):
        raise ModelLoadError(f"pipeline type {class_name} is not supported (supported: StableDiffusion 1.x/2.x, SDXL)")
    if single is None:
        pickled = pickle_only_components(folder)
        if pickled:
            raise ModelLoadError(
                f"{folder}: component(s) {', '.join(pickled)} have only pickle weights (.bin/.ckpt), which are never "
                "loaded (they can run code); convert the folder to safetensors (save_pretrained(..., "
                "safe_serialization=True) in a trusted environment)")
    index = read_json(os.path.join(folder, "model_index.json"), "pipeline index")
    family = family_from(class_name, read_json(os.path.join(folder, "unet", "config.json"), "UNet config"))
    components = _text_components(index, folder) if text else []
    if single is None:
        kv = kv_from_folder(folder, dtype=dtype, device=device)
        encoders = _load_encoders(components, folder, dtype) if text else []
    else:
        from .kv_files import _header

        header = _header(single)
        kv = kv_from_single_file(single, config, dtype=dtype, device=device, header=header)
        encoders = _load_single_file_encoders(single, header, family, components, config, dtype) if text else []
    encoders = [(tok, m.to(device)) for tok, m in encoders]
    adapter = TextOnlyAdapter(family, encoders, kv, device=device, dtype=dtype or torch.float32)
    adapter.source = {"model": os.path.abspath(spec), "config": os.path.abspath(config) if config else None}
    return adapter
