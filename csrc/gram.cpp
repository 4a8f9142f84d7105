// Packed double-double Gram totals; see gram.h.
#include "gram.h"

#include <algorithm>
#include <cmath>

#include "compensated.h"

namespace icprune {
namespace {

// Rows below which one thread does the whole triangle (thread start-up costs more).
constexpr int64_t kParallelRows = 1024;

template <typename T>
void add_packed(const T* g, int64_t c, int64_t row_stride, int64_t col_stride, int two_e,
                double* hi, double* lo) {
  // x * 2^two_e is exact in double for every exponent icprune passes (|two_e| <= 300).
  const double scale = std::ldexp(1.0, two_e);
#pragma omp parallel for schedule(dynamic, 16) if (c >= kParallelRows)
  for (int64_t j = 0; j < c; ++j) {
    const T* row = g + j * row_stride;
    const int64_t base = packed_size(j);
    for (int64_t i = 0; i <= j; ++i)
      compensated_add_one(hi[base + i], lo[base + i],
                          static_cast<double>(row[i * col_stride]) * scale, 0.0);
  }
}

}  // namespace

void gram_add_packed_f32(const float* g, int64_t c, int64_t row_stride, int64_t col_stride,
                         int two_e, double* hi, double* lo) {
  add_packed(g, c, row_stride, col_stride, two_e, hi, lo);
}

void gram_add_packed_f64(const double* g, int64_t c, int64_t row_stride, int64_t col_stride,
                         int two_e, double* hi, double* lo) {
  add_packed(g, c, row_stride, col_stride, two_e, hi, lo);
}

void gram_unpack(const double* packed, int64_t c, double* out) {
#pragma omp parallel for schedule(dynamic, 16) if (c >= kParallelRows)
  for (int64_t j = 0; j < c; ++j) {
    const double* row = packed + packed_size(j);
    for (int64_t i = 0; i <= j; ++i) {
      out[j * c + i] = row[i];
      out[i * c + j] = row[i];
    }
  }
}

void gram_squared_distance(const double* packed, int64_t c, double* out) {
#pragma omp parallel for schedule(dynamic, 16) if (c >= kParallelRows)
  for (int64_t j = 0; j < c; ++j) {
    const double* row = packed + packed_size(j);
    const double dj = row[j];
    for (int64_t i = 0; i < j; ++i) {
      const double di = packed[packed_size(i) + i];
      const double v = std::max((dj + di) - 2.0 * row[i], 0.0);
      out[j * c + i] = v;
      out[i * c + j] = v;
    }
    out[j * c + j] = 0.0;
  }
}

}  // namespace icprune
