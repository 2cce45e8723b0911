// Fuzz target for the native CSR reader (csrc/csr.{h,cpp}), shared by the libFuzzer entry point
// (fuzz_csr_libfuzzer.cpp) and the standalone random/mutation driver (fuzz_csr_driver.cpp).
//
// Input encoding (little-endian), so that every byte string is a case and lengths are always honest:
//   u8 index_type (mod 3)  u8 dtype (mod 4)  u8 flags (bit0: rows as i64, bit1: cols as i64)
//   rows: i64 if flags&1 else u8;  cols: i64 if flags&2 else u8
//   u16 n_indptr, u16 n_indices, u16 n_values (each mod 4097)
//   then indptr (n_indptr x i64), indices (n_indices x index size), values (n_values x value size),
//   read from the remaining bytes; missing bytes are zeros.
// Buffers are allocated with exactly those lengths (so AddressSanitizer flags any read past them).
//
// The oracle: csr_validate_cpu and csr_to_dense_cpu must agree (both throw std::invalid_argument or both
// accept); when accepted, the dense result must equal a plain scatter written here, every stored index must
// be in range and strictly increasing per row, and dense -> CSR (csr_count/fill) -> dense must round-trip.
// Any other exception, disagreement or sanitizer report aborts.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../csr.h"

namespace pf_fuzz {

struct Reader {
  const uint8_t* p;
  size_t n, at = 0;
  template <typename T>
  T get() {
    T v{};
    uint8_t b[sizeof(T)] = {};
    for (size_t k = 0; k < sizeof(T); ++k) b[k] = at < n ? p[at++] : 0;
    std::memcpy(&v, b, sizeof(T));
    return v;
  }
  void fill(void* dst, size_t bytes) {
    uint8_t* d = static_cast<uint8_t*>(dst);
    for (size_t k = 0; k < bytes; ++k) d[k] = at < n ? p[at++] : 0;
  }
};

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "FUZZ ORACLE FAILURE: %s\n", what);
  std::abort();
}

struct Case {
  int index_type, dtype;
  int64_t rows, cols;
  std::vector<int64_t> indptr;
  std::vector<uint8_t> indices, values;  // raw bytes, exact lengths
  int64_t n_indices, n_values;
};

inline Case decode(const uint8_t* data, size_t size) {
  Reader r{data, size};
  Case c;
  c.index_type = r.get<uint8_t>() % 3;
  c.dtype = r.get<uint8_t>() % 4;
  const uint8_t flags = r.get<uint8_t>();
  c.rows = (flags & 1) ? r.get<int64_t>() : (int64_t)r.get<uint8_t>();
  c.cols = (flags & 2) ? r.get<int64_t>() : (int64_t)r.get<uint8_t>();
  const size_t n_indptr = r.get<uint16_t>() % 4097;
  c.n_indices = r.get<uint16_t>() % 4097;
  c.n_values = r.get<uint16_t>() % 4097;
  c.indptr.resize(n_indptr);
  r.fill(c.indptr.data(), n_indptr * 8);
  c.indices.resize((size_t)c.n_indices * pf::index_size(c.index_type));
  r.fill(c.indices.data(), c.indices.size());
  c.values.resize((size_t)c.n_values * pf::value_size(c.dtype));
  r.fill(c.values.data(), c.values.size());
  return c;
}

// The inverse of decode for well-formed cases (used to write seeds and by the driver's generator).
inline std::vector<uint8_t> encode(int index_type, int dtype, int64_t rows, int64_t cols,
                                   const std::vector<int64_t>& indptr, const std::vector<uint8_t>& indices,
                                   int64_t n_indices, const std::vector<uint8_t>& values, int64_t n_values) {
  std::vector<uint8_t> out;
  auto put = [&](const void* src, size_t k) {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    out.insert(out.end(), s, s + k);
  };
  const bool rh = rows < 0 || rows > 255, ch = cols < 0 || cols > 255;
  uint8_t head[3] = {(uint8_t)index_type, (uint8_t)dtype, (uint8_t)((rh ? 1 : 0) | (ch ? 2 : 0))};
  put(head, 3);
  if (rh) put(&rows, 8); else { uint8_t b = (uint8_t)rows; put(&b, 1); }
  if (ch) put(&cols, 8); else { uint8_t b = (uint8_t)cols; put(&b, 1); }
  uint16_t n[3] = {(uint16_t)indptr.size(), (uint16_t)n_indices, (uint16_t)n_values};
  put(n, 6);
  put(indptr.data(), indptr.size() * 8);
  put(indices.data(), indices.size());
  put(values.data(), values.size());
  return out;
}

inline int64_t index_at(const Case& c, int64_t k) {
  switch (c.index_type) {
    case pf::kIndex16: { int16_t v; std::memcpy(&v, c.indices.data() + 2 * k, 2); return v; }
    case pf::kIndex32: { int32_t v; std::memcpy(&v, c.indices.data() + 4 * k, 4); return v; }
    default: { int64_t v; std::memcpy(&v, c.indices.data() + 8 * k, 8); return v; }
  }
}

constexpr int64_t kMaxDenseBytes = 1 << 20;  // csr_to_dense is exercised when the output fits in 1 MiB

// Returns 1 when the case was accepted, 0 when rejected with std::invalid_argument.
inline int run_one(const uint8_t* data, size_t size) {
  Case c = decode(data, size);
  const int es = pf::value_size(c.dtype);
  const void* ip = c.indices.empty() ? nullptr : c.indices.data();
  const void* vp = c.values.empty() ? nullptr : c.values.data();
  const int64_t* pp = c.indptr.empty() ? nullptr : c.indptr.data();
  const int64_t n_indptr = (int64_t)c.indptr.size();

  bool valid = true;
  try {
    pf::csr_validate_cpu(pp, n_indptr, ip, c.n_indices, c.index_type, c.n_values, c.rows, c.cols, c.dtype);
  } catch (const std::invalid_argument& e) {
    if (!e.what() || std::strncmp(e.what(), "csr", 3) != 0) fail("error message does not start with 'csr'");
    valid = false;
  }

  const bool small = c.rows >= 0 && c.cols >= 0 && (c.cols == 0 || c.rows <= kMaxDenseBytes / c.cols) &&
                     c.rows * c.cols * es <= kMaxDenseBytes;
  if (!small) {
    if (valid && (c.rows < 0 || c.cols < 0)) fail("validator accepted a negative size");
    if (valid && n_indptr != c.rows + 1) fail("validator accepted a wrong indptr length");
    return valid ? 1 : 0;
  }
  const size_t dense_bytes = (size_t)(c.rows * c.cols * es);
  std::vector<uint8_t> out(dense_bytes ? dense_bytes : 1, 0xAB);
  bool dense_ok = true;
  try {
    pf::csr_to_dense_cpu(pp, n_indptr, ip, c.n_indices, c.index_type, vp, c.n_values, c.rows, c.cols, c.dtype,
                         dense_bytes ? out.data() : nullptr);
  } catch (const std::invalid_argument&) {
    dense_ok = false;
  }
  if (dense_ok != valid) fail("csr_validate and csr_to_dense disagree");
  if (!valid) return 0;

  // accepted: check the contract independently and compare with a plain scatter
  if (n_indptr != c.rows + 1 || c.indptr[0] != 0 || c.indptr[c.rows] != c.n_indices || c.n_indices != c.n_values)
    fail("accepted CSR with inconsistent sizes");
  std::vector<uint8_t> expect(dense_bytes ? dense_bytes : 1, 0);
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t s = c.indptr[r], e = c.indptr[r + 1];
    if (s < 0 || e < s || e > c.n_indices) fail("accepted a bad indptr");
    for (int64_t k = s; k < e; ++k) {
      const int64_t col = index_at(c, k);
      if (col < 0 || col >= c.cols) fail("accepted an out-of-range index");
      if (k > s && col <= index_at(c, k - 1)) fail("accepted unsorted indices");
      std::memcpy(expect.data() + (size_t)(r * c.cols + col) * es, c.values.data() + (size_t)k * es, es);
    }
  }
  if (dense_bytes && std::memcmp(expect.data(), out.data(), dense_bytes) != 0) fail("dense result differs");

  // dense -> CSR -> dense round trip through the exporter
  if (dense_bytes) {
    std::vector<int64_t> p2((size_t)c.rows + 1);
    const int64_t nnz = pf::csr_count_cpu(out.data(), c.rows, c.cols, c.dtype, p2.data());
    std::vector<uint8_t> i2((size_t)(nnz ? nnz : 1) * 8), v2((size_t)(nnz ? nnz : 1) * es);
    pf::csr_fill_cpu(out.data(), c.rows, c.cols, c.dtype, p2.data(), i2.data(), pf::kIndex64, v2.data());
    std::vector<uint8_t> back(dense_bytes, 0xCD);
    pf::csr_to_dense_cpu(p2.data(), c.rows + 1, i2.data(), nnz, pf::kIndex64, v2.data(), nnz, c.rows, c.cols,
                         c.dtype, back.data());
    // zeros (+0/-0) are dropped by the exporter, so compare "is zero" masks and nonzero bits
    for (size_t k = 0; k < (size_t)(c.rows * c.cols); ++k) {
      uint64_t a = 0, b = 0;
      std::memcpy(&a, out.data() + k * es, es);
      std::memcpy(&b, back.data() + k * es, es);
      const uint64_t sign = es == 8 ? (1ull << 63) : es == 4 ? (1ull << 31) : (1ull << 15);
      const bool za = (a & ~sign) == 0, zb = (b & ~sign) == 0;
      if (za != zb || (!za && a != b)) fail("dense -> CSR -> dense does not round-trip");
    }
  }
  return 1;
}

}  // namespace pf_fuzz
