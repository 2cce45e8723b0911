// CUDA version of finite_stats (see check.cpp): grid-stride loop, block reduction, atomics.
#include <cuda_runtime.h>

#include "check.h"
#include "common.h"

namespace pf {

__device__ __forceinline__ float load_as_float(const void* data, int64_t i, int dtype) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(data)[i];
    case kFloat16: return half_bits_to_float(static_cast<const uint16_t*>(data)[i]);
    case kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
    default: return (float)static_cast<const double*>(data)[i];
  }
}

__global__ void finite_stats_kernel(const void* data, int64_t n, int dtype,
                                    unsigned long long* bad, unsigned int* max_bits) {
  unsigned long long local_bad = 0;
  float local_max = 0.f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = load_as_float(data, i, dtype);
    if (!isfinite(v)) local_bad++;
    else local_max = fmaxf(local_max, fabsf(v));
  }
  // non-negative floats order like their bit patterns: atomicMax on the bits
  atomicAdd(bad, local_bad);
  atomicMax(max_bits, __float_as_uint(local_max));
}

FiniteStats finite_stats_cuda(const void* data, int64_t n, int dtype, void* stream) {
  require(n >= 0, "finite_stats: negative length");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  unsigned long long* d_bad;
  unsigned int* d_max;
  cudaMallocAsync(&d_bad, sizeof(unsigned long long), s);
  cudaMallocAsync(&d_max, sizeof(unsigned int), s);
  cudaMemsetAsync(d_bad, 0, sizeof(unsigned long long), s);
  cudaMemsetAsync(d_max, 0, sizeof(unsigned int), s);
  if (n > 0) {
    int threads = 256;
    int64_t blocks64 = (n + threads - 1) / threads;
    int blocks = (int)(blocks64 < 4096 ? blocks64 : 4096);
    finite_stats_kernel<<<blocks, threads, 0, s>>>(data, n, dtype, d_bad, d_max);
  }
  unsigned long long h_bad = 0;
  unsigned int h_max = 0;
  cudaMemcpyAsync(&h_bad, d_bad, sizeof(h_bad), cudaMemcpyDeviceToHost, s);
  cudaMemcpyAsync(&h_max, d_max, sizeof(h_max), cudaMemcpyDeviceToHost, s);
  cudaFreeAsync(d_bad, s);
  cudaFreeAsync(d_max, s);
  cudaError_t err = cudaStreamSynchronize(s);
  require(err == cudaSuccess, std::string("finite_stats: CUDA error: ") + cudaGetErrorString(err));
  float mx;
  std::memcpy(&mx, &h_max, 4);
  return {(int64_t)h_bad, (double)mx};
}

}  // namespace pf
