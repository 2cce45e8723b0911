"""``S = shift * I + Lᵀ R`` kept as its factors: right products ``X S`` without forming the d x d matrix.

UCE's matrices are all of this form (``methods/uce.py``; C rows are token embeddings, k tokens ≪ d):

    M = λI + s_e C_eᵀC_e + s_p C_pᵀC_p      = λI + FᵀF,      F = [√s_e C_e; √s_p C_p]     (symmetric PD)
    B = λI + s_e C_gᵀC_e + s_p C_pᵀC_p      = λI + [C_g; C_p]ᵀ [s_e C_e; s_p C_p]
    A = B M⁻¹ = I + U Vᵀ                    (``uce_factors``)

SPACE's FISTA needs ``Y M`` for every weight stack ``Y`` ([rows, d]) at every iteration. Dense, that is
``2 d`` flops per entry of Y (SDXL: d = 2048, ~1.4 TFLOP per iteration over the 140 K/V weights); factored,
``X S = shift X + (X Lᵀ) R`` costs ``4 k`` flops per entry (k = number of tokens: a handful per concept
with UCE's default ``prompts=concepts``), i.e. the iteration becomes memory bound. The factored product is
one thin GEMM into a ``[rows, k]`` scratch and one ``addmm`` (``beta = shift``) into the output, so it adds no
elementwise pass. :meth:`cheaper_than_dense` is the flop rule used by ``route="auto"`` (factored when
``2k < d``; beyond that the dense GEMM does no more work and runs at higher efficiency).

Everything else SPACE needs is exact and cheap in this form: ``λ_max(M) = shift + λ_max(F Fᵀ)`` (a k x k
eigenproblem), ``diag(M)``, and ``tr(W M Wᵀ) = shift ||W||² + ||W Fᵀ||²`` for the objective.
:meth:`dense` forms the matrix (the reference for tests, and the dense route).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ShiftedLowRank", "right_mm"]


@dataclass(frozen=True)
class ShiftedLowRank:
    """The d x d matrix ``shift * I + Lᵀ R`` (``L``, ``R``: [k, d]). ``symmetric`` marks ``L is R`` forms
    (``gram``), for which :meth:`lambda_max` is defined."""

    shift: float
    L: torch.Tensor
    R: torch.Tensor
    symmetric: bool = False

    def __post_init__(self):
        if self.L.dim() != 2 or self.L.shape != self.R.shape:
            raise ValueError(f"ShiftedLowRank: L and R must both be [k, d], got {tuple(self.L.shape)} and "
                             f"{tuple(self.R.shape)}")

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def gram(cls, shift: float, F: torch.Tensor) -> "ShiftedLowRank":
        """``shift * I + FᵀF`` (symmetric; positive definite when shift > 0)."""
        return cls(float(shift), F, F, symmetric=True)

    @classmethod
    def identity_plus(cls, U: torch.Tensor, V: torch.Tensor) -> "ShiftedLowRank":
        """``I + U Vᵀ`` (U, V: [d, r]), e.g. UCE's ``A``."""
        return cls(1.0, U.T, V.T)

    # ---- shape / conversion ---------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.L.shape[1])

    @property
    def k(self) -> int:
        return int(self.L.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d, self.d)

    @property
    def dtype(self) -> torch.dtype:
        return self.L.dtype

    @property
    def device(self) -> torch.device:
        return self.L.device

    def to(self, device=None, dtype=None) -> "ShiftedLowRank":
        L = self.L.detach().to(device=device, dtype=dtype).contiguous()
        R = L if self.symmetric else self.R.detach().to(device=device, dtype=dtype).contiguous()
        return ShiftedLowRank(self.shift, L, R, self.symmetric)

    def dense(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The d x d matrix (float64 products, then cast)."""
        L = self.L.detach().to(device=device, dtype=torch.float64)
        R = self.R.detach().to(device=device, dtype=torch.float64)
        S = L.T @ R
        S.diagonal().add_(self.shift)
        return S.to(dtype or self.dtype)

    def cheaper_than_dense(self) -> bool:
        """Flop rule: factored ``X S`` costs ~4k per entry of X, dense ~2d."""
        return 2 * self.k < self.d

    # ---- what the solvers need ------------------------------------------------------------------------
    def right_mm(self, X: torch.Tensor, out: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
        """``X S`` for X of shape [..., d] (2-D views are used for the products). ``out`` (same shape as X,
        not overlapping X) and ``scratch`` ([rows, k]) avoid allocations in loops."""
        X2 = X.reshape(-1, self.d)
        if self.k == 0:
            if out is None:
                return (X2 * self.shift).view(X.shape)
            torch.mul(X2, self.shift, out=out.view(-1, self.d))
            return out
        T = torch.mm(X2, self.L.T, out=scratch) if scratch is not None else X2 @ self.L.T
        if out is None:
            return torch.addmm(X2, T, self.R, beta=self.shift).view(X.shape)
        torch.addmm(X2, T, self.R, beta=self.shift, out=out.view(-1, self.d))
        return out

    def diagonal(self) -> torch.Tensor:
        return (self.L * self.R).sum(0) + self.shift

    def lambda_max(self) -> float:
        """Largest eigenvalue (symmetric forms only), in float64: shift + λ_max(F Fᵀ)."""
        if not self.symmetric:
            raise ValueError("lambda_max is defined for symmetric (gram) forms only")
        if self.k == 0:
            return float(self.shift)
        F = self.L.detach().to(torch.float64)
        return float(self.shift + torch.linalg.eigvalsh(F @ F.T)[-1])

    def quadratic_trace(self, W: torch.Tensor) -> torch.Tensor:
        """``tr(W S Wᵀ)`` summed over leading dims (symmetric forms), in W's dtype."""
        W2 = W.reshape(-1, self.d)
        WF = W2 @ self.L.to(W2.dtype).T
        return self.shift * (W2 * W2).sum() + (WF * (W2 @ self.R.to(W2.dtype).T)).sum()


def right_mm(X: torch.Tensor, S) -> torch.Tensor:
    """``X @ S`` for a dense matrix or a :class:`ShiftedLowRank` (moved to X's device and dtype)."""
    if isinstance(S, ShiftedLowRank):
        return S.to(X.device, X.dtype).right_mm(X)
    return X @ S.to(X.device, X.dtype)
