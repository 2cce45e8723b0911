// finite_stats: one pass over a weight buffer that counts NaN/Inf and finds max |x|.
// The edit path calls it on every delta before touching a model (an edit is applied only if finite).
#include "check.h"

#include <algorithm>
#include <cmath>

#include "common.h"

namespace pf {

template <typename Load>
static FiniteStats scan(int64_t n, Load load) {
  int64_t bad = 0;
  double mx = 0.0;
#pragma omp parallel for reduction(+ : bad) reduction(max : mx) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float v = load(i);
    if (!std::isfinite(v)) {
      ++bad;
    } else {
      double a = std::fabs((double)v);
      mx = a > mx ? a : mx;
    }
  }
  return {bad, mx};
}

FiniteStats finite_stats_cpu(const void* data, int64_t n, int dtype) {
  require(n >= 0, "finite_stats: negative length");
  require(n == 0 || data != nullptr, "finite_stats: null data pointer");
  switch (dtype) {
    case kFloat32: {
      const float* p = static_cast<const float*>(data);
      return scan(n, [p](int64_t i) { return p[i]; });
    }
    case kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(data);
      return scan(n, [p](int64_t i) { return half_bits_to_float(p[i]); });
    }
    case kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(data);
      return scan(n, [p](int64_t i) { return bf16_bits_to_float(p[i]); });
    }
    case kFloat64: {
      const double* p = static_cast<const double*>(data);
      int64_t bad = 0;
      double mx = 0.0;
#pragma omp parallel for reduction(+ : bad) reduction(max : mx) schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        double v = p[i];
        if (!std::isfinite(v)) ++bad;
        else mx = std::max(mx, std::fabs(v));
      }
      return {bad, mx};
    }
    default:
      require(false, "finite_stats: unsupported dtype code " + std::to_string(dtype));
  }
  return {0, 0.0};
}

}  // namespace pf
