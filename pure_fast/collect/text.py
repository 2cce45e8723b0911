"""Token embeddings for the text-space methods (UCE, CURE, SPACE): which tokens, and how they pair up.

Everything goes through ``adapter.encode_tokens(prompts)`` (the [B, T, d_in] states that ``to_k`` /
``to_v`` multiply, as the pipeline computes them: SD1/SD2 CLIP last hidden state, SDXL both encoders'
penultimate states concatenated, the toy model's MiniLM states) and ``adapter.tokenize`` (word pieces).

Conventions
-----------
- A prompt is a :class:`Phrase` ``prefix + subject + suffix``. With ``prompts="concepts"`` (UCE's public
  code) the prompt is the concept itself (``prefix = suffix = ''``); with ``prompts="anchors"`` it is a
  category template (``"art by {}"``) and the subject is the last occurrence of the concept in it.
- Token positions (token 0 is the start token on every family: CLIP BOS, MiniLM [CLS]):
  ``first = 1 + len(tokenize(prefix))`` and ``last = len(tokenize(prefix + subject))``. For a prompt that
  is just the concept this is CLIP's ``attention_mask.sum() - 2`` (the token before EOS). Word-piece
  tokenisers split on whitespace and punctuation first, so the pieces of a prefix are the pieces the whole
  prompt starts with. ``eos = mask.sum() - 1``. A truncated prompt clamps ``last`` to ``eos - 1``.
- An empty subject (the default UCE guide ``''``) has no tokens of its own; its ``last`` is the token just
  before the slot, which for ``''`` alone is the start token (BOS): "an empty guide means the BOS token".
- ``token_mode``:
  ``last_subject``: the subject's last token only (UCE's default ``technique='replace'`` position);
  ``subject_to_eos``: every token from the subject's first token through EOS (the tokens that carry the
  concept in a causal encoder);
  ``subject_to_end``: from the subject's first token to the end of the padded sequence (EOS and padding
  included; the UNet attends to all T positions, and UCE's public code edits this range, the padding
  states of a causal CLIP encoder also carry the prompt).
- Pairing an erase prompt with its guide prompt (UCE, SPACE): positions are aligned at the subjects' last
  tokens: erase position ``p`` pairs with guide position ``last_g + max(p - last_e, 0)``, so the EOS / suffix /
  padding tokens pair with the guide's EOS / suffix / padding tokens (as in UCE's code) and every earlier
  subject token of a multi-token concept pairs with the guide's last subject token (BOS for ``''``). Pairs
  whose guide position falls outside the guide's range (past its EOS for ``subject_to_eos``, past T for
  ``subject_to_end``) are dropped, as UCE's code trims them.
- Embeddings are returned in float64 (the closed forms are solved in float64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UsageError

TOKEN_MODES = ("last_subject", "subject_to_eos", "subject_to_end")
PROMPT_MODES = ("concepts", "anchors")


@dataclass(frozen=True)
class Phrase:
    """A prompt split around its subject: ``text = prefix + subject + suffix``."""

    prefix: str
    subject: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.subject + self.suffix

    def with_subject(self, subject: str) -> "Phrase":
        return Phrase(self.prefix, subject, self.suffix)

    @staticmethod
    def locate(prompt: str, subject: str) -> "Phrase":
        """Split ``prompt`` at the last occurrence of ``subject`` (exact, else case-insensitive); a prompt that
        does not contain it is taken as all subject."""
        i = prompt.rfind(subject)
        if i < 0:
            i = prompt.lower().rfind(subject.lower())
        if i < 0 or not subject:
            return Phrase("", prompt, "")
        return Phrase(prompt[:i], prompt[i : i + len(subject)], prompt[i + len(subject) :])


def check_token_mode(mode: str, option: str = "token_mode") -> None:
    if mode not in TOKEN_MODES:
        raise UsageError(f"{option}={mode!r} is not valid; use one of {', '.join(TOKEN_MODES)}")


def check_prompt_mode(mode: str, option: str = "prompts") -> None:
    if mode not in PROMPT_MODES:
        raise UsageError(f"{option}={mode!r} is not valid; use one of {', '.join(PROMPT_MODES)}")


def phrases_for(concepts: Sequence[str], anchors: dict[str, list[str]] | list[str] | None, mode: str) -> list[Phrase]:
    """The phrases of some concepts: the concepts themselves (``mode='concepts'``) or their anchor prompts.

    ``anchors``: concept -> prompts (forget side), or a flat list (retain side; each prompt's subject is the
    longest concept it contains)."""
    if mode == "concepts" or not anchors:
        return [Phrase("", c, "") for c in concepts]
    out = []
    if isinstance(anchors, dict):
        for c in concepts:
            out += [Phrase.locate(p, c) for p in anchors.get(c, [c])]
        return out
    by_len = sorted(concepts, key=len, reverse=True)
    for p in anchors:
        subj = next((c for c in by_len if c.lower() in p.lower()), p)
        out.append(Phrase.locate(p, subj))
    return out


@dataclass
class EncodedPhrases:
    """Encoded phrases: ``embeds`` [B, T, d_in] float64 (on the adapter's device), token spans per phrase."""

    embeds: torch.Tensor
    first: list[int]
    last: list[int]
    eos: list[int]

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])

    def positions(self, i: int, mode: str) -> list[int]:
        if mode == "last_subject":
            return [self.last[i]]
        end = self.eos[i] if mode == "subject_to_eos" else self.length - 1
        return list(range(self.first[i], end + 1))


def _n_pieces(adapter, text: str) -> int:
    return len(adapter.tokenize(text)) if text.strip() else 0


@torch.no_grad()
def encode_phrases(adapter, phrases: Sequence[Phrase], batch_size: int = 32) -> EncodedPhrases:
    """Encode phrases with the adapter (in batches) and locate each subject's tokens."""
    if not phrases:
        raise ValueError("encode_phrases: no phrases")
    embeds, masks = [], []
    texts = [p.text for p in phrases]
    for s in range(0, len(texts), batch_size):
        te = adapter.encode_tokens(texts[s : s + batch_size])
        embeds.append(te.embeds.to(torch.float64))
        masks.append(te.mask)
    E = torch.cat(embeds)
    mask = torch.cat(masks)
    offset = 1 if getattr(adapter, "bos_is_first", True) else 0
    first, last, eos = [], [], []
    for i, p in enumerate(phrases):
        e = int(mask[i].sum()) - 1
        n_pre = _n_pieces(adapter, p.prefix)
        n_sub = _n_pieces(adapter, p.prefix + p.subject)
        lo = offset + n_pre
        hi = offset + n_sub - 1
        hi = max(0, min(hi, e - 1))  # truncated prompts; an empty subject at the start -> BOS
        lo = min(lo, hi) if n_sub > n_pre else hi
        first.append(lo)
        last.append(hi)
        eos.append(e)
    return EncodedPhrases(E, first, last, eos)


def select_tokens(enc: EncodedPhrases, mode: str) -> torch.Tensor:
    """Selected token embeddings of every phrase stacked as rows: [n, d_in] float64."""
    check_token_mode(mode)
    rows = [enc.embeds[i, enc.positions(i, mode)] for i in range(enc.embeds.shape[0])]
    return torch.cat(rows) if rows else enc.embeds.new_zeros(0, enc.embeds.shape[-1])


def paired_tokens(erase: EncodedPhrases, guide: EncodedPhrases, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase / guide token embeddings paired as rows (``C_e`` [n, d_in], ``C_g`` [n, d_in]), one erase phrase
    per guide phrase (same index), aligned at the subjects' last tokens (module docstring)."""
    check_token_mode(mode)
    if erase.embeds.shape[0] != guide.embeds.shape[0]:
        raise ValueError("paired_tokens: one guide phrase per erase phrase is needed")
    ce, cg = [], []
    for i in range(erase.embeds.shape[0]):
        le, lg = erase.last[i], guide.last[i]
        limit = guide.eos[i] if mode == "subject_to_eos" else guide.length - 1
        pe, pg = [], []
        for p in erase.positions(i, mode):
            q = lg + max(p - le, 0)
            if q <= limit:
                pe.append(p)
                pg.append(q)
        ce.append(erase.embeds[i, pe])
        cg.append(guide.embeds[i, pg])
    return torch.cat(ce), torch.cat(cg)
