// CSR export and reader for sparse weights (SPACE results are 80-90 % zeros; "Empty SPACE: Cross-Attention
// Sparsity for Concept Erasure in Diffusion Models").
//
// Export (dense -> CSR), two phases so the caller can allocate exactly nnz entries:
//   csr_count: nonzeros per row -> indptr (exclusive prefix sum, rows+1 entries); returns nnz
//   csr_fill:  column indices (int16/int32/int64) and values (raw bits, same dtype as W), row-parallel
// A value is a zero when all its bits but the sign are 0 (+0 and -0); NaN counts as nonzero (as in torch).
//
// Reader (CSR -> dense) treats its input as untrusted: sizes, indptr and every index are validated and
// nothing is read or written out of bounds. A CSR matrix is accepted when
//   rows >= 0, cols >= 0, rows*cols*elem_size fits in int64, len(indptr) == rows+1,
//   indptr[0] == 0, indptr[rows] == nnz == len(indices) == len(values), indptr non-decreasing,
//   and in every row the column indices are strictly increasing and in [0, cols) (canonical CSR).
// Violations throw std::invalid_argument (ValueError in Python) naming the first offending row / entry.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace pf {

// index dtype codes shared with pure_fast/ops/csr.py
enum IndexType : int { kIndex16 = 0, kIndex32 = 1, kIndex64 = 2 };

inline int index_size(int index_type) {
  switch (index_type) {
    case kIndex16: return 2;
    case kIndex32: return 4;
    case kIndex64: return 8;
    default: require(false, "csr: unsupported index type code " + std::to_string(index_type));
  }
  return 0;
}

// element size in bytes of a value dtype code (see DType in common.h)
inline int value_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    case kFloat64: return 8;
    default: require(false, "csr: unsupported value dtype code " + std::to_string(dtype));
  }
  return 0;
}

// Largest value of an index type; export allows the type when cols <= this (int16: cols < 32768).
inline int64_t index_max(int index_type) {
  switch (index_type) {
    case kIndex16: return 32767;
    case kIndex32: return 2147483647LL;
    default: return INT64_MAX;
  }
}

// Zero test on raw bits, shared by CPU and CUDA: +0 and -0 are zero, everything else (NaN too) is not.
PF_HD bool bits_nonzero(uint16_t b) { return (uint16_t)(b << 1) != 0; }
PF_HD bool bits_nonzero(uint32_t b) { return (b << 1) != 0u; }
PF_HD bool bits_nonzero(uint64_t b) { return (b << 1) != (uint64_t)0; }

// Row-level checks, shared by CPU and CUDA. kCsrOk when row r's pointers are sane.
enum CsrError : int { kCsrOk = 0, kCsrPtrOrder = 1, kCsrPtrRange = 2, kCsrIndexRange = 3, kCsrIndexOrder = 4 };

PF_HD int csr_check_ptrs(int64_t start, int64_t end, int64_t nnz) {
  if (start < 0 || end > nnz || start > nnz || end < 0) return kCsrPtrRange;
  if (start > end) return kCsrPtrOrder;
  return kCsrOk;
}
// Entry k of a row whose first entry is `start`: index in range and larger than the previous one.
PF_HD int csr_check_entry(int64_t col, int64_t prev_col, bool first, int64_t cols) {
  if (col < 0 || col >= cols) return kCsrIndexRange;
  if (!first && col <= prev_col) return kCsrIndexOrder;
  return kCsrOk;
}

// Host helpers shared by both paths (csr.cpp).
// O(1) checks of the sizes (negative sizes, overflow, length mismatches).
void csr_check_sizes(int64_t n_indptr, int64_t n_indices, int64_t n_values, int64_t rows, int64_t cols,
                     int64_t elem_size);
// Check the two ends of indptr (indptr[0] == 0, indptr[rows] == nnz).
void csr_check_ends(int64_t first, int64_t last, int64_t nnz);
// Detailed message for a row known to be bad; idx holds that row's indices when its pointers are sane.
std::string csr_row_message(int64_t row, int64_t start, int64_t end, int64_t nnz, int64_t cols,
                            const std::vector<int64_t>& idx);

// ---- CPU (OpenMP) ----
int64_t csr_count_cpu(const void* W, int64_t rows, int64_t cols, int dtype, int64_t* indptr);
void csr_fill_cpu(const void* W, int64_t rows, int64_t cols, int dtype, const int64_t* indptr, void* indices,
                  int index_type, void* values);
void csr_validate_cpu(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                      int index_type, int64_t n_values, int64_t rows, int64_t cols, int dtype);
// Validates (fully) and writes the dense [rows, cols] matrix into `out` (rows*cols elements of dtype).
void csr_to_dense_cpu(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                      int index_type, const void* values, int64_t n_values, int64_t rows, int64_t cols,
                      int dtype, void* out);

#ifdef PF_WITH_CUDA
// ---- CUDA (all buffers on the device; every call is ordered on `stream`) ----
// csr_count_cuda synchronises the stream to return nnz; csr_fill_cuda is asynchronous.
int64_t csr_count_cuda(const void* W, int64_t rows, int64_t cols, int dtype, int64_t* indptr, void* stream);
void csr_fill_cuda(const void* W, int64_t rows, int64_t cols, int dtype, const int64_t* indptr, void* indices,
                   int index_type, void* values, void* stream);
void csr_validate_cuda(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                       int index_type, int64_t n_values, int64_t rows, int64_t cols, int dtype, void* stream);
void csr_to_dense_cuda(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                       int index_type, const void* values, int64_t n_values, int64_t rows, int64_t cols,
                       int dtype, void* out, void* stream);
#endif

}  // namespace pf
