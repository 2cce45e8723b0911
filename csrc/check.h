#pragma once
#include <cstdint>

namespace pf {
struct FiniteStats {
  int64_t nonfinite;  // number of NaN / Inf entries
  double max_abs;     // largest |x| over the finite entries
};
// CPU, OpenMP-parallel. data: n elements of dtype (see DType in common.h).
FiniteStats finite_stats_cpu(const void* data, int64_t n, int dtype);
#ifdef PF_WITH_CUDA
FiniteStats finite_stats_cuda(const void* data, int64_t n, int dtype, void* stream);
#endif
}  // namespace pf
