"""UCE: unified concept editing ("Unified Concept Editing in Diffusion Models", WACV 2024, arXiv:2308.14761),
the closed form with ridge, as one shared right matrix.

For every edited weight (``to_k`` and ``to_v`` of every ``attn2``), UCE solves::

    min_W  s_e Σ_e ||W c_e - W0 c_g||² + s_p Σ_p ||W c_p - W0 c_p||² + λ ||W - W0||²_F
    W = (λ W0 + s_e Σ W0 c_g c_eᵀ + s_p Σ W0 c_p c_pᵀ)(λ I + s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ)⁻¹
      = W0 B M⁻¹ = W0 A

``M`` (the right matrix) and ``B`` (the left matrix without W0) live in text space (``d_in x d_in``) and do
not depend on the layer, so ONE float64 Cholesky factorisation serves all layers (the official code inverts
once per matrix: 32 times on SD1.5, 140 on SDXL). Moreover ``B - M = s_e Σ (c_g - c_e) c_eᵀ``, hence::

    A - I = s_e (C_g - C_e) C_eᵀ M⁻¹ = U Vᵀ,   U = s_e (C_g - C_e),  V = M⁻¹ C_e   ([d_in, r])

with r = number of erase tokens. Storing ``(U, V)`` is exact (no truncation; the rank is algebraic), the edit
is a :class:`~pure_fast.edits.shared.SharedRightEdit` applied as ``W + (W U) Vᵀ`` in one batched product per
shape group. (When ``2 r >= d_in`` the dense A is stored instead.)

Choices (options, all recorded in ``edit.options``):

- ``lam`` = 0.5 (UCE's default), must be > 0 (it makes M positive definite for any token set);
- ``erase_scale`` = 1.0; ``preserve_scale`` = None means ``max(0.1, 1 / number of retain concepts)`` (what
  UCE's public ``train_erase.py`` does when no preserve scale is given);
- ``guide`` = ``''``: every forget concept is mapped to the empty prompt, whose "subject" token is the BOS
  token (``collect/text.py``); a string applies to every concept, a list gives one guide per forget concept
  (same order), a dict maps concept -> guide (missing concepts get ``''``). UCE's artist setting uses
  ``guide='art'``;
- ``token_mode`` = ``last_subject`` (CLIP: index ``mask.sum() - 2``); ``subject_to_eos`` / ``subject_to_end``
  also edit the later tokens (see ``collect/text.py`` for how erase and guide tokens pair up);
- ``prompts`` = ``concepts``: the concept names themselves are encoded (as UCE does); ``anchors`` uses the
  category templates (``--category``), each erase anchor paired with the same template around the guide;
- preserved tokens are the retain concepts' tokens selected the same way (``token_mode``); the guide
  concepts are not preserved unless listed in ``retain``;
- ``edit_keys`` / ``edit_values`` (both on, UCE's ``with_to_k=True``).

Several forget concepts are erased in one solve (their tokens are stacked in C_e).

Numerical health (``methods/text_health.py``; the math is unchanged, each case is one warning line):
no retain concepts (only the ridge λ preserves anything); a forget concept whose erase tokens equal its
guide's (edit ~0) or a retained concept's (conflicting targets); nearly collinear erase tokens (rank-deficient
C_e: λ > 0 keeps M positive definite, so the solve stays finite). Non-finite token embeddings or factors
raise :class:`~pure_fast.errors.NumericalError` before an edit is returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..collect.text import (
    PROMPT_MODES,
    TOKEN_MODES,
    EncodedPhrases,
    Phrase,
    encode_phrases,
    paired_tokens,
    phrases_for,
    select_tokens,
)
from ..edits.shared import SharedRightEdit
from ..errors import UsageError
from ..options import option
from .base import EraseContext, Method
from .text_health import check_finite, phrase_owners, row_owners, warn_uce_tokens

POSITIVE = (0, math.inf, "()")


@dataclass
class UCEOptions:
    lam: float = option(0.5, range=POSITIVE, help="UCE ridge weight λ (> 0)")
    erase_scale: float = option(1.0, range=POSITIVE, help="UCE erase weight s_e (> 0)")
    preserve_scale: float | None = option(None, range=(0, math.inf, "[)"),
                                          help="UCE preserve weight s_p (None: max(0.1, 1 / retain concepts))")
    guide: Any = option("", help="guide concept(s): a string, a list (one per forget concept) or a JSON object "
                        "concept -> guide", flag=False)  # str | list[str] | dict[str, str]
    token_mode: str = option("last_subject", choices=TOKEN_MODES, help="which tokens of each phrase are edited")
    prompts: str = option("concepts", choices=PROMPT_MODES,
                          help="encode the concept names, or their category anchors")
    edit_keys: bool = option(True, help="edit the to_k weights")
    edit_values: bool = option(True, help="edit the to_v weights")

    def check(self) -> None:
        check_guide(self.guide)
        if not (self.edit_keys or self.edit_values):
            raise UsageError("edit_keys and edit_values are both off; nothing would change")


def check_guide(guide) -> None:
    if isinstance(guide, str):
        return
    if isinstance(guide, (list, tuple)) and all(isinstance(g, str) for g in guide):
        return
    if isinstance(guide, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in guide.items()):
        return
    raise UsageError(f"guide={guide!r} is not valid; use a string, a list of strings (one per forget concept) "
                     "or a JSON object concept -> guide")


def resolve_guides(guide, forget: list[str]) -> list[str]:
    """One guide string per forget concept."""
    check_guide(guide)
    if isinstance(guide, str):
        return [guide] * len(forget)
    if isinstance(guide, (list, tuple)):
        if len(guide) != len(forget):
            raise UsageError(f"guide lists {len(guide)} guides for {len(forget)} forget concepts; give one per concept")
        return list(guide)
    unknown = set(guide) - set(forget)
    if unknown:
        raise UsageError(f"guide names concept(s) that are not forgotten: {', '.join(sorted(unknown))}")
    return [guide.get(c, "") for c in forget]


def preserve_scale_of(opts, retain: list[str]) -> float:
    if opts.preserve_scale is not None:
        return float(opts.preserve_scale)
    return max(0.1, 1.0 / len(retain)) if retain else 0.0


@dataclass
class TextTokens:
    """Selected token embeddings (rows, float64): erase ``C_e``, paired guide ``C_g``, preserve ``C_p``;
    ``erase_owner`` / ``preserve_owner``: the concept of every row (for the health checks, ``text_health``)."""

    C_e: torch.Tensor
    C_g: torch.Tensor
    C_p: torch.Tensor
    erase_owner: list | None = None
    preserve_owner: list | None = None


def uce_tokens(adapter, forget, retain, f_prompts, r_prompts, opts) -> TextTokens:
    """Encode erase / guide / preserve phrases and select their tokens (``collect/text.py``)."""
    erase, guide, spans = [], [], []
    for c, g in zip(forget, resolve_guides(opts.guide, list(forget))):
        ps = phrases_for([c], {c: (f_prompts or {}).get(c) or [c]}, opts.prompts)
        spans.append((c, len(erase), len(erase) + len(ps)))
        erase += ps
        guide += [p.with_subject(g) for p in ps]
    enc_e = encode_phrases(adapter, erase)
    enc_g = encode_phrases(adapter, guide)
    ce, cg, owner_e = [], [], []
    for c, a, b in spans:  # pairing is phrase by phrase: per concept, then stacked (same rows as one call)
        e, g = paired_tokens(_phrase_slice(enc_e, a, b), _phrase_slice(enc_g, a, b), opts.token_mode)
        ce.append(e)
        cg.append(g)
        owner_e += [c] * e.shape[0]
    C_e, C_g = torch.cat(ce), torch.cat(cg)
    owner_p = []
    if retain:
        enc_p = encode_phrases(adapter, phrases_for(retain, r_prompts, opts.prompts))
        C_p = select_tokens(enc_p, opts.token_mode)
        owner_p = row_owners(enc_p, phrase_owners(retain, r_prompts, opts.prompts), opts.token_mode)
    else:
        C_p = C_e.new_zeros(0, C_e.shape[1])
    return TextTokens(C_e.cpu(), C_g.cpu(), C_p.cpu(), owner_e, owner_p)


def _phrase_slice(enc: EncodedPhrases, a: int, b: int) -> EncodedPhrases:
    return EncodedPhrases(enc.embeds[a:b], enc.first[a:b], enc.last[a:b], enc.eos[a:b])


def uce_matrices(tok: TextTokens, lam: float, s_e: float, s_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, B)`` in float64: ``M = λI + s_e C_eᵀC_e + s_p C_pᵀC_p``, ``B = λI + s_e C_gᵀC_e + s_p C_pᵀC_p``
    (rows of C are tokens, so Σ c cᵀ = Cᵀ C)."""
    d = tok.C_e.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    P = s_p * tok.C_p.T @ tok.C_p if tok.C_p.shape[0] else torch.zeros(d, d, dtype=torch.float64)
    M = lam * eye + s_e * tok.C_e.T @ tok.C_e + P
    B = lam * eye + s_e * tok.C_g.T @ tok.C_e + P
    return 0.5 * (M + M.T), B


def uce_factors(tok: TextTokens, lam: float, s_e: float, s_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``A = B M⁻¹ = I + U Vᵀ`` (float64): ``U = s_e (C_g - C_e)ᵀ``, ``V = M⁻¹ C_eᵀ``.

    ``M = λI + FᵀF`` with ``F = [√s_e C_e; √s_p C_p]`` (k token rows). When k < d, ``M⁻¹`` is applied by the
    Woodbury identity ``M⁻¹X = (X - Fᵀ(λI_k + FFᵀ)⁻¹ F X) / λ``: one k x k Cholesky instead of a d x d one
    (SDXL: d = 2048, a few to a few hundred tokens; ~400 ms -> 0.07-1 ms for 3-30 tokens on a 2-core CPU,
    ``bench/bench_uce_solve.py``: the solve is no longer what stands between UCE and 50 ms after encoding).
    Otherwise one Cholesky factorisation of M (symmetric positive definite
    since λ > 0). The two routes agree to float64 rounding (tests/test_uce.py)."""
    d = tok.C_e.shape[1]
    X = tok.C_e.T.to(torch.float64).contiguous()  # [d, r]
    F = torch.cat([math.sqrt(s_e) * tok.C_e, math.sqrt(s_p) * tok.C_p]).to(torch.float64)
    if F.shape[0] < d:
        G = F @ F.T
        G.diagonal().add_(lam)
        V = (X - F.T @ torch.cholesky_solve(F @ X, torch.linalg.cholesky(G))) / lam
    else:
        M, _ = uce_matrices(tok, lam, s_e, s_p)
        V = torch.cholesky_solve(X, torch.linalg.cholesky(M))  # [d, r]
    U = s_e * (tok.C_g - tok.C_e).T.contiguous()  # [d, r]
    return U, V


def target_names(adapter, edit_keys=True, edit_values=True) -> dict[str, tuple[int, int]]:
    """Weight name -> shape of every edited to_k / to_v weight, in the adapter's layer order."""
    out = {}
    for layer in adapter.cross_attention_layers():
        if edit_keys:
            out[layer.key_weight] = (layer.d_out, layer.d_in)
        if edit_values:
            out[layer.value_weight] = (layer.d_out, layer.d_in)
    return out


def prepare_tokens(method: str, ctx: EraseContext):
    """The start UCE and SPACE share: guides resolved, tokens encoded and checked (``warn_uce_tokens``), the
    preserve scale, timed as ``tokens_s``. Returns (tok, s_p)."""
    opts, forget, retain = ctx.options, ctx.forget, ctx.retain
    guides = resolve_guides(opts.guide, forget)
    with ctx.timed("tokens_s"):
        tok = uce_tokens(ctx.adapter, forget, retain, ctx.forget_prompts, ctx.retain_prompts, opts)
        ctx.adapter.done_with_text()
        warn_uce_tokens(method, tok, retain, float(opts.lam), dict(zip(forget, guides)))
    return tok, preserve_scale_of(opts, retain)


def make_edit(ctx: EraseContext) -> SharedRightEdit:
    opts = ctx.options
    tok, s_p = prepare_tokens("UCE", ctx)
    with ctx.timed("solve_s"):
        U, V = uce_factors(tok, float(opts.lam), float(opts.erase_scale), s_p)
        check_finite("UCE", "the edit factors", U=U, V=V)
    stats = ctx.stats(erase_tokens=int(tok.C_e.shape[0]), preserve_tokens=int(tok.C_p.shape[0]), rank=int(U.shape[1]))
    return SharedRightEdit(
        method="uce", family=ctx.adapter.family, concepts={"forget": ctx.forget, "retain": ctx.retain},
        options=ctx.options_meta(preserve_scale_used=s_p), stats=stats,
        shapes=target_names(ctx.adapter, opts.edit_keys, opts.edit_values), **SharedRightEdit.pack(U, V),
    )


METHOD = Method("uce", UCEOptions, make_edit,
                "UCE: closed-form ridge edit of the K/V weights mapping forget tokens to a guide (text space)", model_parts="text")

__all__ = ["METHOD", "UCEOptions", "make_edit", "uce_factors", "uce_matrices", "uce_tokens", "Phrase"]
