// Compensated (double-double) accumulation, one pass over memory; see compensated.h.
#include "compensated.h"

namespace icprune {

namespace {

// Elements below which one thread does the whole array (thread start-up costs more).
constexpr int64_t kParallelMin = 1 << 20;

}  // namespace

void compensated_add(double* hi, double* lo, const double* x, const double* x_lo, int64_t n) {
  const bool parallel = n >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < n; ++i) {
    if (x_lo != nullptr)
      compensated_add_one(hi[i], lo[i], x[i], x_lo[i]);
    else
      compensated_add_one(hi[i], lo[i], x[i]);
  }
}

}  // namespace icprune
