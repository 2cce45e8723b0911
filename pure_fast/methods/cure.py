"""CURE: a soft spectral projector in text space, one right matrix for all layers (the text-space method
that PURE builds on, "Concept Unlearning via Cross-Attention Activation Projection for Diffusion Models",
arXiv:2605.25765).

From the forget token embeddings ``F`` (rows) and the retain ones ``R``:

- SVD ``F = U_f S_f V_fᵀ``; the energy share of direction i is ``r_i = σ_i² / Σ_j σ_j²``;
- soft weights ``f(r) = α r / ((α - 1) r + 1)`` (f(0) = 0, f(1) = 1, increasing for α > 0; α > 1 lifts weak
  directions toward 1, α = 1 is f(r) = r);
- ``P_f = V_f diag(f(r_f)) V_fᵀ``, ``P_r = V_r diag(f(r_r)) V_rᵀ`` (the same α for both);
- ``P_dis = P_f - P_f P_r`` and every edited weight becomes ``W (I - P_dis)``.

``I - P_dis = I - V_f diag(f) V_fᵀ (I - P_r) = I + U Vᵀ`` with ``U = -V_f diag(f)`` and
``V = (I - P_r) V_f`` (P_r is symmetric): identity minus a rank-k matrix, k = rank of F. Storing the factors
is exact, so the edit is a :class:`~pure_fast.edits.shared.SharedRightEdit` (dense A only when 2k >= d_in).

Choices (recorded in ``edit.options``):

- ``alpha`` = 2, and 5 for ``--category nsfw`` (``prompts.CATEGORY_PRESETS``); α <= 0 is refused;
- tokens: ``prompts='concepts'`` (the concept names) and ``token_mode='subject_to_eos'`` (the subject's
  tokens and EOS, so a single-token concept still gives more than one direction and the EOS summary of the
  prompt is included); ``last_subject`` / ``subject_to_end`` and ``prompts='anchors'`` (category templates)
  are available, with the same conventions as UCE (``collect/text.py``);
- the rank of F and R: singular values below ``rank_tol`` × σ_max are dropped (their energy share is ~0);
- no centring (CURE projects raw embeddings); an empty retain set means ``P_r = 0``;
- several forget concepts: their tokens are stacked into one F (one SVD).

Numerical health (``methods/text_health.py``; the math is unchanged, each case is one warning line):

- no retain concepts: ``P_r = 0``, so the edit is ``W (I - P_f)`` (every forget direction is removed,
  including what other concepts share with it);
- a forget concept whose tokens all (nearly) equal a retained concept's tokens: the edit there is only
  ``P_f - P_f P_r`` (small, not zero, since the soft weights are < 1);
- ``rank_tol`` leaving no forget direction (rank 0; the largest singular value is always kept, so this
  happens only when every forget embedding is zero): ``I - P_dis = I``, the edit changes nothing; a retain
  set of rank 0 means ``P_r = 0``;
- nearly collinear forget tokens need nothing: the SVD drops directions below ``rank_tol`` (no inversion).

Non-finite token embeddings or factors raise :class:`~pure_fast.errors.NumericalError` before an edit is
returned.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..collect.text import PROMPT_MODES, TOKEN_MODES, encode_phrases, phrases_for, select_tokens
from ..edits.shared import SharedRightEdit
from ..errors import UsageError
from ..options import option
from .base import EraseContext, Method
from .text_health import check_finite, identical_to_retain, phrase_owners, row_owners, warn_empty_retain
from .uce import target_names


@dataclass
class CureOptions:
    alpha: float = option(2.0, range=(0, math.inf, "()"), use="a finite number > 0 (CURE's default is 2, 5 for nsfw)",
                          help="CURE soft-weight exponent α (> 0; 2, 5 for nsfw)")
    token_mode: str = option("subject_to_eos", choices=TOKEN_MODES, help="which tokens of each phrase are used")
    prompts: str = option("concepts", choices=PROMPT_MODES, help="encode the concept names, or their category anchors")
    rank_tol: float = option(1e-6, range=(0, 1, "[)"), help="singular values below rank_tol x σ_max are dropped")
    edit_keys: bool = option(True, help="edit the to_k weights")
    edit_values: bool = option(True, help="edit the to_v weights")

    def check(self) -> None:
        if not (self.edit_keys or self.edit_values):
            raise UsageError("edit_keys and edit_values are both off; nothing would change")


def soft_weights(r: torch.Tensor, alpha: float) -> torch.Tensor:
    """``f(r) = α r / ((α - 1) r + 1)``."""
    return alpha * r / ((alpha - 1.0) * r + 1.0)


def spectral_basis(X: torch.Tensor, alpha: float, rank_tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [d, k], f [k])``: right-singular vectors of the rows of X and their soft weights (float64)."""
    X = X.to(torch.float64)
    d = X.shape[1]
    if X.shape[0] == 0:
        return X.new_zeros(d, 0), X.new_zeros(0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = S > rank_tol * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    S, Vh = S[keep], Vh[keep]
    energy = S * S
    r = energy / energy.sum() if energy.numel() else energy
    return Vh.T.contiguous(), soft_weights(r, alpha)


def cure_factors(F: torch.Tensor, R: torch.Tensor, alpha: float, rank_tol: float = 1e-6):
    """``(U, V)`` with ``I - P_dis = I + U Vᵀ`` (float64), plus the forget / retain ranks."""
    V_f, f_f = spectral_basis(F, alpha, rank_tol)
    V_r, f_r = spectral_basis(R, alpha, rank_tol)
    U = -V_f * f_f  # [d, k]: -V_f diag(f)
    V = V_f - V_r @ (f_r[:, None] * (V_r.T @ V_f))  # (I - P_r) V_f
    return U, V, V_f.shape[1], V_r.shape[1]


def cure_projector(F: torch.Tensor, R: torch.Tensor, alpha: float, rank_tol: float = 1e-6) -> torch.Tensor:
    """``P_dis = P_f - P_f P_r`` as a dense matrix (float64)."""
    V_f, f_f = spectral_basis(F, alpha, rank_tol)
    V_r, f_r = spectral_basis(R, alpha, rank_tol)
    P_f = V_f @ torch.diag(f_f) @ V_f.T
    P_r = V_r @ torch.diag(f_r) @ V_r.T
    return P_f - P_f @ P_r


def cure_tokens(adapter, forget, retain, f_prompts, r_prompts, opts, with_owners: bool = False):
    """``(F, R)`` token rows (float64, CPU); with ``with_owners`` also the concept of every row of F and R."""
    enc_f = encode_phrases(adapter, phrases_for(forget, f_prompts, opts.prompts))
    F = select_tokens(enc_f, opts.token_mode)
    own_f = row_owners(enc_f, phrase_owners(forget, f_prompts, opts.prompts), opts.token_mode)
    own_r = []
    if retain:
        enc_r = encode_phrases(adapter, phrases_for(retain, r_prompts, opts.prompts))
        R = select_tokens(enc_r, opts.token_mode)
        own_r = row_owners(enc_r, phrase_owners(retain, r_prompts, opts.prompts), opts.token_mode)
    else:
        R = F.new_zeros(0, F.shape[1])
    return (F.cpu(), R.cpu(), own_f, own_r) if with_owners else (F.cpu(), R.cpu())


def warn_cure_tokens(F, R, own_f, own_r, retain) -> None:
    """Health of CURE's token sets (module docstring): non-finite -> error; degenerate -> one warning each."""
    check_finite("CURE", "the token embeddings", F=F, R=R)
    if not retain:
        warn_empty_retain("CURE", "P_r = 0 and the edit is W (I - P_f): every forget direction is removed, "
                                  "including what other concepts share with it")
        return
    pairs = identical_to_retain(F, own_f, R, own_r)
    if pairs:
        c, r = pairs[0]
        warnings.warn(f"CURE: the tokens of forget concept {c!r} are (nearly) identical to those of retained concept "
                      f"{r!r}: the retain projector keeps them, so the edit for it is small (P_f - P_f P_r); remove "
                      "one of them", stacklevel=2)


def warn_cure_ranks(k_f: int, k_r: int, retain, rank_tol: float) -> None:
    if k_f == 0:
        warnings.warn(f"CURE: rank_tol={rank_tol:g} leaves no forget direction (rank 0: the forget token embeddings "
                      "are all zero), so the edit is the identity and changes nothing; check the text encoder and "
                      "the forget concepts", stacklevel=2)
    if retain and k_r == 0:
        warnings.warn(f"CURE: rank_tol={rank_tol:g} leaves no retain direction (rank 0: the retain token embeddings "
                      "are all zero), so P_r = 0 and nothing is protected; check the text encoder", stacklevel=2)


def make_edit(ctx: EraseContext) -> SharedRightEdit:
    opts, forget, retain = ctx.options, ctx.forget, ctx.retain
    with ctx.timed("tokens_s"):
        F, R, own_f, own_r = cure_tokens(ctx.adapter, forget, retain, ctx.forget_prompts, ctx.retain_prompts, opts,
                                         with_owners=True)
        ctx.adapter.done_with_text()
        warn_cure_tokens(F, R, own_f, own_r, retain)
    with ctx.timed("solve_s"):
        U, V, k_f, k_r = cure_factors(F, R, float(opts.alpha), float(opts.rank_tol))
        warn_cure_ranks(k_f, k_r, retain, float(opts.rank_tol))
        check_finite("CURE", "the edit factors", U=U, V=V)
    stats = ctx.stats(forget_tokens=int(F.shape[0]), retain_tokens=int(R.shape[0]), forget_rank=k_f, retain_rank=k_r,
                      rank=int(U.shape[1]))
    return SharedRightEdit(
        method="cure", family=ctx.adapter.family, concepts={"forget": forget, "retain": retain},
        options=ctx.options_meta(), stats=stats, shapes=target_names(ctx.adapter, opts.edit_keys, opts.edit_values),
        **SharedRightEdit.pack(U, V),
    )


METHOD = Method("cure", CureOptions, make_edit,
                "CURE: soft spectral projector off the forget token directions, one right matrix for all layers", model_parts="text")
