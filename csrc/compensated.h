// Compensated (double-double) accumulation: (hi, lo) += x (+ x_lo), elementwise, in one pass.
//
// The CPU fast path of icprune/compensated.py (add_): the same IEEE operations in the same order
// (TwoSum, then a renormalising TwoSum), so the results equal the torch code bit for bit. Must be
// compiled without -ffast-math / -fassociative-math (TwoSum relies on exact IEEE rounding).
#pragma once

#include <cstdint>

namespace icprune {

// Knuth's TwoSum: s + e == a + b exactly (IEEE round to nearest, no overflow).
inline void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double v = s - a;
  e = (a - (s - v)) + (b - v);
}

// One entry of compensated_add: (hi, lo) += x, then renormalised.
inline void compensated_add_one(double& hi, double& lo, double x) {
  double s, e;
  two_sum(hi, x, s, e);
  two_sum(s, lo + e, hi, lo);
}

// One entry of compensated_add with the remainder x_lo of x: (hi, lo) += x + x_lo.
inline void compensated_add_one(double& hi, double& lo, double x, double x_lo) {
  double s, e;
  two_sum(hi, x, s, e);
  two_sum(s, (lo + e) + x_lo, hi, lo);
}

// hi, lo: double[n] running total and its remainder (updated in place); x: double[n] term;
// x_lo: double[n] remainder of x, or nullptr. Arrays must not overlap. OpenMP for large n.
void compensated_add(double* hi, double* lo, const double* x, const double* x_lo, int64_t n);

}  // namespace icprune
