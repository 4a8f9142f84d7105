// The binning of icprune/stats/binning.py in C++: bin layouts and exact rebinning, shared by the
// batch pass (channel_stats.cpp) and the merge into running statistics (merge.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "channel_stats.h"

namespace icprune {

// 2^-k as torch.ldexp computes it (x * 2**other), exact for the exponents binning uses.
inline double scale_of(int64_t k) { return std::ldexp(1.0, static_cast<int>(-k)); }

inline int64_t floor_log2(double v) {
  int e;
  std::frexp(v, &e);
  return static_cast<int64_t>(e) - 1;
}

inline int64_t bin_index(double x, int64_t k) {
  return static_cast<int64_t>(std::floor(x * scale_of(k)));
}

inline int bit_length(int64_t v) {
  int bits = 0;
  for (; v > 0; v >>= 1) ++bits;
  return bits;
}

// icprune.stats.binning.bin_layout for one range [lo, hi] (lo <= hi, finite).
inline void layout(double lo, double hi, int bins, int64_t& k, int64_t& off) {
  const double half_span = hi / 2 - lo / 2;
  k = kMinExponent;
  if (half_span > 0) k = std::max(k, floor_log2(half_span) + 1 - bit_length(bins - 1));
  const double maxabs = std::max(std::fabs(lo), std::fabs(hi));
  if (maxabs > 0) k = std::max(k, floor_log2(maxabs) + 1 - kIndexBits);
  while (bin_index(hi, k) - bin_index(lo, k) > bins - 1) ++k;
  off = bin_index(lo, k);
}

// icprune.stats.binning.rebin of one channel: add src (layout k0, off0) into dst (layout k1, off1).
template <typename C>
void rebin_add(const C* src, int64_t k0, int64_t off0, int64_t* dst, int64_t k1, int64_t off1,
               int bins) {
  const int64_t shift = std::min(std::max<int64_t>(k1 - k0, 0), kMaxShift);
  for (int j = 0; j < bins; ++j) {
    if (src[j] == 0) continue;
    const int64_t target = ((off0 + j) >> shift) - off1;
    dst[std::min<int64_t>(std::max<int64_t>(target, 0), bins - 1)] += src[j];
  }
}

}  // namespace icprune
