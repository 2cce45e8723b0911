// FISTA step for SPACE (UCE loss + mu*||W||_1, see "Empty SPACE: Cross-Attention Sparsity for Concept
// Erasure in Diffusion Models"): the elementwise part of one iteration, fused with the reductions the
// stopping rule needs. The matmul YM = Y @ M stays in torch.
//
//   g     = Y - (YM - N) * step            gradient step on the smooth part (step = 1/lambda_max(M))
//   w     = sign(g) * max(|g| - tau, 0)    soft threshold (tau = mu / L, L = 2 lambda_max(M))
//   W_out = w
//   Y_out = w + beta * (w - W_prev)        momentum (beta = (t - 1) / t_next)
//
// returned: nnz(w), sum (w - W_prev)^2, sum w^2 and sum (Y - w) * (w - W_prev) (fp64 accumulators). The last
// is O'Donoghue-Candes' gradient-restart test: momentum is reset when it is > 0 (ops/fista.py), so the solver
// needs no extra pass over Y_k for it (and Y_out may overwrite Y).
// W_out may alias W_prev and Y_out may alias Y: each element i is read before it is written.
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

namespace pf {

struct FistaStats {
  int64_t nnz;     // nonzero entries of W_out
  double diff_sq;  // sum (W_out - W_prev)^2
  double norm_sq;  // sum W_out^2
  double restart_dot;  // sum (Y - W_out) * (W_out - W_prev)
};

// The per-element math, shared by the CPU and CUDA paths. Branch-free (vectorises: a data-dependent branch
// on the sign of g costs ~10x on random data); NaN in g propagates to w (as torch's sign * clamp_min does).
PF_HD float soft_threshold(float g, float tau) {
  float a = fabsf(g) - tau;
  a = a < 0.f ? 0.f : a;  // max(a, 0) keeping NaN
  return copysignf(a, g);
}

struct FistaElem {
  float w;     // new iterate
  float y;     // extrapolated point
  float diff;  // w - w_prev
};

PF_HD FistaElem fista_elem(float y, float ym, float n, float w_prev, float step, float tau, float beta) {
  float g = y - (ym - n) * step;
  float w = soft_threshold(g, tau);
  float d = w - w_prev;
  return {w, w + beta * d, d};
}

// CPU, OpenMP-parallel. All buffers fp32, n elements.
FistaStats fista_step_cpu(const float* Y, const float* YM, const float* N, const float* W_prev, float* W_out,
                          float* Y_out, int64_t n, float step, float tau, float beta);
#ifdef PF_WITH_CUDA
// CUDA: one grid-stride kernel with block reductions on `stream`; synchronises the stream to return stats.
FistaStats fista_step_cuda(const float* Y, const float* YM, const float* N, const float* W_prev, float* W_out,
                           float* Y_out, int64_t n, float step, float tau, float beta, void* stream);
#endif

}  // namespace pf
