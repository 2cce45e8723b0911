"""CSR export / validating reader: native vs torch reference vs torch.Tensor.to_sparse_csr, exact."""
import pytest
import torch

from pure_fast import _native
from pure_fast.ops import backend, csr

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
needs_native = pytest.mark.skipif(not _native.available(), reason="pure_fast._C not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sparse(rows, cols, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W = W * (torch.rand(rows, cols, generator=g) < density)
    return W.to(dtype)


# named awkward cases next to the real SD shape
CASES = {
    "67x40": lambda dt: _sparse(67, 40, 0.3, dt),
    "1x1": lambda dt: _sparse(1, 1, 1.0, dt, seed=3),
    "1x1_zero": lambda dt: torch.zeros(1, 1, dtype=dt),
    "0_rows": lambda dt: torch.zeros(0, 40, dtype=dt),
    "0_cols": lambda dt: torch.zeros(5, 0, dtype=dt),
    "all_zeros": lambda dt: torch.zeros(33, 17, dtype=dt),
    "all_nonzero": lambda dt: (torch.rand(19, 23, generator=torch.Generator().manual_seed(1)) + 0.5).to(dt),
    "one_dense_row": lambda dt: torch.zeros(9, 50, dtype=dt).index_fill_(0, torch.tensor([4]), 1.5),
    "sd_320x768": lambda dt: _sparse(320, 768, 0.15, dt),
}


def _equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_export_native_matches_reference_and_torch(case, dtype, index_dtype):
    W = CASES[case](dtype)
    with backend.force("native"):
        indptr, indices, values = csr.dense_to_csr(W, index_dtype)
    r_indptr, r_indices, r_values = csr.dense_to_csr_reference(W, index_dtype)
    assert _equal(indptr, r_indptr) and _equal(indices, r_indices) and _equal(values, r_values)
    assert indptr.dtype == torch.int64 and indices.dtype == index_dtype and values.dtype == dtype
    if W.shape[0] > 0 and W.shape[1] > 0:  # torch's own converter as a third opinion
        S = W.to_sparse_csr()
        assert torch.equal(S.crow_indices(), indptr)
        assert torch.equal(S.col_indices(), indices.to(torch.int64))
        assert torch.equal(S.values(), values)
    # round trip, exact, native and reference readers
    with backend.force("native"):
        D = csr.csr_to_dense(indptr, indices, values, *W.shape)
    assert _equal(D, W)
    assert _equal(csr.csr_to_dense_reference(indptr, indices, values, *W.shape), W)


@needs_native
def test_signed_zero_and_nan():
    W = torch.tensor([[0.0, -0.0, float("nan"), 1.0], [-0.0, 2.0, 0.0, float("-inf")]])
    with backend.force("native"):
        indptr, indices, values = csr.dense_to_csr(W)
        D = csr.csr_to_dense(indptr, indices, values, 2, 4)
    assert indptr.tolist() == [0, 2, 4]
    assert indices.tolist() == [2, 3, 1, 3]
    r = csr.dense_to_csr_reference(W)
    assert torch.equal(r[0], indptr) and torch.equal(r[1], indices)
    assert torch.equal(D.view(torch.int32) & 0x7FFFFFFF, W.view(torch.int32) & 0x7FFFFFFF)  # -0 comes back as +0


@needs_native
def test_fp64_and_int64_indices_and_int32_indptr():
    W = _sparse(31, 45, 0.2, torch.float64)
    with backend.force("native"):
        indptr, indices, values = csr.dense_to_csr(W, torch.int64)
        assert _equal(csr.csr_to_dense(indptr.to(torch.int32), indices, values, 31, 45), W)
    assert _equal(indices, csr.dense_to_csr_reference(W, torch.int64)[1])


def test_int16_refused_for_wide_matrices():
    W = torch.zeros(2, 32768)
    for impl in (csr.dense_to_csr, csr.dense_to_csr_reference):
        with pytest.raises(ValueError, match="int16"):
            impl(W, torch.int16)
    csr.dense_to_csr(torch.zeros(2, 32767), torch.int16)  # the largest width int16 allows
    with pytest.raises(ValueError, match="index_dtype"):
        csr.dense_to_csr(torch.zeros(2, 3), torch.uint8)


@needs_native
def test_native_refuses_int16_for_wide_matrices_itself():
    C = _native.load()
    W = torch.zeros(1, 32768)
    indptr = torch.zeros(2, dtype=torch.int64)
    assert C.csr_count(W.data_ptr(), 1, 32768, 0, indptr.data_ptr()) == 0
    with pytest.raises(ValueError, match="cols <= 32767"):
        C.csr_fill(W.data_ptr(), 1, 32768, 0, indptr.data_ptr(), 0, 0, 0)


def test_bad_dense_inputs():
    with pytest.raises(ValueError, match="2-D"):
        csr.dense_to_csr(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="dtype"):
        csr.dense_to_csr(torch.zeros(2, 3, dtype=torch.int32))


# --------------------------------------------------------------------------------------------- reader


def _valid():
    W = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 4.0, 5.0]])
    return W, csr.dense_to_csr_reference(W, torch.int32)


def _corruptions():
    W, (p, i, v) = _valid()
    yield "non_monotone_indptr", (torch.tensor([0, 2, 1, 5]), i, v, 3, 4), "non-decreasing|outside"
    yield "indptr_first_not_zero", (torch.tensor([1, 2, 2, 5]), i, v, 3, 4), r"indptr\[0\]"
    yield "indptr_last_not_nnz", (torch.tensor([0, 2, 2, 4]), i, v, 3, 4), r"indptr\[rows\]"
    yield "indptr_beyond_nnz", (torch.tensor([0, 9, 2, 5]), i, v, 3, 4), "outside|non-decreasing"
    yield "negative_indptr", (torch.tensor([0, -3, 2, 5]), i, v, 3, 4), "outside|non-decreasing"
    yield "index_too_large", (p, torch.tensor([1, 4, 0, 2, 3], dtype=torch.int32), v, 3, 4), "outside"
    yield "negative_index", (p, torch.tensor([1, 3, -1, 2, 3], dtype=torch.int32), v, 3, 4), "outside"
    yield "int16_negative_index", (p, torch.tensor([1, 3, 0, -2, 3], dtype=torch.int16), v, 3, 4), "outside"
    yield "unsorted_row", (p, torch.tensor([3, 1, 0, 2, 3], dtype=torch.int32), v, 3, 4), "increasing"
    yield "duplicate_index", (p, torch.tensor([1, 3, 0, 2, 2], dtype=torch.int32), v, 3, 4), "increasing"
    yield "indptr_too_short", (p[:-1], i, v, 3, 4), "rows\\+1"
    yield "indptr_too_long", (torch.cat([p, p[-1:]]), i, v, 3, 4), "rows\\+1"
    yield "values_short", (p, i, v[:-1], 3, 4), "values"
    yield "indices_short", (p, i[:-1], v[:-1], 3, 4), r"indptr\[rows\]"
    yield "negative_rows", (torch.tensor([0]), i[:0], v[:0], -1, 4), "rows"
    yield "negative_cols", (torch.tensor([0, 0]), i[:0], v[:0], 1, -4), "cols"
    yield "huge_rows_cols", (p, i, v, 2**40, 2**40), "overflow"
    yield "huge_bytes", (torch.tensor([0, 0]), i[:0], v[:0], 1, 2**62), "overflow"
    yield "cols_zero_with_entries", (p, i, v, 3, 0), "outside"


CORRUPT = list(_corruptions())


@needs_native
@pytest.mark.parametrize("args,pattern", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_native_reader_rejects_corrupt_csr(args, pattern):
    with backend.force("native"):
        with pytest.raises(ValueError, match=pattern):
            csr.csr_to_dense(*args)
        with pytest.raises(ValueError, match=pattern):
            csr.validate_csr(*args)


@pytest.mark.parametrize("args", [c[1] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_reference_reader_rejects_corrupt_csr(args):
    with pytest.raises(ValueError):
        csr.validate_csr_reference(*args)
    with pytest.raises(ValueError):
        csr.csr_to_dense_reference(*args)


@needs_native
def test_native_validator_checks_sizes_without_python():
    """The size rules live in C++ too: call the binding with lengths a caller made up."""
    C = _native.load()
    with pytest.raises(ValueError, match="overflow"):
        C.csr_check_sizes(3, 0, 0, 2**40, 2**40, 4)
    with pytest.raises(ValueError, match="rows\\+1"):
        C.csr_check_sizes(3, 0, 0, 5, 5, 4)
    p = torch.tensor([0, 1, 2])
    i = torch.tensor([0, 7], dtype=torch.int32)
    v = torch.ones(2)
    out = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="row 1, entry 1: column index 7"):
        C.csr_to_dense(p.data_ptr(), 3, i.data_ptr(), 2, 1, v.data_ptr(), 2, 2, 4, 0, out.data_ptr())
    with pytest.raises(ValueError, match="index type"):
        C.csr_validate(p.data_ptr(), 3, i.data_ptr(), 2, 9, 2, 2, 4, 0)


@needs_native
def test_valid_csr_passes_and_empty_shapes():
    W, (p, i, v) = _valid()
    with backend.force("native"):
        csr.validate_csr(p, i, v, 3, 4)
        assert _equal(csr.csr_to_dense(p, i, v, 3, 4), W)
        e = torch.zeros(0, dtype=torch.int32)
        assert csr.csr_to_dense(torch.zeros(1, dtype=torch.int64), e, torch.zeros(0), 0, 7).shape == (0, 7)
        assert csr.csr_to_dense(torch.zeros(4, dtype=torch.int64), e, torch.zeros(0), 3, 0).shape == (3, 0)
    csr.validate_csr_reference(p, i, v, 3, 4)


def test_reader_type_errors():
    W, (p, i, v) = _valid()
    with pytest.raises(TypeError, match="indices"):
        csr.csr_to_dense(p, i.float(), v, 3, 4)
    with pytest.raises(TypeError, match="indptr"):
        csr.csr_to_dense(p.float(), i, v, 3, 4)
    with pytest.raises(TypeError, match="rows"):
        csr.csr_to_dense(p, i, v, 3.5, 4)
    with pytest.raises(ValueError, match="1-D"):
        csr.csr_to_dense(p[None], i, v, 3, 4)


def test_torch_backend_forced_uses_reference():
    W = _sparse(20, 30, 0.2, torch.float32)
    with backend.force("torch"):
        out = csr.dense_to_csr(W)
        assert _equal(csr.csr_to_dense(*out, 20, 30), W)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_export_and_reader(case, dtype):
    W = CASES[case](dtype)
    Wc = W.cuda()
    with backend.force("native"):
        out = csr.dense_to_csr(Wc, torch.int16)
        back = csr.csr_to_dense(*out, *W.shape)
    ref = csr.dense_to_csr_reference(W, torch.int16)
    assert all(_equal(a.cpu(), b) for a, b in zip(out, ref))
    assert _equal(back.cpu(), W)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_native
@pytest.mark.parametrize("args,pattern", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_cuda_reader_rejects_corrupt_csr(args, pattern):
    p, i, v, rows, cols = args
    with backend.force("native"):
        with pytest.raises(ValueError, match=pattern):
            csr.csr_to_dense(p.cuda(), i.cuda(), v.cuda(), rows, cols)
