"""CSR export of sparse weights and a validating CSR reader: native (C++/OpenMP or CUDA) + torch references.

Layout (what :func:`dense_to_csr` produces and :func:`csr_to_dense` accepts)::

    indptr  int64 [rows + 1]       indptr[0] == 0, non-decreasing, indptr[rows] == nnz
    indices int16 | int32 | int64 [nnz]   column of each entry, strictly increasing within a row, in [0, cols)
    values  dtype of W [nnz]       fp32 / fp16 / bf16 / fp64, copied bit for bit

+0 and -0 are zeros, NaN counts as a nonzero (as ``W != 0`` in torch). An index dtype is allowed when
cols <= its max (int16: cols < 32768). The reader treats its input as untrusted (it comes from files):
every rule above is checked, natively, before or while anything is written, and a violation raises ValueError.
"""
from __future__ import annotations

import operator

import torch

from . import backend

__all__ = [
    "INDEX_DTYPES",
    "VALUE_DTYPES",
    "csr_to_dense",
    "csr_to_dense_reference",
    "dense_to_csr",
    "dense_to_csr_reference",
    "validate_csr",
    "validate_csr_reference",
]

INDEX_CODES = {torch.int16: 0, torch.int32: 1, torch.int64: 2}
INDEX_DTYPES = tuple(INDEX_CODES)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_MAX = {torch.int16: 2**15 - 1, torch.int32: 2**31 - 1, torch.int64: 2**63 - 1}
_INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------- helpers


def _check_dense(W: torch.Tensor) -> tuple[int, int]:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"dense_to_csr: W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"dense_to_csr: W must be 2-D [rows, cols], got shape {tuple(W.shape)}")
    if W.dtype not in VALUE_DTYPES:
        raise TypeError(f"dense_to_csr: W has dtype {W.dtype}; expected one of {[str(d) for d in VALUE_DTYPES]}")
    return int(W.shape[0]), int(W.shape[1])


def _check_index_dtype(index_dtype: torch.dtype, cols: int) -> None:
    if index_dtype not in INDEX_CODES:
        raise ValueError(f"index_dtype must be one of torch.int16, torch.int32, torch.int64; got {index_dtype}")
    if cols > _INDEX_MAX[index_dtype]:
        raise ValueError(
            f"{index_dtype} column indices are allowed only for cols <= {_INDEX_MAX[index_dtype]}, but the matrix "
            f"has {cols} columns; use "
            f"{'torch.int32' if index_dtype == torch.int16 else 'torch.int64'}"
        )


def _as_size(x, name: str) -> int:
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None
    if not -_INT64_MAX - 1 <= v <= _INT64_MAX:
        raise ValueError(f"csr: {name} = {v} does not fit in int64")
    return v


def _check_csr_tensors(indptr, indices, values, rows, cols):
    """Types and devices (trusted tensor metadata); contents are the native reader's job."""
    for name, t in (("indptr", indptr), ("indices", indices), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"csr: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"csr: {name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != indptr.device:
            raise ValueError(f"csr: {name} is on {t.device} but indptr is on {indptr.device}")
    if indptr.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"csr: indptr must be int64 (or int32), got {indptr.dtype}")
    if indices.dtype not in INDEX_CODES:
        raise TypeError(f"csr: indices must be int16, int32 or int64, got {indices.dtype}")
    if values.dtype not in VALUE_DTYPES:
        raise TypeError(f"csr: values has dtype {values.dtype}; expected one of {[str(d) for d in VALUE_DTYPES]}")
    return _as_size(rows, "rows"), _as_size(cols, "cols")


def _native_for(device: torch.device):
    """The loaded extension when the native backend applies to this device, else None."""
    if device.type not in ("cpu", "cuda") or backend.choose(device.type, native=True) != "native":
        return None
    from .. import _native

    C = _native.load()
    if device.type == "cuda" and not C.has_cuda():
        raise _native.NativeUnavailable(
            f"pure_fast._C was built without CUDA; rebuild with PURE_FAST_CUDA=ON: {_native.REBUILD}"
        )
    return C


# --------------------------------------------------------------------------------------------- export


def dense_to_csr_reference(
    W: torch.Tensor, index_dtype: torch.dtype = torch.int32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense 2-D -> ``(indptr int64, indices, values)`` with explicit torch ops."""
    rows, cols = _check_dense(W)
    _check_index_dtype(index_dtype, cols)
    W = W.detach()
    nz = W != 0
    indptr = torch.zeros(rows + 1, dtype=torch.int64, device=W.device)
    torch.cumsum(nz.sum(dim=1, dtype=torch.int64), dim=0, out=indptr[1:])
    r, c = nz.nonzero(as_tuple=True)  # row-major order: rows ascending, columns ascending within a row
    return indptr, c.to(index_dtype), W[r, c]


def dense_to_csr(
    W: torch.Tensor, index_dtype: torch.dtype = torch.int32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense 2-D W (fp32/fp16/bf16/fp64) -> ``(indptr int64 [rows+1], indices index_dtype [nnz], values [nnz])``.

    Native: nonzeros per row (parallel), exclusive prefix sum, fill (parallel over rows); on CUDA a count
    kernel, a one-block scan and a fill kernel on the current stream. int16 indices need cols < 32768.
    """
    rows, cols = _check_dense(W)
    _check_index_dtype(index_dtype, cols)
    C = _native_for(W.device)
    if C is None:
        return dense_to_csr_reference(W, index_dtype)
    from .. import _native

    W = W.detach().contiguous()
    on_cuda, stream = W.device.type == "cuda", _native.stream_handle(W)
    code = _native.DTYPE_CODES[W.dtype]
    indptr = torch.empty(rows + 1, dtype=torch.int64, device=W.device)
    nnz = C.csr_count(W.data_ptr(), rows, cols, code, indptr.data_ptr(), on_cuda, stream)
    indices = torch.empty(nnz, dtype=index_dtype, device=W.device)
    values = torch.empty(nnz, dtype=W.dtype, device=W.device)
    C.csr_fill(
        W.data_ptr(), rows, cols, code, indptr.data_ptr(), indices.data_ptr(), INDEX_CODES[index_dtype],
        values.data_ptr(), on_cuda, stream,
    )  # fmt: skip
    return indptr, indices, values


# --------------------------------------------------------------------------------------------- reader


def validate_csr_reference(indptr, indices, values, rows, cols) -> None:
    """The reader's checks written with torch ops (same rules as the native validator)."""
    rows, cols = _check_csr_tensors(indptr, indices, values, rows, cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"csr: rows and cols must be >= 0, got rows={rows}, cols={cols}")
    if cols and rows > _INT64_MAX // cols:
        raise ValueError(f"csr: rows*cols overflows int64 (rows={rows}, cols={cols})")
    if rows * cols > _INT64_MAX // values.element_size():
        raise ValueError(f"csr: the dense size overflows int64 (rows={rows}, cols={cols})")
    if indptr.numel() != rows + 1:
        raise ValueError(f"csr: indptr has {indptr.numel()} entries; expected rows+1 = {rows + 1}")
    nnz = indices.numel()
    if values.numel() != nnz:
        raise ValueError(f"csr: indices has {nnz} entries but values has {values.numel()}")
    p = indptr.to(torch.int64)
    if int(p[0]) != 0:
        raise ValueError(f"csr: indptr[0] must be 0, got {int(p[0])}")
    if int(p[-1]) != nnz:
        raise ValueError(f"csr: indptr[rows] = {int(p[-1])} but there are {nnz} indices/values")
    counts = p[1:] - p[:-1]
    if rows and bool((counts < 0).any()):
        r = int(torch.nonzero(counts < 0)[0])
        raise ValueError(f"csr: indptr is not non-decreasing: indptr[{r}] = {int(p[r])} > indptr[{r + 1}] = {int(p[r + 1])}")
    if nnz:
        idx = indices.to(torch.int64)
        bad = (idx < 0) | (idx >= cols)
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"csr: entry {k}: column index {int(idx[k])} is outside [0, cols = {cols})")
        row_of = torch.repeat_interleave(torch.arange(rows, device=idx.device), counts)
        same_row = row_of[1:] == row_of[:-1]
        bad = same_row & (idx[1:] <= idx[:-1])
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0]) + 1
            raise ValueError(
                f"csr: row {int(row_of[k])}, entry {k}: column index {int(idx[k])} is not larger than the previous "
                f"one ({int(idx[k - 1])}); column indices must be strictly increasing within a row"
            )


def csr_to_dense_reference(indptr, indices, values, rows, cols) -> torch.Tensor:
    """CSR -> dense ``[rows, cols]`` in torch ops (validates with :func:`validate_csr_reference` first)."""
    validate_csr_reference(indptr, indices, values, rows, cols)
    rows, cols = int(rows), int(cols)
    out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    if indices.numel():
        p = indptr.to(torch.int64)
        row_of = torch.repeat_interleave(torch.arange(rows, device=p.device), p[1:] - p[:-1])
        out[row_of, indices.to(torch.int64)] = values
    return out


def _prepare(indptr, indices, values, rows, cols):
    rows, cols = _check_csr_tensors(indptr, indices, values, rows, cols)
    indptr = indptr.detach().to(torch.int64).contiguous()
    return indptr, indices.detach().contiguous(), values.detach().contiguous(), rows, cols


def validate_csr(indptr, indices, values, rows, cols) -> None:
    """Check an untrusted CSR matrix (sizes, indptr, every column index); raise ValueError on the first problem.

    Native when available (one parallel pass), else :func:`validate_csr_reference`.
    """
    C = _native_for(indptr.device) if isinstance(indptr, torch.Tensor) else None
    if C is None:
        return validate_csr_reference(indptr, indices, values, rows, cols)
    from .. import _native

    indptr, indices, values, rows, cols = _prepare(indptr, indices, values, rows, cols)
    C.csr_validate(
        indptr.data_ptr(), indptr.numel(), indices.data_ptr(), indices.numel(), INDEX_CODES[indices.dtype],
        values.numel(), rows, cols, _native.DTYPE_CODES[values.dtype], indptr.device.type == "cuda",
        _native.stream_handle(indptr),
    )  # fmt: skip


def csr_to_dense(indptr, indices, values, rows, cols) -> torch.Tensor:
    """Untrusted CSR -> dense ``[rows, cols]`` of ``values.dtype``; raises ValueError on invalid input.

    The native reader checks the sizes first (O(1), before the output is allocated), then validates every
    row while zeroing it and scattering its values; no read or write leaves the buffers.
    """
    C = _native_for(indptr.device) if isinstance(indptr, torch.Tensor) else None
    if C is None:
        return csr_to_dense_reference(indptr, indices, values, rows, cols)
    from .. import _native

    indptr, indices, values, rows, cols = _prepare(indptr, indices, values, rows, cols)
    # sizes (negative, overflowing, mismatched lengths) before allocating rows*cols elements
    C.csr_check_sizes(indptr.numel(), indices.numel(), values.numel(), rows, cols, values.element_size())
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    C.csr_to_dense(
        indptr.data_ptr(), indptr.numel(), indices.data_ptr(), indices.numel(), INDEX_CODES[indices.dtype],
        values.data_ptr(), values.numel(), rows, cols, _native.DTYPE_CODES[values.dtype], out.data_ptr(),
        indptr.device.type == "cuda", _native.stream_handle(indptr),
    )  # fmt: skip
    return out
