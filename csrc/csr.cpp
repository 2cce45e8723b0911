// CSR export (dense -> CSR) and validating reader (CSR -> dense), CPU path. See csr.h for the contract.
#include "csr.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace pf {

// ---------------------------------------------------------------- shared host helpers

void csr_check_sizes(int64_t n_indptr, int64_t n_indices, int64_t n_values, int64_t rows, int64_t cols,
                     int64_t elem_size) {
  require(rows >= 0, "csr: rows must be >= 0, got " + std::to_string(rows));
  require(cols >= 0, "csr: cols must be >= 0, got " + std::to_string(cols));
  require(n_indptr >= 0 && n_indices >= 0 && n_values >= 0, "csr: negative buffer length");
  require(elem_size > 0, "csr: element size must be > 0");
  const int64_t max = std::numeric_limits<int64_t>::max();
  require(cols == 0 || rows <= max / cols,
          "csr: rows*cols overflows int64 (rows=" + std::to_string(rows) + ", cols=" + std::to_string(cols) + ")");
  require(rows * cols <= max / elem_size, "csr: the dense size rows*cols*" + std::to_string(elem_size) +
                                              " bytes overflows int64 (rows=" + std::to_string(rows) +
                                              ", cols=" + std::to_string(cols) + ")");
  // n_indptr - 1 == rows, not n_indptr == rows + 1: rows may be INT64_MAX when cols == 0 (found by csrc/fuzz)
  require(n_indptr - 1 == rows, "csr: indptr has " + std::to_string(n_indptr) + " entries; expected rows+1 = " +
                                    (rows < max ? std::to_string(rows + 1) : std::string("2^63")));
  require(n_indices == n_values, "csr: indices has " + std::to_string(n_indices) + " entries but values has " +
                                     std::to_string(n_values));
}

void csr_check_ends(int64_t first, int64_t last, int64_t nnz) {
  require(first == 0, "csr: indptr[0] must be 0, got " + std::to_string(first));
  require(last == nnz, "csr: indptr[rows] = " + std::to_string(last) + " but there are " + std::to_string(nnz) +
                           " indices/values (they must be equal)");
}

std::string csr_row_message(int64_t row, int64_t start, int64_t end, int64_t nnz, int64_t cols,
                            const std::vector<int64_t>& idx) {
  const std::string r = std::to_string(row);
  switch (csr_check_ptrs(start, end, nnz)) {
    case kCsrPtrRange:
      return "csr: indptr[" + r + "] = " + std::to_string(start) + ", indptr[" + std::to_string(row + 1) +
             "] = " + std::to_string(end) + " lie outside [0, nnz = " + std::to_string(nnz) + "]";
    case kCsrPtrOrder:
      return "csr: indptr is not non-decreasing: indptr[" + r + "] = " + std::to_string(start) + " > indptr[" +
             std::to_string(row + 1) + "] = " + std::to_string(end);
    default: break;
  }
  for (size_t k = 0; k < idx.size(); ++k) {
    int e = csr_check_entry(idx[k], k ? idx[k - 1] : 0, k == 0, cols);
    const std::string where = "csr: row " + r + ", entry " + std::to_string(start + (int64_t)k) + ": column index " +
                              std::to_string(idx[k]);
    if (e == kCsrIndexRange) return where + " is outside [0, cols = " + std::to_string(cols) + ")";
    if (e == kCsrIndexOrder)
      return where + " is not larger than the previous one (" + std::to_string(idx[k - 1]) +
             "); column indices must be strictly increasing within a row";
  }
  return "csr: row " + r + " is invalid";
}

namespace {

// ---------------------------------------------------------------- export

template <typename V>
int64_t count_rows(const V* w, int64_t rows, int64_t cols, int64_t* indptr) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const V* row = w + r * cols;
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < cols; ++j) c += bits_nonzero(row[j]) ? 1 : 0;
    indptr[r + 1] = c;
  }
  indptr[0] = 0;
  for (int64_t r = 0; r < rows; ++r) indptr[r + 1] += indptr[r];  // exclusive prefix sum (rows+1 entries)
  return indptr[rows];
}

// Bit k set when p[k] is nonzero, k < 64. The 0/1 bytes vectorise; 8 of them are gathered into 8 bits by
// one multiply (byte i of x lands on bit 56 + i of x * 0x0102040810204080, no carries between terms).
template <typename V>
inline uint64_t nonzero_mask64(const V* p) {
  uint8_t nz[64];
  for (int k = 0; k < 64; ++k) nz[k] = bits_nonzero(p[k]) ? 1 : 0;
  uint64_t mask = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (int q = 0; q < 8; ++q) {
    uint64_t x;
    std::memcpy(&x, nz + 8 * q, 8);
    mask |= ((x * 0x0102040810204080ULL) >> 56) << (8 * q);
  }
#else
  for (int k = 0; k < 64; ++k) mask |= (uint64_t)nz[k] << k;
#endif
  return mask;
}

template <typename V, typename I>
void fill_rows(const V* w, int64_t rows, int64_t cols, const int64_t* indptr, I* indices, V* values) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const V* row = w + r * cols;
    int64_t pos = indptr[r];
    const int64_t end = indptr[r + 1];
    // 64 columns at a time: a nonzero bitmask (branch-free), then one step per set bit (ctz). Sparse rows
    // skip their zeros without a mispredicted branch each. pos < end bounds every write to this row.
    int64_t j0 = 0;
    for (; j0 + 64 <= cols && pos < end; j0 += 64) {
      uint64_t mask = nonzero_mask64(row + j0);
      while (mask && pos < end) {
        const int k = __builtin_ctzll(mask);
        mask &= mask - 1;
        indices[pos] = (I)(j0 + k);
        values[pos] = row[j0 + k];
        ++pos;
      }
    }
    for (int64_t j = j0; j < cols && pos < end; ++j) {
      const V v = row[j];
      if (bits_nonzero(v)) {
        indices[pos] = (I)j;
        values[pos] = v;
        ++pos;
      }
    }
  }
}

template <typename V>
void fill_dispatch_index(const V* w, int64_t rows, int64_t cols, const int64_t* indptr, void* indices,
                         int index_type, void* values) {
  V* vals = static_cast<V*>(values);
  switch (index_type) {
    case kIndex16: fill_rows(w, rows, cols, indptr, static_cast<int16_t*>(indices), vals); break;
    case kIndex32: fill_rows(w, rows, cols, indptr, static_cast<int32_t*>(indices), vals); break;
    case kIndex64: fill_rows(w, rows, cols, indptr, static_cast<int64_t*>(indices), vals); break;
    default: require(false, "csr: unsupported index type code " + std::to_string(index_type));
  }
}

void check_dense_shape(const void* W, int64_t rows, int64_t cols, int dtype) {
  require(rows >= 0, "dense_to_csr: rows must be >= 0, got " + std::to_string(rows));
  require(cols >= 0, "dense_to_csr: cols must be >= 0, got " + std::to_string(cols));
  require(cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols, "dense_to_csr: rows*cols overflows int64");
  require(rows * cols == 0 || W != nullptr, "dense_to_csr: null data pointer");
  value_size(dtype);  // throws on an unknown dtype
}

// ---------------------------------------------------------------- reader

template <typename I>
void index_row_to_vec(const I* idx, int64_t start, int64_t end, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t k = start; k < end; ++k) out.push_back((int64_t)idx[k]);
}

// Checks every row; if `out` is given, also zeroes each good row and scatters its values.
// Returns the first bad row, or rows when all are good.
template <typename I, typename V>
int64_t check_and_scatter(const int64_t* indptr, const I* idx, const V* vals, int64_t nnz, int64_t rows,
                          int64_t cols, V* out) {
  int64_t bad = rows;
#pragma omp parallel for schedule(static) reduction(min : bad)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = indptr[r], end = indptr[r + 1];
    if (csr_check_ptrs(start, end, nnz) != kCsrOk) {
      bad = std::min(bad, r);
      continue;
    }
    V* orow = out ? out + r * cols : nullptr;
    if (orow) std::memset(orow, 0, sizeof(V) * (size_t)cols);
    int64_t prev = 0;
    for (int64_t k = start; k < end; ++k) {
      const int64_t c = (int64_t)idx[k];
      if (csr_check_entry(c, prev, k == start, cols) != kCsrOk) {
        bad = std::min(bad, r);
        break;
      }
      if (orow) orow[c] = vals[k];
      prev = c;
    }
  }
  return bad;
}

template <typename I>
void reader_impl(const int64_t* indptr, const I* idx, const void* values, int64_t nnz, int64_t rows, int64_t cols,
                 int elem_size, void* out) {
  int64_t bad = rows;
  switch (elem_size) {
    case 2:
      bad = check_and_scatter(indptr, idx, static_cast<const uint16_t*>(values), nnz, rows, cols,
                              static_cast<uint16_t*>(out));
      break;
    case 4:
      bad = check_and_scatter(indptr, idx, static_cast<const uint32_t*>(values), nnz, rows, cols,
                              static_cast<uint32_t*>(out));
      break;
    default:
      bad = check_and_scatter(indptr, idx, static_cast<const uint64_t*>(values), nnz, rows, cols,
                              static_cast<uint64_t*>(out));
      break;
  }
  if (bad < rows) {
    const int64_t start = indptr[bad], end = indptr[bad + 1];
    std::vector<int64_t> row_idx;
    if (csr_check_ptrs(start, end, nnz) == kCsrOk) index_row_to_vec(idx, start, end, row_idx);
    require(false, csr_row_message(bad, start, end, nnz, cols, row_idx));
  }
}

void reader(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices, int index_type,
            const void* values, int64_t n_values, int64_t rows, int64_t cols, int dtype, void* out) {
  const int es = value_size(dtype);
  index_size(index_type);  // throws on an unknown index type
  csr_check_sizes(n_indptr, n_indices, n_values, rows, cols, es);
  require(indptr != nullptr, "csr: null indptr pointer");
  require(n_indices == 0 || indices != nullptr, "csr: null indices pointer");
  require(out == nullptr || n_indices == 0 || values != nullptr, "csr: null values pointer");
  csr_check_ends(indptr[0], indptr[rows], n_indices);
  switch (index_type) {
    case kIndex16: reader_impl(indptr, static_cast<const int16_t*>(indices), values, n_indices, rows, cols, es, out); break;
    case kIndex32: reader_impl(indptr, static_cast<const int32_t*>(indices), values, n_indices, rows, cols, es, out); break;
    default: reader_impl(indptr, static_cast<const int64_t*>(indices), values, n_indices, rows, cols, es, out); break;
  }
}

}  // namespace

int64_t csr_count_cpu(const void* W, int64_t rows, int64_t cols, int dtype, int64_t* indptr) {
  check_dense_shape(W, rows, cols, dtype);
  require(indptr != nullptr, "dense_to_csr: null indptr pointer");
  switch (value_size(dtype)) {
    case 2: return count_rows(static_cast<const uint16_t*>(W), rows, cols, indptr);
    case 4: return count_rows(static_cast<const uint32_t*>(W), rows, cols, indptr);
    default: return count_rows(static_cast<const uint64_t*>(W), rows, cols, indptr);
  }
}

void csr_fill_cpu(const void* W, int64_t rows, int64_t cols, int dtype, const int64_t* indptr, void* indices,
                  int index_type, void* values) {
  check_dense_shape(W, rows, cols, dtype);
  index_size(index_type);
  require(cols <= index_max(index_type),
          "dense_to_csr: " + std::to_string(cols) + " columns need cols <= " + std::to_string(index_max(index_type)) +
              " for this index type; use a wider index dtype");
  require(indptr != nullptr, "dense_to_csr: null indptr pointer");
  require(indptr[rows] == 0 || (indices != nullptr && values != nullptr), "dense_to_csr: null output pointer");
  switch (value_size(dtype)) {
    case 2: fill_dispatch_index(static_cast<const uint16_t*>(W), rows, cols, indptr, indices, index_type, values); break;
    case 4: fill_dispatch_index(static_cast<const uint32_t*>(W), rows, cols, indptr, indices, index_type, values); break;
    default: fill_dispatch_index(static_cast<const uint64_t*>(W), rows, cols, indptr, indices, index_type, values); break;
  }
}

void csr_validate_cpu(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                      int index_type, int64_t n_values, int64_t rows, int64_t cols, int dtype) {
  reader(indptr, n_indptr, indices, n_indices, index_type, nullptr, n_values, rows, cols, dtype, nullptr);
}

void csr_to_dense_cpu(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                      int index_type, const void* values, int64_t n_values, int64_t rows, int64_t cols, int dtype,
                      void* out) {
  require(out != nullptr || rows == 0 || cols == 0, "csr_to_dense: null output pointer");
  require(n_values == 0 || values != nullptr, "csr_to_dense: null values pointer");
  if (out == nullptr) {  // empty output: validate only
    reader(indptr, n_indptr, indices, n_indices, index_type, nullptr, n_values, rows, cols, dtype, nullptr);
    return;
  }
  reader(indptr, n_indptr, indices, n_indices, index_type, values, n_values, rows, cols, dtype, out);
}

}  // namespace pf
