// pybind11 bindings for pure_fast._C. Functions take integer addresses, sizes and a stream handle;
// dtype, device and contiguity are checked in Python (pure_fast/_native.py) and again here for sizes.
#include <pybind11/pybind11.h>

#include "check.h"
#include "common.h"
#include "csr.h"
#include "fista.h"

namespace py = pybind11;

[[noreturn]] static void no_cuda(const char* what) {
  throw std::invalid_argument(std::string(what) + ": this build of pure_fast._C has no CUDA kernels");
}

template <typename T>
static T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

static bool has_cuda() {
#ifdef PF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pure_fast native kernels (C++/OpenMP, CUDA when built with it)";
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in");
  m.def(
      "finite_stats",
      [](uintptr_t data, int64_t n, int dtype, bool on_cuda, uintptr_t stream) {
        pf::FiniteStats r;
        if (on_cuda) {
#ifdef PF_WITH_CUDA
          py::gil_scoped_release nogil;
          r = pf::finite_stats_cuda(reinterpret_cast<const void*>(data), n, dtype,
                                    reinterpret_cast<void*>(stream));
#else
          throw std::invalid_argument("finite_stats: this build of pure_fast._C has no CUDA kernels");
#endif
        } else {
          py::gil_scoped_release nogil;
          r = pf::finite_stats_cpu(reinterpret_cast<const void*>(data), n, dtype);
        }
        return py::make_tuple(r.nonfinite, r.max_abs);
      },
      py::arg("data"), py::arg("n"), py::arg("dtype"), py::arg("on_cuda") = false, py::arg("stream") = 0,
      "Count NaN/Inf entries and the largest finite |x| of a contiguous buffer");

  m.def(
      "fista_step",
      [](uintptr_t Y, uintptr_t YM, uintptr_t N, uintptr_t W_prev, uintptr_t W_out, uintptr_t Y_out, int64_t n,
         double step, double tau, double beta, bool on_cuda, uintptr_t stream) {
        pf::FistaStats r;
        {
          py::gil_scoped_release nogil;
          if (on_cuda) {
#ifdef PF_WITH_CUDA
            r = pf::fista_step_cuda(ptr<const float>(Y), ptr<const float>(YM), ptr<const float>(N),
                                    ptr<const float>(W_prev), ptr<float>(W_out), ptr<float>(Y_out), n, (float)step,
                                    (float)tau, (float)beta, ptr<void>(stream));
#else
            no_cuda("fista_step");
#endif
          } else {
            r = pf::fista_step_cpu(ptr<const float>(Y), ptr<const float>(YM), ptr<const float>(N),
                                   ptr<const float>(W_prev), ptr<float>(W_out), ptr<float>(Y_out), n, (float)step,
                                   (float)tau, (float)beta);
          }
        }
        return py::make_tuple(r.nnz, r.diff_sq, r.norm_sq, r.restart_dot);
      },
      py::arg("Y"), py::arg("YM"), py::arg("N"), py::arg("W_prev"), py::arg("W_out"), py::arg("Y_out"), py::arg("n"),
      py::arg("step"), py::arg("tau"), py::arg("beta"), py::arg("on_cuda") = false, py::arg("stream") = 0,
      "One fused FISTA step on fp32 buffers of n elements; returns (nnz, sum (W_out-W_prev)^2, sum W_out^2, "
      "sum (Y-W_out)*(W_out-W_prev))");
  m.def(
      "csr_count",
      [](uintptr_t W, int64_t rows, int64_t cols, int dtype, uintptr_t indptr, bool on_cuda, uintptr_t stream) {
        py::gil_scoped_release nogil;
        if (on_cuda) {
#ifdef PF_WITH_CUDA
          return pf::csr_count_cuda(ptr<const void>(W), rows, cols, dtype, ptr<int64_t>(indptr), ptr<void>(stream));
#else
          no_cuda("csr_count");
#endif
        }
        return pf::csr_count_cpu(ptr<const void>(W), rows, cols, dtype, ptr<int64_t>(indptr));
      },
      py::arg("W"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("indptr"), py::arg("on_cuda") = false,
      py::arg("stream") = 0, "Dense -> CSR phase 1: fill indptr (rows+1 int64) and return nnz");
  m.def(
      "csr_fill",
      [](uintptr_t W, int64_t rows, int64_t cols, int dtype, uintptr_t indptr, uintptr_t indices, int index_type,
         uintptr_t values, bool on_cuda, uintptr_t stream) {
        py::gil_scoped_release nogil;
        if (on_cuda) {
#ifdef PF_WITH_CUDA
          pf::csr_fill_cuda(ptr<const void>(W), rows, cols, dtype, ptr<const int64_t>(indptr), ptr<void>(indices),
                            index_type, ptr<void>(values), ptr<void>(stream));
          return;
#else
          no_cuda("csr_fill");
#endif
        }
        pf::csr_fill_cpu(ptr<const void>(W), rows, cols, dtype, ptr<const int64_t>(indptr), ptr<void>(indices),
                         index_type, ptr<void>(values));
      },
      py::arg("W"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("indptr"), py::arg("indices"),
      py::arg("index_type"), py::arg("values"), py::arg("on_cuda") = false, py::arg("stream") = 0,
      "Dense -> CSR phase 2: write column indices and values using indptr from csr_count");
  m.def(
      "csr_check_sizes",
      [](int64_t n_indptr, int64_t n_indices, int64_t n_values, int64_t rows, int64_t cols, int64_t elem_size) {
        pf::csr_check_sizes(n_indptr, n_indices, n_values, rows, cols, elem_size);
      },
      py::arg("n_indptr"), py::arg("n_indices"), py::arg("n_values"), py::arg("rows"), py::arg("cols"),
      py::arg("elem_size"),
      "O(1) CSR size checks (negative sizes, rows*cols*elem_size overflow, length mismatches); raises ValueError");
  m.def(
      "csr_validate",
      [](uintptr_t indptr, int64_t n_indptr, uintptr_t indices, int64_t n_indices, int index_type, int64_t n_values,
         int64_t rows, int64_t cols, int dtype, bool on_cuda, uintptr_t stream) {
        py::gil_scoped_release nogil;
        if (on_cuda) {
#ifdef PF_WITH_CUDA
          pf::csr_validate_cuda(ptr<const int64_t>(indptr), n_indptr, ptr<const void>(indices), n_indices,
                                index_type, n_values, rows, cols, dtype, ptr<void>(stream));
          return;
#else
          no_cuda("csr_validate");
#endif
        }
        pf::csr_validate_cpu(ptr<const int64_t>(indptr), n_indptr, ptr<const void>(indices), n_indices, index_type,
                             n_values, rows, cols, dtype);
      },
      py::arg("indptr"), py::arg("n_indptr"), py::arg("indices"), py::arg("n_indices"), py::arg("index_type"),
      py::arg("n_values"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("on_cuda") = false,
      py::arg("stream") = 0, "Validate an untrusted CSR matrix; raises ValueError naming the first problem");
  m.def(
      "csr_to_dense",
      [](uintptr_t indptr, int64_t n_indptr, uintptr_t indices, int64_t n_indices, int index_type, uintptr_t values,
         int64_t n_values, int64_t rows, int64_t cols, int dtype, uintptr_t out, bool on_cuda, uintptr_t stream) {
        py::gil_scoped_release nogil;
        if (on_cuda) {
#ifdef PF_WITH_CUDA
          pf::csr_to_dense_cuda(ptr<const int64_t>(indptr), n_indptr, ptr<const void>(indices), n_indices,
                                index_type, ptr<const void>(values), n_values, rows, cols, dtype, ptr<void>(out),
                                ptr<void>(stream));
          return;
#else
          no_cuda("csr_to_dense");
#endif
        }
        pf::csr_to_dense_cpu(ptr<const int64_t>(indptr), n_indptr, ptr<const void>(indices), n_indices, index_type,
                             ptr<const void>(values), n_values, rows, cols, dtype, ptr<void>(out));
      },
      py::arg("indptr"), py::arg("n_indptr"), py::arg("indices"), py::arg("n_indices"), py::arg("index_type"),
      py::arg("values"), py::arg("n_values"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("out"),
      py::arg("on_cuda") = false, py::arg("stream") = 0,
      "Validate an untrusted CSR matrix and write it densely into out (rows*cols elements of dtype)");
}
