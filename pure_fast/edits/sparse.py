"""The CSR-weights edit kind: the edited weights themselves, stored sparse (SPACE).

SPACE's result is not a small change of W but a new, mostly-zero W (80-90 % zeros on SDXL in the paper).
It is stored per weight as CSR (``ops/csr.py``): ``{name}.indptr`` int64 [d_out + 1], ``{name}.indices``
int16 [nnz] (int32 when d_in >= 32768), ``{name}.values`` [nnz] in the storage dtype (float16 by default,
the dtype SD checkpoints ship in; float32 / bfloat16 on request).

Per weight, CSR only when it pays: CSR costs ``8 (d_out + 1) + nnz (index bytes + value bytes)`` against
``d_out d_in`` values dense, so at low sparsity (below ~35 % zeros with int16 indices and fp16 values) the
CSR triple is *bigger* than the dense matrix (SPACE's paper notes it too). :meth:`SparseWeightsEdit.from_dense`
with ``layout="auto"`` (the default) stores such a weight dense instead, as ``{name}.dense`` [d_out, d_in]
in the same storage dtype (the same values, so the choice is lossless), whenever the dense tensor is not
larger than its CSR triple. A SPACE file is therefore never bigger than the weights dense in the storage
dtype (dense fp16 by default). The metadata lists the dense-stored weights (``dense_weights``, sorted; a
file without the key is all-CSR), and ``load`` checks the list against the tensors: each listed weight has
exactly a 2-D floating ``.dense`` of its declared shape, every other one exactly a CSR triple.
``layout="csr"`` forces CSR everywhere, ``layout="dense"`` dense everywhere.

- ``apply`` replaces each target weight by the decoded dense matrix (the base class checks the fingerprint,
  rounds once to the model dtype, keeps backups; ``revert`` restores them bit-exactly). The current values
  are not used, so the result does not depend on the device.
- ``load`` treats the file as untrusted: every CSR triple is checked (dtypes, 1-D, sizes, ``indptr``
  monotone from 0 to nnz, column indices in range and strictly increasing per row) with the native
  validator (``ops.csr.validate_csr``) before anything is decoded; a violation is an ``EditFileError``.
- ``inspect`` reports nnz (of the dense-stored weights too), the fraction of zeros, the stored bytes and the
  bytes of the same weights as dense float16, their ratio, and how many weights are stored CSR / dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import EditFileError
from ..ops import csr as csr_ops
from .edit import Edit, _common_fields, register

PARTS = ("indptr", "indices", "values")
LAYOUTS = ("auto", "csr", "dense")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def index_dtype_for(cols: int) -> torch.dtype:
    return torch.int16 if cols < 2**15 else torch.int32


@register
@dataclass
class SparseWeightsEdit(Edit):
    """``W <- dense(CSR)`` for every weight in ``shapes``: ``csr[name] = (indptr, indices, values)`` or, for a
    weight stored dense (low sparsity), ``dense_weights[name]`` = the [d_out, d_in] matrix."""

    kind: ClassVar[str] = "csr_weights"
    csr: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    dense_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_dense(cls, weights: dict[str, torch.Tensor], storage_dtype=torch.float16, layout: str = "auto",
                   **kw) -> "SparseWeightsEdit":
        """Build from dense weights (cast to ``storage_dtype`` first, then compressed: the zeros of the cast).
        ``layout``: ``auto`` (CSR unless the dense matrix is not larger), ``csr`` or ``dense``."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not valid; use {', '.join(LAYOUTS)}")
        csr, shapes, dense = {}, {}, {}
        for name, w in weights.items():
            w = w.detach().to(storage_dtype).cpu().contiguous()
            shapes[name] = (int(w.shape[0]), int(w.shape[1]))
            if layout == "dense":
                dense[name] = w
                continue
            idx = index_dtype_for(w.shape[1])
            if layout == "auto":
                nnz = int(torch.count_nonzero(w))
                csr_bytes = 8 * (w.shape[0] + 1) + nnz * (_itemsize(idx) + w.element_size())
                if w.numel() * w.element_size() <= csr_bytes:
                    dense[name] = w
                    continue
            csr[name] = csr_ops.dense_to_csr(w, idx)
        return cls(csr=csr, shapes=shapes, dense_weights=dense, **kw)

    def dense(self, name: str) -> torch.Tensor:
        if name in self.dense_weights:
            return self.dense_weights[name]
        indptr, indices, values = self.csr[name]
        rows, cols = self.shapes[name]
        return csr_ops.csr_to_dense(indptr, indices, values, rows, cols)

    def stored(self) -> dict[str, tuple[str, object]]:
        """name -> (``"csr"``, (indptr, indices, values)) or (``"dense"``, matrix), in ``shapes`` order."""
        return {n: ("dense", self.dense_weights[n]) if n in self.dense_weights else ("csr", self.csr[n])
                for n in self.shapes}

    @classmethod
    def from_stored(cls, stored: dict, shapes: dict, **kw) -> "SparseWeightsEdit":
        """Inverse of :meth:`stored` (used by ``edits.combine``)."""
        csr = {n: v for n, (how, v) in stored.items() if how == "csr"}
        dense = {n: v for n, (how, v) in stored.items() if how == "dense"}
        return cls(csr=csr, shapes=dict(shapes), dense_weights=dense, **kw)

    def meta(self) -> dict:
        m = super().meta()
        m["dense_weights"] = sorted(self.dense_weights)
        return m

    # ---- Edit interface -----------------------------------------------------------------------------
    def target_weights(self):
        return list(self.shapes)

    def expected_shapes(self):
        return dict(self.shapes)

    def new_weight(self, name, current):
        return self.dense(name).to(current.device, torch.float64)

    def tensors(self):
        out = {}
        for n, parts in self.csr.items():
            for part, t in zip(PARTS, parts):
                out[f"{n}.{part}"] = t.contiguous()
        for n, t in self.dense_weights.items():
            out[f"{n}.dense"] = t.contiguous()
        return out

    @classmethod
    def from_tensors(cls, meta, tensors):
        shapes = {n: tuple(s) for n, s in meta["weights"].items()}
        listed = meta.get("dense_weights", [])
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise EditFileError("edit metadata 'dense_weights' must be a list of weight names")
        if len(set(listed)) != len(listed):
            raise EditFileError("edit metadata 'dense_weights' lists a weight twice")
        unknown = [n for n in listed if n not in shapes]
        if unknown:
            raise EditFileError(f"edit metadata 'dense_weights' names {unknown[0]}, which is not among its weights")
        dense_names = set(listed)
        csr, dense = {}, {}
        for n, (rows, cols) in shapes.items():
            if n in dense_names:
                t = tensors.get(f"{n}.dense")
                if t is None:
                    raise EditFileError(f"edit file lacks the dense tensor of {n} (listed in dense_weights)")
                if t.dtype not in csr_ops.VALUE_DTYPES or t.dim() != 2 or tuple(t.shape) != (rows, cols):
                    raise EditFileError(f"dense tensor of {n} is {str(t.dtype).replace('torch.', '')} "
                                        f"{list(t.shape)}; expected a floating [{rows}, {cols}] matrix")
                dense[n] = t
                continue
            parts = [tensors.get(f"{n}.{p}") for p in PARTS]
            if any(t is None for t in parts):
                hint = " (it has a dense tensor not listed in dense_weights)" if f"{n}.dense" in tensors else ""
                raise EditFileError(f"edit file lacks the CSR tensors of {n}{hint}")
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
        expected = {f"{n}.{p}" for n in csr for p in PARTS} | {f"{n}.dense" for n in dense}
        extra = set(tensors) - expected
        if extra:
            raise EditFileError(f"edit file has unexpected tensors (e.g. {sorted(extra)[0]})")
        return cls(csr=csr, shapes=shapes, dense_weights=dense, **_common_fields(meta))

    # ---- reporting ----------------------------------------------------------------------------------
    def nnz(self) -> dict[str, int]:
        """Stored nonzeros per weight (CSR: the stored values; dense-stored: its nonzero entries)."""
        out = {n: int(p[2].numel()) for n, p in self.csr.items()}
        out.update({n: int(torch.count_nonzero(t)) for n, t in self.dense_weights.items()})
        return {n: out[n] for n in self.shapes}

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
        m["csr_stored"] = len(self.csr)
        m["dense_stored"] = len(self.dense_weights)
        vdt = {str(p[2].dtype).replace("torch.", "") for p in self.csr.values()}
        vdt |= {str(t.dtype).replace("torch.", "") for t in self.dense_weights.values()}
        mix = f"; {len(self.csr)} CSR + {len(self.dense_weights)} dense" if self.dense_weights else ""
        m["details"] = (f"CSR weights ({', '.join(sorted(vdt))} values{mix}): {100 * m['zero_fraction']:.1f} % "
                        f"zeros, {m['tensor_bytes']} bytes = {100 * m['size_vs_dense_fp16']:.1f} % of dense fp16 "
                        f"({m['dense_fp16_bytes']} bytes)")
        return m
