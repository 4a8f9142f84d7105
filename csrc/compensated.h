// Compensated (double-double) accumulation: (hi, lo) += x (+ x_lo), elementwise, in one pass.
//
// The CPU fast path of icprune/compensated.py (add_): the same IEEE operations in the same order
// (TwoSum, then a renormalising TwoSum), so the results equal the torch code bit for bit. Must be
// compiled without -ffast-math / -fassociative-math (TwoSum relies on exact IEEE rounding).
#pragma once

#include <cstdint>

namespace icprune {

// hi, lo: double[n] running total and its remainder (updated in place); x: double[n] term;
// x_lo: double[n] remainder of x, or nullptr. Arrays must not overlap. OpenMP for large n.
void compensated_add(double* hi, double* lo, const double* x, const double* x_lo, int64_t n);

}  // namespace icprune
