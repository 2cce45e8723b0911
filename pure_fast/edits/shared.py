"""The shared-right-matrix edit kind: ``W <- W A`` for every target weight, with ONE ``d_in x d_in`` matrix A.

Text-space closed forms (UCE, CURE: ``methods/uce.py``, ``methods/cure.py``) change every ``to_k`` / ``to_v`` weight by right
multiplication with the same matrix, because their targets are all of the form ``W0 · (something in text
space)``:

- UCE: ``W = W0 B M^{-1} = W0 A`` with ``A - I = s_e (C_g - C_e) C_e^T M^{-1}``;
- CURE: ``W = W0 (I - P_dis)`` with ``I - P_dis = I - V_f diag(f) V_f^T (I - P_r)``.

In both, ``A - I`` is low rank (rank <= number of erase tokens / forget directions), so A is stored as two
factors ``A = I + U V^T`` (``U``, ``V``: ``[d_in, r]``), which is *exact* (no truncation: the rank is the
algebraic rank of the update). When ``r`` would not save space (``2 r >= d_in``) the dense ``A`` is stored
instead (``A`` tensor, ``U``/``V`` absent). The factors are tiny (SDXL, 10 tokens: 2 x 2048 x 10 floats).

Applying: fp32 / fp64 weights go through ``ops.apply_edit.apply_shared`` in float64, ``W + (W U) V^T``
(two thin GEMMs, never a d_in x d_in product per layer) or one ``W A`` in the dense case, rounded once to
the model dtype. 16-bit weights (fp16 / bf16 models) skip the float64 pass: ``W + (W U) V^T`` in fp32 with
fp32 accumulation, rounded once (``ops.apply_edit.shared_rounded_fp32``; elementwise error before rounding
<= ``(n + r + 2) eps32 |W| |U| |V|^T + eps32 |W|``: one storage ulp from the float64 route at most, except
where the result cancels far below ``|W||U||V|``, where the bound applies). The base class
keeps backups (bit-exact revert), and the result fingerprint is taken over these same values. Storage: float32 factors (as ``LowRankEdit``).

``layer_factors(current)`` gives per-weight LoRA-style factors ``(up = W U, down = V^T)`` for exporters: the
per-layer change ``ΔW = (W U) V^T`` is exactly rank r.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import EditFileError
from ..ops.apply_edit import LOW_PRECISION_STORAGE, apply_shared, shared_rounded_fp32
from .edit import Edit, _common_fields, register


def group_by_shape(current: dict[str, torch.Tensor]) -> dict[tuple[int, ...], list[str]]:
    """Weight names grouped by shape (insertion order kept inside each group)."""
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    if getattr(current, "lazy", False):  # read from files on access: shapes from the headers
        for name in current:
            groups[tuple(current.shape(name))].append(name)
        return dict(groups)
    for name, w in current.items():
        groups[tuple(w.shape)].append(name)
    return dict(groups)


@register
@dataclass
class SharedRightEdit(Edit):
    """``W <- W (I + U V^T)`` (or ``W <- W A`` when ``A`` is dense) for every weight in ``shapes``."""

    kind: ClassVar[str] = "shared_right"
    U: torch.Tensor | None = None  # [d_in, r]
    V: torch.Tensor | None = None  # [d_in, r]
    A: torch.Tensor | None = None  # [d_in, d_in], only when the factors would not be smaller
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------------
    @staticmethod
    def pack(U: torch.Tensor, V: torch.Tensor, dtype=torch.float32) -> dict:
        """``{"U":..,"V":..}`` or ``{"A": I + U V^T}`` whichever is smaller (as keyword arguments)."""
        d_in, r = U.shape
        if 2 * r >= d_in:
            A = torch.eye(d_in, dtype=torch.float64, device=U.device) + U.double() @ V.double().T
            return {"A": A.to(dtype).cpu().contiguous(), "U": None, "V": None}
        return {"U": U.to(dtype).cpu().contiguous(), "V": V.to(dtype).cpu().contiguous(), "A": None}

    @property
    def d_in(self) -> int:
        return int(self.A.shape[0] if self.A is not None else self.U.shape[0])

    @property
    def rank(self) -> int:
        """Rank of A - I as stored (r of the factors; d_in when dense)."""
        return self.d_in if self.A is not None else int(self.U.shape[1])

    def right_matrix(self, device=None) -> torch.Tensor:
        """A (float64, dense)."""
        if self.A is not None:
            return self.A.to(device, torch.float64)
        eye = torch.eye(self.d_in, dtype=torch.float64, device=device)
        return eye + self.U.to(device, torch.float64) @ self.V.to(device, torch.float64).T

    # ---- Edit interface -----------------------------------------------------------------------------
    def target_weights(self) -> list[str]:
        return list(self.shapes)

    def expected_shapes(self):
        return dict(self.shapes)

    def new_weight(self, name, current):
        return self.new_weights({name: current})[name]

    def new_weights(self, current):
        current = {n: w.to(torch.float64) for n, w in current.items()}
        if self.A is not None:
            return apply_shared(current, A=self.A.to(torch.float64))
        return apply_shared(current, U=self.U.to(torch.float64), V=self.V.to(torch.float64))

    def rounded_new_weights(self, weights, names=None):
        """16-bit weights (fp16 / bf16): the update in fp32, rounded once (``ops.apply_edit.shared_rounded_fp32``:
        no float64 pass; error bound stated there). Other
        dtypes (fp32 models): the float64 route of the base class, as before."""
        names = self.target_weights() if names is None else list(names)
        if not all(weights[n].dtype in LOW_PRECISION_STORAGE for n in names):
            return super().rounded_new_weights(weights, names)
        new = shared_rounded_fp32([weights[n].detach() for n in names], U=self.U, V=self.V, A=self.A)
        return dict(zip(names, new))

    def delta(self, name, current):
        w = current.detach().to(torch.float64)
        if self.A is not None:
            return w @ self.A.to(w.device, torch.float64) - w
        return (w @ self.U.to(w.device, torch.float64)) @ self.V.to(w.device, torch.float64).T

    def layer_factors(self, current: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per weight ``(up [d_out, r], down [r, d_in])`` with ``up @ down == ΔW`` exactly (float64).

        For a dense A, ``up = W`` and ``down = A - I`` (rank d_in; exporters may truncate)."""
        out = {}
        for n, w in current.items():
            w = w.detach().to(torch.float64)
            if self.A is not None:
                eye = torch.eye(self.d_in, dtype=torch.float64, device=w.device)
                out[n] = (w, self.A.to(w.device, torch.float64) - eye)
            else:
                out[n] = (w @ self.U.to(w.device, torch.float64), self.V.to(w.device, torch.float64).T.contiguous())
        return out

    def tensors(self):
        if self.A is not None:
            return {"right.A": self.A.contiguous()}
        return {"right.U": self.U.contiguous(), "right.V": self.V.contiguous()}

    @classmethod
    def from_tensors(cls, meta, tensors):
        shapes = {n: tuple(s) for n, s in meta["weights"].items()}
        if not shapes:
            raise EditFileError("shared_right edit targets no weights")
        d_ins = {s[1] for s in shapes.values()}
        if len(d_ins) != 1:
            raise EditFileError(f"shared_right edit targets weights of different input widths {sorted(d_ins)}")
        d_in = d_ins.pop()
        keys = set(tensors)
        if keys == {"right.A"}:
            A = tensors["right.A"]
            if not A.is_floating_point() or tuple(A.shape) != (d_in, d_in):
                raise EditFileError(f"right.A must be a floating-point {d_in}x{d_in} matrix, got {tuple(A.shape)} {A.dtype}")
            return cls(A=A, shapes=shapes, **_common_fields(meta))
        if keys == {"right.U", "right.V"}:
            U, V = tensors["right.U"], tensors["right.V"]
            if not (U.is_floating_point() and V.is_floating_point()) or U.dim() != 2 or U.shape != V.shape or U.shape[0] != d_in:
                raise EditFileError(
                    f"right.U / right.V must be floating-point [{d_in}, r] matrices of one shape, got "
                    f"{tuple(U.shape)} and {tuple(V.shape)}"
                )
            return cls(U=U, V=V, shapes=shapes, **_common_fields(meta))
        raise EditFileError(
            f"shared_right edit needs tensors right.U + right.V or right.A, found {sorted(keys) or 'none'}"
        )

    def inspect(self):
        m = super().inspect()
        m["rank_min"] = m["rank_max"] = self.rank
        m["right_matrix"] = "dense" if self.A is not None else f"I + U V^T, rank {self.rank}"
        m["details"] = (f"one shared right matrix A ({self.d_in}x{self.d_in}) for all {len(self.shapes)} weights: "
                        f"{m['right_matrix']}, {self.nbytes()} bytes")
        return m
