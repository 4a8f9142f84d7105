// Fused two-axis channel gather: dst = src[rows][:, cols] in one pass, no intermediate.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace icprune {

// int64 index vector, made C-contiguous on the way in.
using Index = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;

// src:  array (O, I, K) of 2-, 4- or 8-byte elements; dims 0 and 1 may have any strides, the
//       trailing K elements of a (o, i) entry must be contiguous (stride = itemsize).
// rows: int64 (n_rows,) indices into dim 0, each in [0, O).
// cols: int64 (n_cols,) indices into dim 1, each in [0, I).
// dst:  C-contiguous array (n_rows, n_cols, K) of the same itemsize, written in place.
// Copies bytes (bit-identical), multithreaded with OpenMP, with the GIL released.
void slice_channels(const pybind11::array& src, const Index& rows,
                    const Index& cols, pybind11::array& dst);

}  // namespace icprune
