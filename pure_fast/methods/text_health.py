"""Numerical health of the text-space methods (UCE, CURE, SPACE): degenerate token sets warn, never NaN.

All three methods work on token embeddings of the text encoder (rows of ``C_e`` / ``C_g`` / ``C_p`` for UCE
and SPACE, ``F`` / ``R`` for CURE). Degenerate inputs keep the math unchanged (the edit is what the
formula gives) but are reported by one ``warnings.warn`` line each (the CLI prints it as
``pure-fast: warning: ...``) that says what happened and what to do:

- no retain concepts: UCE / SPACE keep nothing besides the ridge ``λ ||W - W0||²``; CURE uses ``P_r = 0``
  (plain soft projection ``W (I - P_f)``). Both are valid edits, so this is a warning, not an error;
- a forget concept whose erase tokens are all (nearly) identical to its guide's tokens (UCE / SPACE): the
  erase term asks ``W c_e = W0 c_e``, so the edit is ~0 for it. Two rows are "nearly identical" when
  ``||a - b|| <= IDENTICAL_TOL * ||a||`` (1e-3; encoder rounding is ~1e-7 relative, different words in
  different contexts are far above 1e-3);
- a forget concept whose erase tokens all (nearly) coincide with tokens of one retained concept: UCE /
  SPACE then ask for two different outputs of the same input (the solve is a compromise weighted by
  ``erase_scale`` vs ``preserve_scale``); CURE keeps what the retain projector holds, so its edit there is
  only ``P_f - P_f P_r`` (small). Only concepts whose tokens *all* coincide warn: a shared prefix token
  ("Van" in "Van Gogh" / "Van Dyck") is normal;
- erase tokens (rows of ``C_e``) that are nearly collinear: at most ``d_in`` rows and the numerical rank of
  ``C_e`` (singular values above ``COLLINEAR_TOL`` = 1e-4 of the largest) below the number of rows. More rows
  than ``d_in`` (e.g. ``subject_to_end`` on a narrow encoder) are dependent by count, and a final LayerNorm
  without a trained affine part puts all rows in a ``d_in - 1`` dimensional subspace (tiny test models), so
  that case is not reported; the ridge treats it exactly the same way. ``M = λI + s_e C_eᵀC_e + ...``
  stays positive definite because λ > 0 (the ridge), so the solve is finite; the repeated direction
  simply counts several times. Below 1e-4 a direction adds ``< 1e-8 s_e σ_max²`` to M, i.e. only the ridge
  holds it. CURE needs no such warning (its SVD drops directions below ``rank_tol``);
- CURE's ``rank_tol`` leaving no forget direction (rank 0; only possible when every forget embedding is
  zero, since the largest singular value is always kept): the edit is the identity (nothing changes);
  a retain set of rank 0 means ``P_r = 0``.

Non-finite token embeddings (a broken text encoder or checkpoint) and non-finite factors / weights are
errors (:class:`~pure_fast.errors.NumericalError`, one line), checked before an edit is returned, so a NaN
edit is never produced, saved or applied.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..errors import NumericalError

IDENTICAL_TOL = 1e-3
COLLINEAR_TOL = 1e-4


def phrase_owners(concepts: Sequence[str], anchors, mode: str) -> list[str]:
    """The concept each phrase of ``collect.text.phrases_for(concepts, anchors, mode)`` belongs to (same order)."""
    if mode == "concepts" or not anchors:
        return list(concepts)
    if isinstance(anchors, dict):
        out = []
        for c in concepts:
            out += [c] * len(anchors.get(c, [c]))
        return out
    by_len = sorted(concepts, key=len, reverse=True)
    return [next((c for c in by_len if c.lower() in p.lower()), p) for p in anchors]


def row_owners(enc, owners: Sequence[str], mode: str) -> list[str]:
    """Owner of every row of ``collect.text.select_tokens(enc, mode)``."""
    out = []
    for i, o in enumerate(owners):
        out += [o] * len(enc.positions(i, mode))
    return out


def check_finite(method: str, what: str, **tensors: torch.Tensor) -> None:
    """Raise NumericalError (one line) when any of ``tensors`` holds NaN / Inf."""
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NumericalError(f"{method}: {bad} non-finite value(s) in {what} ({name}); the model's text encoder "
                                 "or weights hold NaN/Inf: check the checkpoint (nothing was changed)")


def warn_empty_retain(method: str, consequence: str) -> None:
    warnings.warn(f"{method}: no retain concepts, so {consequence}; list retain concepts (--retain) to protect "
                  "related concepts", stacklevel=3)


def _near(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] bool: ``||a_i - b_j|| <= IDENTICAL_TOL * ||a_i||`` (and a_i not zero)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    dist = torch.cdist(a, b)
    na = a.norm(dim=1, keepdim=True)
    return (dist <= IDENTICAL_TOL * na) & (na > 0)


def identical_to_guide(C_e: torch.Tensor, C_g: torch.Tensor, owners: Sequence[str]) -> list[str]:
    """Forget concepts whose every erase row (nearly) equals its paired guide row."""
    a, b = C_e.to(torch.float64), C_g.to(torch.float64)
    same = (a - b).norm(dim=1) <= IDENTICAL_TOL * a.norm(dim=1)
    out = []
    for c in dict.fromkeys(owners):
        rows = [i for i, o in enumerate(owners) if o == c]
        if rows and bool(same[rows].all()):
            out.append(c)
    return out


def identical_to_retain(C_e: torch.Tensor, owners_e: Sequence[str], C_p: torch.Tensor,
                        owners_p: Sequence[str]) -> list[tuple[str, str]]:
    """(forget, retain) pairs where every erase row of the forget concept (nearly) equals a row of that retain
    concept."""
    if not C_e.shape[0] or not C_p.shape[0]:
        return []
    near = _near(C_e, C_p)
    out = []
    for c in dict.fromkeys(owners_e):
        rows = [i for i, o in enumerate(owners_e) if o == c]
        for r in dict.fromkeys(owners_p):
            cols = [j for j, o in enumerate(owners_p) if o == r]
            if rows and cols and bool(near[rows][:, cols].any(1).all()):
                out.append((c, r))
                break
    return out


def numerical_rank(C: torch.Tensor, tol: float = COLLINEAR_TOL) -> tuple[int, float]:
    """(rank of the rows of C at ``tol`` × σ_max, σ_min / σ_max over min(rows, cols) singular values)."""
    if C.shape[0] == 0:
        return 0, 0.0
    S = torch.linalg.svdvals(C.to(torch.float64))
    if not S.numel() or float(S[0]) == 0.0:
        return 0, 0.0
    return int((S > tol * S[0]).sum()), float(S[-1] / S[0])


def warn_uce_tokens(method: str, tok, retain: Sequence[str], lam: float, guides: dict | None = None) -> None:
    """UCE / SPACE: check the token sets (``methods.uce.TextTokens``) and warn about degenerate ones."""
    check_finite(method, "the token embeddings", C_e=tok.C_e, C_g=tok.C_g, C_p=tok.C_p)
    if not retain:
        warn_empty_retain(method, f"nothing is preserved besides the ridge lam*||W - W0||^2 (lam={lam:g}): other "
                                  "concepts sharing the erased tokens' directions change too")
    owners = tok.erase_owner or ["forget"] * tok.C_e.shape[0]
    same = identical_to_guide(tok.C_e, tok.C_g, owners)
    if same:
        c = same[0]
        warnings.warn(f"{method}: the erase tokens of {c!r} are (nearly) identical to those of its guide "
                      f"{(guides or {}).get(c, '?')!r}, so the edit for it is ~0 ({len(same)} concept(s) affected); choose a "
                      "guide that differs from the concept", stacklevel=2)
    if tok.C_p.shape[0]:
        pairs = identical_to_retain(tok.C_e, owners, tok.C_p, tok.preserve_owner or ["retain"] * tok.C_p.shape[0])
        if pairs:
            c, r = pairs[0]
            warnings.warn(f"{method}: the erase tokens of {c!r} are (nearly) identical to the tokens of retained "
                          f"concept {r!r}: erasing and preserving the same tokens conflict, the result is a compromise "
                          "weighted by erase_scale vs preserve_scale; remove one of them", stacklevel=2)
    n, d = tok.C_e.shape
    rank, ratio = numerical_rank(tok.C_e)
    if 2 <= n <= d and rank < n:
        warnings.warn(f"{method}: the {n} erase tokens are nearly collinear (numerical rank {rank} of {n}, "
                      f"smallest relative singular value {ratio:.1e}): the ridge lam={lam:g} keeps M invertible and "
                      "the edit finite, repeated directions just weigh more; drop duplicate concepts or prompts",
                      stacklevel=2)


__all__ = ["COLLINEAR_TOL", "IDENTICAL_TOL", "check_finite", "identical_to_guide", "identical_to_retain",
           "numerical_rank", "phrase_owners", "row_owners", "warn_empty_retain", "warn_uce_tokens"]
