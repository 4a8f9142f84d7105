// Python bindings of icprune._C. Only PYBIND11_MODULE lives here; each concern has its own file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "bind_stats.h"
#include "build_info.h"
#include "slicing.h"
#include "channel_stats.h"
#include "compensated.h"

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
  py::dict binning;
  binning["K_MIN"] = icprune::kMinExponent;
  binning["INDEX_BITS"] = icprune::kIndexBits;
  binning["MAX_SHIFT"] = icprune::kMaxShift;
  m.attr("BINNING_CONSTANTS") = binning;
  m.def(
      "channel_stats",
      [](py::array x, int dtype, int bins, bool histogram) {
        if (x.ndim() != 3 || dtype < 0 || dtype > 3 || bins < 2)
          throw std::invalid_argument("channel_stats: expected an (N, C, S) array, dtype 0-3, bins >= 2");
        const icprune::Dtype dt = static_cast<icprune::Dtype>(dtype);
        const py::ssize_t size = x.itemsize();
        const int64_t c = x.shape(1);
        py::array_t<int64_t> counts({c, static_cast<int64_t>(bins)});
        py::array_t<int64_t> bin_exponent(c), bin_offset(c);
        py::array_t<double> minimum(c), maximum(c), sums(c);
        const icprune::BatchView view{x.data(),           dt,
                                      x.shape(0),         c,
                                      x.shape(2),         x.strides(0) / size,
                                      x.strides(1) / size, x.strides(2) / size,
                                      histogram};
        int64_t nonfinite;
        {
          py::gil_scoped_release release;
          nonfinite = icprune::channel_stats(view, bins, counts.mutable_data(),
                                             bin_exponent.mutable_data(), bin_offset.mutable_data(),
                                             minimum.mutable_data(), maximum.mutable_data(),
                                             sums.mutable_data());
        }
        py::dict out;
        out["counts"] = counts;
        out["bin_exponent"] = bin_exponent;
        out["bin_offset"] = bin_offset;
        out["minimum"] = minimum;
        out["maximum"] = maximum;
        out["sums"] = sums;
        out["nonfinite"] = nonfinite;
        return out;
      },
      py::arg("x"), py::arg("dtype"), py::arg("bins"), py::arg("histogram") = true,
      "Histogram, extremes and sums of one batch, one pass (csrc/channel_stats.h). x: array "
      "(N, C, S) of float16 (dtype 0), bfloat16 bits as int16/uint16 (1), float32 (2) or float64 "
      "(3), any strides. Returns a dict: 'counts' int64[C, bins] in each channel's own batch "
      "layout, 'bin_exponent' int64[C], 'bin_offset' int64[C], 'minimum' float64[C], 'maximum' "
      "float64[C], 'sums' float64[C], 'nonfinite' int; non-finite values are read as 0; "
      "histogram=False: counts are zeros (not computed). "
      "BINNING_CONSTANTS: the binning constants compiled in (K_MIN, INDEX_BITS, MAX_SHIFT).");
  icprune::bind_stats(m);
  m.def(
      "compensated_add",
      [](py::array_t<double, 0> hi, py::array_t<double, 0> lo, py::array_t<double, 0> x,
         std::optional<py::array_t<double, 0>> x_lo) {
        const py::ssize_t n = hi.size();
        auto fits = [n](const py::array& a) {
          return a.size() == n && (a.flags() & py::array::c_style);
        };
        if (!fits(hi) || !fits(lo) || !fits(x) || (x_lo && !fits(*x_lo)))
          throw std::invalid_argument("compensated_add: expected C-contiguous float64 arrays of one size");
        double* h = hi.mutable_data();
        double* l = lo.mutable_data();
        const double* xs = x.data();
        const double* xl = x_lo ? x_lo->data() : nullptr;
        py::gil_scoped_release release;
        icprune::compensated_add(h, l, xs, xl, n);
      },
      py::arg("hi"), py::arg("lo"), py::arg("x"), py::arg("x_lo") = py::none(),
      "(hi, lo) += x (+ x_lo) in place, compensated (TwoSum, renormalised), one pass "
      "(csrc/compensated.h): the same results as icprune.stats.compensated.add_'s torch code. All "
      "C-contiguous float64 arrays of one size, not overlapping; x_lo may be None.");
}
