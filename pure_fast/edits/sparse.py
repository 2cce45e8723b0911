"""The CSR-weights edit kind: the edited weights themselves, stored sparse (SPACE).

SPACE's result is not a small change of W but a new, mostly-zero W (80-90 % zeros on SDXL in the paper).
It is stored per weight as CSR (``ops/csr.py``): ``{name}.indptr`` int64 [d_out + 1], ``{name}.indices``
int16 [nnz] (int32 when d_in >= 32768), ``{name}.values`` [nnz] in the storage dtype (float16 by default,
the dtype SD checkpoints ship in; float32 / bfloat16 on request).

- ``apply`` replaces each target weight by the decoded dense matrix (the base class checks the fingerprint,
  rounds once to the model dtype, keeps backups; ``revert`` restores them bit-exactly). The current values
  are not used, so the result does not depend on the device.
- ``load`` treats the file as untrusted: every CSR triple is checked (dtypes, 1-D, sizes, ``indptr``
  monotone from 0 to nnz, column indices in range and strictly increasing per row) with the native
  validator (``ops.csr.validate_csr``) before anything is decoded; a violation is an ``EditFileError``.
- ``inspect`` reports nnz, the fraction of zeros, the stored bytes and the bytes of the same weights as
  dense float16, and their ratio.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import EditFileError
from ..ops import csr as csr_ops
from .edit import Edit, _common_fields, register

PARTS = ("indptr", "indices", "values")


def index_dtype_for(cols: int) -> torch.dtype:
    return torch.int16 if cols < 2**15 else torch.int32


@register
@dataclass
class SparseWeightsEdit(Edit):
    """``W <- dense(CSR)`` for every weight in ``shapes``; ``csr[name] = (indptr, indices, values)``."""

    kind: ClassVar[str] = "csr_weights"
    csr: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def from_dense(cls, weights: dict[str, torch.Tensor], storage_dtype=torch.float16, **kw) -> "SparseWeightsEdit":
        """Build from dense weights (cast to ``storage_dtype`` first, then compressed: the zeros of the cast)."""
        csr, shapes = {}, {}
        for name, w in weights.items():
            w = w.detach().to(storage_dtype).cpu().contiguous()
            csr[name] = csr_ops.dense_to_csr(w, index_dtype_for(w.shape[1]))
            shapes[name] = (int(w.shape[0]), int(w.shape[1]))
        return cls(csr=csr, shapes=shapes, **kw)

    def dense(self, name: str) -> torch.Tensor:
        indptr, indices, values = self.csr[name]
        rows, cols = self.shapes[name]
        return csr_ops.csr_to_dense(indptr, indices, values, rows, cols)

    # ---- Edit interface -----------------------------------------------------------------------------
    def target_weights(self):
        return list(self.csr)

    def expected_shapes(self):
        return dict(self.shapes)

    def new_weight(self, name, current):
        return self.dense(name).to(current.device, torch.float64)

    def tensors(self):
        out = {}
        for n, parts in self.csr.items():
            for part, t in zip(PARTS, parts):
                out[f"{n}.{part}"] = t.contiguous()
        return out

    @classmethod
    def from_tensors(cls, meta, tensors):
        shapes = {n: tuple(s) for n, s in meta["weights"].items()}
        csr = {}
        for n, (rows, cols) in shapes.items():
            parts = [tensors.get(f"{n}.{p}") for p in PARTS]
            if any(t is None for t in parts):
                raise EditFileError(f"edit file lacks the CSR tensors of {n}")
            indptr, indices, values = parts
            if indptr.dtype != torch.int64 or indices.dtype not in csr_ops.INDEX_DTYPES or values.dtype not in csr_ops.VALUE_DTYPES:
                raise EditFileError(
                    f"CSR tensors of {n} have dtypes {indptr.dtype}/{indices.dtype}/{values.dtype}; expected "
                    "int64 indptr, int16/int32/int64 indices and floating values"
                )
            if indptr.dim() != 1 or indices.dim() != 1 or values.dim() != 1:
                raise EditFileError(f"CSR tensors of {n} must be 1-D")
            try:
                csr_ops.validate_csr(indptr, indices, values, rows, cols)
            except ValueError as exc:
                raise EditFileError(f"invalid CSR for {n}: {exc}") from None
            csr[n] = (indptr, indices, values)
        extra = set(tensors) - {f"{n}.{p}" for n in shapes for p in PARTS}
        if extra:
            raise EditFileError(f"edit file has unexpected tensors (e.g. {sorted(extra)[0]})")
        return cls(csr=csr, shapes=shapes, **_common_fields(meta))

    # ---- reporting ----------------------------------------------------------------------------------
    def nnz(self) -> dict[str, int]:
        return {n: int(p[2].numel()) for n, p in self.csr.items()}

    def zero_fraction(self) -> float:
        total = sum(r * c for r, c in self.shapes.values())
        return 1.0 - sum(self.nnz().values()) / total if total else 0.0

    def dense_fp16_bytes(self) -> int:
        return sum(r * c * 2 for r, c in self.shapes.values())

    def inspect(self):
        m = super().inspect()
        nnz = self.nnz()
        m["nnz"] = sum(nnz.values())
        m["zero_fraction"] = self.zero_fraction()
        m["dense_fp16_bytes"] = self.dense_fp16_bytes()
        m["size_vs_dense_fp16"] = m["tensor_bytes"] / m["dense_fp16_bytes"] if m["dense_fp16_bytes"] else 0.0
        m["zero_fraction_per_weight"] = {
            n: 1.0 - nnz[n] / (r * c) for n, (r, c) in self.shapes.items() if r * c
        }
        vdt = {str(p[2].dtype).replace("torch.", "") for p in self.csr.values()}
        m["details"] = (f"CSR weights ({', '.join(sorted(vdt))} values): {100 * m['zero_fraction']:.1f} % zeros, "
                        f"{m['tensor_bytes']} bytes = {100 * m['size_vs_dense_fp16']:.1f} % of dense fp16 "
                        f"({m['dense_fp16_bytes']} bytes)")
        return m
