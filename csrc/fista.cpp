// FISTA step, CPU path: one OpenMP pass over the six buffers with fused reductions (see fista.h).
#include "fista.h"

namespace pf {

FistaStats fista_step_cpu(const float* Y, const float* YM, const float* N, const float* W_prev, float* W_out,
                          float* Y_out, int64_t n, float step, float tau, float beta) {
  require(n >= 0, "fista_step: negative length " + std::to_string(n));
  require(n == 0 || (Y && YM && N && W_prev && W_out && Y_out), "fista_step: null buffer pointer");
  require(tau >= 0.f, "fista_step: tau must be >= 0, got " + std::to_string(tau));
  int64_t nnz = 0;
  double dsq = 0.0, nsq = 0.0, rdot = 0.0;
  // Blocks of 4096 elements (vectorised inner loop); squares are exact in fp64 and summed in fp64.
  const int64_t B = 4096;
  const int64_t nblocks = (n + B - 1) / B;
#pragma omp parallel for reduction(+ : nnz, dsq, nsq, rdot) schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t lo = b * B, hi = lo + B < n ? lo + B : n;
    int64_t cnt = 0;
    double ds = 0.0, ns = 0.0, rd = 0.0;
#pragma omp simd reduction(+ : cnt, ds, ns, rd)
    for (int64_t i = lo; i < hi; ++i) {
      const float y = Y[i];  // read before Y_out (which may alias Y) is written
      FistaElem e = fista_elem(y, YM[i], N[i], W_prev[i], step, tau, beta);
      W_out[i] = e.w;
      Y_out[i] = e.y;
      cnt += e.w != 0.f;
      ds += (double)e.diff * (double)e.diff;
      ns += (double)e.w * (double)e.w;
      rd += ((double)y - (double)e.w) * (double)e.diff;
    }
    nnz += cnt;
    dsq += ds;
    nsq += ns;
    rdot += rd;
  }
  return {nnz, dsq, nsq, rdot};
}

}  // namespace pf
