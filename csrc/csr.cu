// CSR export and validating reader, CUDA path (see csr.h). One warp per row everywhere:
//   count kernel (nonzeros per row) -> single-block scan (indptr) -> fill kernel (ballot + popc keeps
//   the column order), and a validate(+scatter) kernel that records the first bad row with atomicMin.
#include <cuda_runtime.h>

#include <vector>

#include "csr.h"

namespace pf {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 4096;
constexpr int kScanThreads = 1024;

void check_cuda(cudaError_t err, const char* what) {
  require(err == cudaSuccess, std::string("csr: CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

int row_blocks(int64_t rows) {
  int64_t b = (rows + kWarps - 1) / kWarps;
  if (b < 1) b = 1;
  return (int)(b < kMaxBlocks ? b : kMaxBlocks);
}

template <typename V>
__global__ void __launch_bounds__(kThreads) count_kernel(const V* w, int64_t rows, int64_t cols, int64_t* indptr) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  if (blockIdx.x == 0 && threadIdx.x == 0) indptr[0] = 0;
  for (int64_t r = warp; r < rows; r += nwarps) {
    const V* row = w + r * cols;
    long long c = 0;
    for (int64_t j = lane; j < cols; j += 32) c += bits_nonzero(row[j]) ? 1 : 0;
    for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
    if (lane == 0) indptr[r + 1] = c;
  }
}

// In-place inclusive scan of a[0..n) with one block: each thread scans a contiguous chunk, the chunk
// totals are scanned in shared memory, then every chunk adds its offset.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(int64_t* a, int64_t n) {
  __shared__ long long sums[kScanThreads];
  const int t = threadIdx.x;
  const int64_t chunk = (n + kScanThreads - 1) / kScanThreads;
  const int64_t lo = t * chunk, hi = lo + chunk < n ? lo + chunk : n;
  long long s = 0;
  for (int64_t i = lo; i < hi; ++i) s += a[i];
  sums[t] = s;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {  // Hillis-Steele inclusive scan of the totals
    long long v = t >= off ? sums[t - off] : 0;
    __syncthreads();
    sums[t] += v;
    __syncthreads();
  }
  long long run = t > 0 ? sums[t - 1] : 0;
  for (int64_t i = lo; i < hi; ++i) {
    run += a[i];
    a[i] = run;
  }
}

template <typename V, typename I>
__global__ void __launch_bounds__(kThreads)
fill_kernel(const V* w, int64_t rows, int64_t cols, const int64_t* indptr, I* indices, V* values) {
  const int lane = threadIdx.x & 31;
  const unsigned lt_mask = (1u << lane) - 1u;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t r = warp; r < rows; r += nwarps) {
    const V* row = w + r * cols;
    int64_t pos = indptr[r];
    const int64_t end = indptr[r + 1];
    for (int64_t base = 0; base < cols && pos < end; base += 32) {  // warp-uniform loop
      const int64_t j = base + lane;
      V v = j < cols ? row[j] : V(0);
      const bool nz = j < cols && bits_nonzero(v);
      const unsigned mask = __ballot_sync(0xffffffffu, nz);
      if (nz) {
        const int64_t p = pos + __popc(mask & lt_mask);
        if (p < end) {
          indices[p] = (I)j;
          values[p] = v;
        }
      }
      pos += __popc(mask);
    }
  }
}

// Validates every row; with `out`, scatters the values of good rows (out was zeroed beforehand).
template <typename I, typename V>
__global__ void __launch_bounds__(kThreads)
check_scatter_kernel(const int64_t* indptr, const I* idx, const V* vals, int64_t nnz, int64_t rows, int64_t cols,
                     V* out, unsigned long long* bad) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t r = warp; r < rows; r += nwarps) {
    const int64_t start = indptr[r], end = indptr[r + 1];
    if (csr_check_ptrs(start, end, nnz) != kCsrOk) {
      if (lane == 0) atomicMin(bad, (unsigned long long)r);
      continue;
    }
    bool ok = true;
    for (int64_t k = start + lane; k < end; k += 32) {
      const int64_t c = (int64_t)idx[k];
      const int64_t prev = k > start ? (int64_t)idx[k - 1] : 0;
      if (csr_check_entry(c, prev, k == start, cols) != kCsrOk) {
        ok = false;
      } else if (out) {
        out[r * cols + c] = vals[k];
      }
    }
    if (!ok) atomicMin(bad, (unsigned long long)r);
  }
}

template <typename V>
void launch_fill(const V* w, int64_t rows, int64_t cols, const int64_t* indptr, void* indices, int index_type,
                 void* values, cudaStream_t s) {
  V* vals = static_cast<V*>(values);
  const int blocks = row_blocks(rows);
  switch (index_type) {
    case kIndex16:
      fill_kernel<<<blocks, kThreads, 0, s>>>(w, rows, cols, indptr, static_cast<int16_t*>(indices), vals);
      break;
    case kIndex32:
      fill_kernel<<<blocks, kThreads, 0, s>>>(w, rows, cols, indptr, static_cast<int32_t*>(indices), vals);
      break;
    default:
      fill_kernel<<<blocks, kThreads, 0, s>>>(w, rows, cols, indptr, static_cast<int64_t*>(indices), vals);
      break;
  }
}

template <typename I>
void launch_check(const int64_t* indptr, const I* idx, const void* vals, int64_t nnz, int64_t rows, int64_t cols,
                  int es, void* out, unsigned long long* bad, cudaStream_t s) {
  const int blocks = row_blocks(rows);
  switch (es) {
    case 2:
      check_scatter_kernel<<<blocks, kThreads, 0, s>>>(indptr, idx, static_cast<const uint16_t*>(vals), nnz, rows,
                                                       cols, static_cast<uint16_t*>(out), bad);
      break;
    case 4:
      check_scatter_kernel<<<blocks, kThreads, 0, s>>>(indptr, idx, static_cast<const uint32_t*>(vals), nnz, rows,
                                                       cols, static_cast<uint32_t*>(out), bad);
      break;
    default:
      check_scatter_kernel<<<blocks, kThreads, 0, s>>>(indptr, idx, static_cast<const uint64_t*>(vals), nnz, rows,
                                                       cols, static_cast<uint64_t*>(out), bad);
      break;
  }
}

template <typename I>
void copy_row_indices(const void* indices, int64_t start, int64_t end, std::vector<int64_t>& out, cudaStream_t s) {
  std::vector<I> tmp((size_t)(end - start));
  if (end > start) {
    check_cuda(cudaMemcpyAsync(tmp.data(), static_cast<const I*>(indices) + start, sizeof(I) * (end - start),
                               cudaMemcpyDeviceToHost, s),
               "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  }
  out.assign(tmp.begin(), tmp.end());
}

void reader_cuda(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices, int index_type,
                 const void* values, int64_t n_values, int64_t rows, int64_t cols, int dtype, void* out,
                 cudaStream_t s) {
  const int es = value_size(dtype);
  index_size(index_type);
  csr_check_sizes(n_indptr, n_indices, n_values, rows, cols, es);
  require(indptr != nullptr, "csr: null indptr pointer");
  require(n_indices == 0 || indices != nullptr, "csr: null indices pointer");
  require(out == nullptr || n_indices == 0 || values != nullptr, "csr: null values pointer");
  int64_t ends[2] = {0, 0};
  check_cuda(cudaMemcpyAsync(&ends[0], indptr, sizeof(int64_t), cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
  check_cuda(cudaMemcpyAsync(&ends[1], indptr + rows, sizeof(int64_t), cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  csr_check_ends(ends[0], ends[1], n_indices);
  if (rows == 0) return;
  if (out != nullptr && cols > 0) check_cuda(cudaMemsetAsync(out, 0, (size_t)(rows * cols * es), s), "cudaMemsetAsync");
  unsigned long long* d_bad = nullptr;
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&d_bad), sizeof(unsigned long long), s), "cudaMallocAsync");
  const unsigned long long init = (unsigned long long)rows;
  check_cuda(cudaMemcpyAsync(d_bad, &init, sizeof(init), cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
  void* o = cols > 0 ? out : nullptr;
  switch (index_type) {
    case kIndex16: launch_check(indptr, static_cast<const int16_t*>(indices), values, n_indices, rows, cols, es, o, d_bad, s); break;
    case kIndex32: launch_check(indptr, static_cast<const int32_t*>(indices), values, n_indices, rows, cols, es, o, d_bad, s); break;
    default: launch_check(indptr, static_cast<const int64_t*>(indices), values, n_indices, rows, cols, es, o, d_bad, s); break;
  }
  cudaError_t launch = cudaGetLastError();
  unsigned long long h_bad = init;
  cudaMemcpyAsync(&h_bad, d_bad, sizeof(h_bad), cudaMemcpyDeviceToHost, s);
  cudaFreeAsync(d_bad, s);
  cudaError_t sync = cudaStreamSynchronize(s);  // before any throw: the copy targets this frame
  check_cuda(launch, "kernel launch");
  check_cuda(sync, "cudaStreamSynchronize");
  if (h_bad < (unsigned long long)rows) {
    const int64_t r = (int64_t)h_bad;
    int64_t se[2];
    check_cuda(cudaMemcpyAsync(se, indptr + r, 2 * sizeof(int64_t), cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    std::vector<int64_t> row_idx;
    if (csr_check_ptrs(se[0], se[1], n_indices) == kCsrOk) {
      switch (index_type) {
        case kIndex16: copy_row_indices<int16_t>(indices, se[0], se[1], row_idx, s); break;
        case kIndex32: copy_row_indices<int32_t>(indices, se[0], se[1], row_idx, s); break;
        default: copy_row_indices<int64_t>(indices, se[0], se[1], row_idx, s); break;
      }
    }
    require(false, csr_row_message(r, se[0], se[1], n_indices, cols, row_idx));
  }
}

void check_dense(const void* W, int64_t rows, int64_t cols, int dtype) {
  require(rows >= 0 && cols >= 0, "dense_to_csr: rows and cols must be >= 0");
  require(cols == 0 || rows <= INT64_MAX / cols, "dense_to_csr: rows*cols overflows int64");
  require(rows * cols == 0 || W != nullptr, "dense_to_csr: null data pointer");
  value_size(dtype);
}

}  // namespace

int64_t csr_count_cuda(const void* W, int64_t rows, int64_t cols, int dtype, int64_t* indptr, void* stream) {
  check_dense(W, rows, cols, dtype);
  require(indptr != nullptr, "dense_to_csr: null indptr pointer");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int blocks = row_blocks(rows);
  switch (value_size(dtype)) {
    case 2: count_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const uint16_t*>(W), rows, cols, indptr); break;
    case 4: count_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const uint32_t*>(W), rows, cols, indptr); break;
    default: count_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const uint64_t*>(W), rows, cols, indptr); break;
  }
  if (rows > 0) scan_kernel<<<1, kScanThreads, 0, s>>>(indptr + 1, rows);
  cudaError_t launch = cudaGetLastError();
  int64_t nnz = 0;
  cudaMemcpyAsync(&nnz, indptr + rows, sizeof(int64_t), cudaMemcpyDeviceToHost, s);
  cudaError_t sync = cudaStreamSynchronize(s);  // before any throw: the copy targets this frame
  check_cuda(launch, "kernel launch");
  check_cuda(sync, "cudaStreamSynchronize");
  return nnz;
}

void csr_fill_cuda(const void* W, int64_t rows, int64_t cols, int dtype, const int64_t* indptr, void* indices,
                   int index_type, void* values, void* stream) {
  check_dense(W, rows, cols, dtype);
  index_size(index_type);
  require(cols <= index_max(index_type),
          "dense_to_csr: " + std::to_string(cols) + " columns need cols <= " + std::to_string(index_max(index_type)) +
              " for this index type; use a wider index dtype");
  require(indptr != nullptr, "dense_to_csr: null indptr pointer");
  if (rows == 0 || cols == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (value_size(dtype)) {
    case 2: launch_fill(static_cast<const uint16_t*>(W), rows, cols, indptr, indices, index_type, values, s); break;
    case 4: launch_fill(static_cast<const uint32_t*>(W), rows, cols, indptr, indices, index_type, values, s); break;
    default: launch_fill(static_cast<const uint64_t*>(W), rows, cols, indptr, indices, index_type, values, s); break;
  }
  check_cuda(cudaGetLastError(), "kernel launch");
}

void csr_validate_cuda(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                       int index_type, int64_t n_values, int64_t rows, int64_t cols, int dtype, void* stream) {
  reader_cuda(indptr, n_indptr, indices, n_indices, index_type, nullptr, n_values, rows, cols, dtype, nullptr,
              static_cast<cudaStream_t>(stream));
}

void csr_to_dense_cuda(const int64_t* indptr, int64_t n_indptr, const void* indices, int64_t n_indices,
                       int index_type, const void* values, int64_t n_values, int64_t rows, int64_t cols, int dtype,
                       void* out, void* stream) {
  require(out != nullptr || rows == 0 || cols == 0, "csr_to_dense: null output pointer");
  require(n_values == 0 || values != nullptr, "csr_to_dense: null values pointer");
  reader_cuda(indptr, n_indptr, indices, n_indices, index_type, values, n_values, rows, cols, dtype, out,
              static_cast<cudaStream_t>(stream));
}

}  // namespace pf
