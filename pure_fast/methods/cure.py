"""CURE: a soft spectral projector in text space, one right matrix for all layers (DESIGN.md "CURE").

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

- ``alpha`` = 2, and 5 for ``--category nsfw`` (``CureOptions.for_category``); α <= 0 is refused;
- tokens: ``prompts='concepts'`` (the concept names) and ``token_mode='subject_to_eos'`` (the subject's
  tokens and EOS, so a single-token concept still gives more than one direction and the EOS summary of the
  prompt is included); ``last_subject`` / ``subject_to_end`` and ``prompts='anchors'`` (category templates)
  are available, with the same conventions as UCE (``collect/text.py``);
- the rank of F and R: singular values below ``rank_tol`` × σ_max are dropped (their energy share is ~0);
- no centring (CURE projects raw embeddings); an empty retain set means ``P_r = 0``;
- several forget concepts: their tokens are stacked into one F (one SVD).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..collect.text import check_prompt_mode, check_token_mode, encode_phrases, phrases_for, select_tokens
from ..edits.shared import SharedRightEdit
from ..errors import UsageError
from .uce import target_names


@dataclass
class CureOptions:
    alpha: float = 2.0
    token_mode: str = "subject_to_eos"
    prompts: str = "concepts"
    rank_tol: float = 1e-6
    edit_keys: bool = True
    edit_values: bool = True

    @classmethod
    def for_category(cls, category: str | None, **kw) -> "CureOptions":
        if category and category.lower() == "nsfw" and "alpha" not in kw:
            kw["alpha"] = 5.0
        return cls(**kw)

    def validate(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 < a < float("inf")):
            raise UsageError(f"alpha={a!r} is out of range; use a finite number > 0 (CURE's default is 2, 5 for nsfw)")
        r = self.rank_tol
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 <= r < 1):
            raise UsageError(f"rank_tol={r!r} is out of range; use a value in [0, 1)")
        check_token_mode(self.token_mode)
        check_prompt_mode(self.prompts)
        if not (self.edit_keys or self.edit_values):
            raise UsageError("edit_keys and edit_values are both off; nothing would change")


OPTIONS = CureOptions


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


def cure_tokens(adapter, forget, retain, f_prompts, r_prompts, opts) -> tuple[torch.Tensor, torch.Tensor]:
    F = select_tokens(encode_phrases(adapter, phrases_for(forget, f_prompts, opts.prompts)), opts.token_mode)
    if retain:
        R = select_tokens(encode_phrases(adapter, phrases_for(retain, r_prompts, opts.prompts)), opts.token_mode)
    else:
        R = F.new_zeros(0, F.shape[1])
    return F.cpu(), R.cpu()


def make_edit(adapter, forget, retain, f_prompts, r_prompts, options=None, progress=True) -> SharedRightEdit:
    opts = options or CureOptions()
    opts.validate()
    forget, retain = list(forget), list(retain)
    timings = {}
    t0 = time.perf_counter()
    F, R = cure_tokens(adapter, forget, retain, f_prompts, r_prompts, opts)
    timings["tokens_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    U, V, k_f, k_r = cure_factors(F, R, float(opts.alpha), float(opts.rank_tol))
    timings["solve_s"] = time.perf_counter() - t0
    stats = {"timings": timings, "forget_tokens": int(F.shape[0]), "retain_tokens": int(R.shape[0]),
             "forget_rank": k_f, "retain_rank": k_r, "rank": int(U.shape[1])}
    return SharedRightEdit(
        method="cure", family=adapter.family, concepts={"forget": forget, "retain": retain},
        options=asdict(opts), stats=stats, shapes=target_names(adapter, opts.edit_keys, opts.edit_values),
        **SharedRightEdit.pack(U, V),
    )
