// Compensated (double-double) accumulation, one pass over memory; see compensated.h.
#include "compensated.h"

namespace icprune {

namespace {

// Elements below which one thread does the whole array (thread start-up costs more).
constexpr int64_t kParallelMin = 1 << 16;

// Knuth's TwoSum: s + e == a + b exactly (IEEE round to nearest, no overflow).
inline void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double v = s - a;
  e = (a - (s - v)) + (b - v);
}

}  // namespace

void compensated_add(double* hi, double* lo, const double* x, const double* x_lo, int64_t n) {
  const bool parallel = n >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < n; ++i) {
    double s, e;
    two_sum(hi[i], x[i], s, e);
    double l = lo[i] + e;
    if (x_lo != nullptr) l += x_lo[i];
    two_sum(s, l, hi[i], lo[i]);
  }
}

}  // namespace icprune
