// FISTA step, CUDA path (see fista.h): a grid-stride kernel writes W_out / Y_out and per-block partial
// reductions; a one-block kernel sums the partials in a fixed order (deterministic result).
#include <cuda_runtime.h>

#include "fista.h"

namespace pf {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;  // also the size of the partials array

struct Partial {
  unsigned long long nnz;
  double diff_sq;
  double norm_sq;
  double restart_dot;
};

__device__ __forceinline__ void warp_sum(unsigned long long& c, double& a, double& b, double& r) {
  for (int off = 16; off > 0; off >>= 1) {
    c += __shfl_down_sync(0xffffffffu, c, off);
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
    r += __shfl_down_sync(0xffffffffu, r, off);
  }
}

// Block-wide sum; the result is valid in thread 0.
__device__ __forceinline__ void block_sum(unsigned long long& c, double& a, double& b, double& r) {
  __shared__ unsigned long long sc[kThreads / 32];
  __shared__ double sa[kThreads / 32], sb[kThreads / 32], sr[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_sum(c, a, b, r);
  if (lane == 0) { sc[warp] = c; sa[warp] = a; sb[warp] = b; sr[warp] = r; }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    c = lane < nw ? sc[lane] : 0ull;
    a = lane < nw ? sa[lane] : 0.0;
    b = lane < nw ? sb[lane] : 0.0;
    r = lane < nw ? sr[lane] : 0.0;
    warp_sum(c, a, b, r);
  }
}

__global__ void __launch_bounds__(kThreads)
fista_step_kernel(const float* Y, const float* YM, const float* N, const float* W_prev, float* W_out,
                  float* Y_out, int64_t n, float step, float tau, float beta, Partial* partials) {
  unsigned long long cnt = 0;
  double ds = 0.0, ns = 0.0, rd = 0.0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
    const float y = Y[i];  // read before Y_out (which may alias Y) is written
    FistaElem e = fista_elem(y, YM[i], N[i], W_prev[i], step, tau, beta);
    W_out[i] = e.w;
    Y_out[i] = e.y;
    cnt += e.w != 0.f;
    ds += (double)e.diff * (double)e.diff;
    ns += (double)e.w * (double)e.w;
    rd += ((double)y - (double)e.w) * (double)e.diff;
  }
  block_sum(cnt, ds, ns, rd);
  if (threadIdx.x == 0) partials[blockIdx.x] = {cnt, ds, ns, rd};
}

__global__ void __launch_bounds__(kThreads) fista_finalize_kernel(const Partial* partials, int count, Partial* out) {
  unsigned long long cnt = 0;
  double ds = 0.0, ns = 0.0, rd = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    cnt += partials[i].nnz;
    ds += partials[i].diff_sq;
    ns += partials[i].norm_sq;
    rd += partials[i].restart_dot;
  }
  block_sum(cnt, ds, ns, rd);
  if (threadIdx.x == 0) *out = {cnt, ds, ns, rd};
}

void check_cuda(cudaError_t err, const char* what) {
  require(err == cudaSuccess, std::string("fista_step: CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

FistaStats fista_step_cuda(const float* Y, const float* YM, const float* N, const float* W_prev, float* W_out,
                           float* Y_out, int64_t n, float step, float tau, float beta, void* stream) {
  require(n >= 0, "fista_step: negative length " + std::to_string(n));
  require(n == 0 || (Y && YM && N && W_prev && W_out && Y_out), "fista_step: null buffer pointer");
  require(tau >= 0.f, "fista_step: tau must be >= 0, got " + std::to_string(tau));
  if (n == 0) return {0, 0.0, 0.0, 0.0};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t want = (n + kThreads - 1) / kThreads;
  int blocks = (int)(want < kMaxBlocks ? want : kMaxBlocks);
  Partial* d_buf = nullptr;  // [blocks] partials + 1 result
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&d_buf), sizeof(Partial) * (blocks + 1), s), "cudaMallocAsync");
  fista_step_kernel<<<blocks, kThreads, 0, s>>>(Y, YM, N, W_prev, W_out, Y_out, n, step, tau, beta, d_buf);
  fista_finalize_kernel<<<1, kThreads, 0, s>>>(d_buf, blocks, d_buf + blocks);
  Partial h{};
  cudaError_t launch = cudaGetLastError();
  cudaMemcpyAsync(&h, d_buf + blocks, sizeof(Partial), cudaMemcpyDeviceToHost, s);
  cudaFreeAsync(d_buf, s);
  cudaError_t sync = cudaStreamSynchronize(s);  // before any throw: the copy targets this frame
  check_cuda(launch, "kernel launch");
  check_cuda(sync, "cudaStreamSynchronize");
  return {(int64_t)h.nnz, h.diff_sq, h.norm_sq, h.restart_dot};
}

}  // namespace pf
