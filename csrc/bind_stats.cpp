// Python bindings of the running-statistics routines (merge.h, gram.h): icprune._C.update_stats,
// merge_stats, gram_add_packed, gram_unpack, gram_squared_distance. Every array is checked
// (dtype, C-contiguity, size) and used in place; nothing is converted or copied.
#include "bind_stats.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "channel_stats.h"
#include "gram.h"
#include "merge.h"

namespace py = pybind11;

namespace icprune {
namespace {

template <typename T>
bool is_exact(const py::array& a, int64_t size) {
  return a.dtype().is(py::dtype::of<T>()) && (a.flags() & py::array::c_style) &&
         a.size() == size;
}

template <typename T>
T* writable(py::array& a, int64_t size, const char* what) {
  if (!is_exact<T>(a, size) || !a.writeable())
    throw std::invalid_argument(std::string(what) + ": expected a writable C-contiguous array of " +
                                std::to_string(size) + " elements of the exact dtype");
  return static_cast<T*>(a.mutable_data());
}

template <typename T>
const T* readable(const py::array& a, int64_t size, const char* what) {
  if (!is_exact<T>(a, size))
    throw std::invalid_argument(std::string(what) + ": expected a C-contiguous array of " +
                                std::to_string(size) + " elements of the exact dtype");
  return static_cast<const T*>(a.data());
}

// The running statistics of one ChannelStats (arrays shared with its tensors).
RunningStats running(bool channel_range, bool histogram, py::array& counts, py::array& k,
                     py::array& off, py::array& mn, py::array& mx, py::array& sums,
                     py::array& sums_lo) {
  if (counts.ndim() != 2 || counts.shape(1) < 2)
    throw std::invalid_argument("statistics: counts must be an int64 (C, bins) array");
  const int64_t c = counts.shape(0);
  return {c,
          static_cast<int>(counts.shape(1)),
          channel_range,
          histogram,
          writable<int64_t>(counts, c * counts.shape(1), "counts"),
          writable<int64_t>(k, c, "bin_exponent"),
          writable<int64_t>(off, c, "bin_offset"),
          writable<double>(mn, c, "minimum"),
          writable<double>(mx, c, "maximum"),
          writable<double>(sums, c, "sums"),
          writable<double>(sums_lo, c, "sums_lo")};
}

}  // namespace

void bind_stats(py::module_& m) {
  m.def(
      "update_stats",
      [](py::array x, int dtype, bool channel_range, bool histogram, bool commit_nonfinite,
         py::array counts, py::array k, py::array off, py::array mn, py::array mx, py::array sums,
         py::array sums_lo) {
        if (x.ndim() != 3 || dtype < 0 || dtype > 3)
          throw std::invalid_argument("update_stats: expected an (N, C, S) array and dtype 0-3");
        const RunningStats s = running(channel_range, histogram, counts, k, off, mn, mx, sums,
                                       sums_lo);
        if (x.shape(1) != s.c)
          throw std::invalid_argument("update_stats: x has another number of channels");
        const py::ssize_t size = x.itemsize();
        const BatchView view{x.data(), static_cast<Dtype>(dtype), x.shape(0), s.c, x.shape(2),
                             x.strides(0) / size, x.strides(1) / size, x.strides(2) / size};
        double maxabs = 0.0;
        int64_t nonfinite;
        {
          py::gil_scoped_release release;
          nonfinite = update_stats(view, s, commit_nonfinite, maxabs);
        }
        return py::make_tuple(nonfinite, maxabs);
      },
      py::arg("x"), py::arg("dtype"), py::arg("channel_range"), py::arg("histogram"),
      py::arg("commit_nonfinite"), py::arg("counts"), py::arg("bin_exponent"),
      py::arg("bin_offset"), py::arg("minimum"), py::arg("maximum"), py::arg("sums"),
      py::arg("sums_lo"),
      "One batch x (N, C, S; dtype codes as channel_stats) into running statistics in place "
      "(csrc/merge.h): counts int64[C, bins], bin_exponent/bin_offset int64[C], minimum/maximum/"
      "sums/sums_lo float64[C], all C-contiguous. channel_range: range_mode 'channel'; histogram: "
      "keep histograms; commit_nonfinite: add a batch holding NaN/Inf (read as 0) instead of "
      "leaving everything unchanged. Returns (nonfinite int, maxabs float).");
  m.def(
      "merge_stats",
      [](bool channel_range, bool histogram, py::array counts, py::array k, py::array off,
         py::array mn, py::array mx, py::array sums, py::array sums_lo, py::array b_counts,
         py::array b_k, py::array b_off, py::array b_mn, py::array b_mx, py::array b_sums,
         std::optional<py::array> b_sums_lo) {
        const RunningStats s = running(channel_range, histogram, counts, k, off, mn, mx, sums,
                                       sums_lo);
        const BatchParts b{
            readable<int64_t>(b_counts, s.c * s.bins, "batch counts"),
            readable<int64_t>(b_k, s.c, "batch bin_exponent"),
            readable<int64_t>(b_off, s.c, "batch bin_offset"),
            readable<double>(b_mn, s.c, "batch minimum"),
            readable<double>(b_mx, s.c, "batch maximum"),
            readable<double>(b_sums, s.c, "batch sums"),
            b_sums_lo ? readable<double>(*b_sums_lo, s.c, "batch sums_lo") : nullptr};
        py::gil_scoped_release release;
        merge_batch(s, b);
      },
      py::arg("channel_range"), py::arg("histogram"), py::arg("counts"), py::arg("bin_exponent"),
      py::arg("bin_offset"), py::arg("minimum"), py::arg("maximum"), py::arg("sums"),
      py::arg("sums_lo"), py::arg("batch_counts"), py::arg("batch_bin_exponent"),
      py::arg("batch_bin_offset"), py::arg("batch_minimum"), py::arg("batch_maximum"),
      py::arg("batch_sums"), py::arg("batch_sums_lo") = py::none(),
      "Add batch statistics (each channel in its own bin layout) into running statistics in "
      "place (csrc/merge.h); arrays as update_stats, the batch's read only.");
  m.def(
      "gram_add_packed",
      [](py::array g, int two_e, py::array hi, py::array lo) {
        if (g.ndim() != 2 || g.shape(0) != g.shape(1))
          throw std::invalid_argument("gram_add_packed: g must be a square 2-D array");
        const int64_t c = g.shape(0), n = packed_size(c);
        double* h = writable<double>(hi, n, "gram_add_packed hi");
        double* l = writable<double>(lo, n, "gram_add_packed lo");
        const py::ssize_t size = g.itemsize();
        // Entry (j, i), i <= j, of the symmetric matrix: g[i, j], the upper triangle.
        const int64_t row = g.strides(1) / size, col = g.strides(0) / size;
        if (g.dtype().is(py::dtype::of<float>())) {
          const float* p = static_cast<const float*>(g.data());
          py::gil_scoped_release release;
          gram_add_packed_f32(p, c, row, col, two_e, h, l);
        } else if (g.dtype().is(py::dtype::of<double>())) {
          const double* p = static_cast<const double*>(g.data());
          py::gil_scoped_release release;
          gram_add_packed_f64(p, c, row, col, two_e, h, l);
        } else {
          throw std::invalid_argument("gram_add_packed: g must be float32 or float64");
        }
      },
      py::arg("g"), py::arg("two_e"), py::arg("hi"), py::arg("lo"),
      "(hi, lo) += g * 2**two_e over the upper triangle of g (C, C; float32 or float64, any "
      "strides; the lower triangle is never read), compensated; hi, lo: float64[C (C + 1) / 2], "
      "the packed lower triangle (csrc/gram.h).");
  m.def(
      "gram_unpack",
      [](py::array packed, py::array out) {
        if (out.ndim() != 2 || out.shape(0) != out.shape(1))
          throw std::invalid_argument("gram_unpack: out must be a square 2-D array");
        const int64_t c = out.shape(0);
        const double* p = readable<double>(packed, packed_size(c), "gram_unpack packed");
        double* o = writable<double>(out, c * c, "gram_unpack out");
        py::gil_scoped_release release;
        gram_unpack(p, c, o);
      },
      py::arg("packed"), py::arg("out"),
      "out (C, C) float64 = the symmetric matrix of the packed lower triangle (csrc/gram.h).");
  m.def(
      "gram_squared_distance",
      [](py::array packed, py::array out) {
        if (out.ndim() != 2 || out.shape(0) != out.shape(1))
          throw std::invalid_argument("gram_squared_distance: out must be a square 2-D array");
        const int64_t c = out.shape(0);
        const double* p = readable<double>(packed, packed_size(c), "gram_squared_distance packed");
        double* o = writable<double>(out, c * c, "gram_squared_distance out");
        py::gil_scoped_release release;
        gram_squared_distance(p, c, o);
      },
      py::arg("packed"), py::arg("out"),
      "out (C, C) float64 = the squared Euclidean distances between channels from the packed "
      "Gram, clamped at 0, zero diagonal (ChannelStats.distance before its sqrt, csrc/gram.h).");
}

}  // namespace icprune
