// pybind11 bindings for pure_fast._C. Functions take integer addresses, sizes and a stream handle;
// dtype, device and contiguity are checked in Python (pure_fast/_native.py) and again here for sizes.
#include <pybind11/pybind11.h>

#include "check.h"
#include "common.h"

namespace py = pybind11;

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
}
