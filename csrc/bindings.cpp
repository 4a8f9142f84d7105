// Python bindings of icprune._C. Only PYBIND11_MODULE lives here; each concern has its own file.
#include <pybind11/pybind11.h>

#include "build_info.h"
#include "slicing.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "icprune's compiled CPU routines";
  m.def(
      "build_info",
      []() {
        const icprune::BuildInfo info = icprune::build_info();
        py::dict d;
        d["compiler"] = info.compiler;
        d["cxx_standard"] = info.cxx_standard;
        d["openmp"] = info.openmp;
        d["max_threads"] = info.max_threads;
        return d;
      },
      "How this extension was compiled: dict with 'compiler' (str), 'cxx_standard' (int, "
      "__cplusplus), 'openmp' (bool) and 'max_threads' (int, OpenMP threads available).");
  m.def("slice_channels", &icprune::slice_channels, py::arg("src"), py::arg("rows"),
        py::arg("cols"), py::arg("dst"),
        "dst[:] = src[rows][:, cols] in one pass for src (O, I, K) of 2/4/8-byte elements (dims "
        "0-1 any stride, K contiguous), int64 rows/cols, C-contiguous dst (len(rows), len(cols), "
        "K); bit-identical copy, OpenMP threads, GIL released.");
}
