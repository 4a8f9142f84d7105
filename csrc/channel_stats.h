// Per-channel histogram, extremes and sums of one batch of feature maps, in one pass over memory.
//
// The CPU fast path behind ChannelStats(backend="cpp"): the binning is exactly the one of
// icprune/binning.py (power-of-two bins anchored at 0, layout from the range alone), so the
// counts equal the torch reference bit for bit. No libtorch: the caller passes a raw pointer and
// element strides (Python hands over numpy views of CPU tensors).
#pragma once

#include <cstdint>

namespace icprune {

// Constants of icprune/stats/binning.py, compiled in. The extension exports them
// (icprune._C.BINNING_CONSTANTS) and icprune.stats.backends refuses to load it when they differ
// from the Python values.
constexpr int64_t kMinExponent = -120;  // K_MIN
constexpr int64_t kIndexBits = 40;      // INDEX_BITS
constexpr int64_t kMaxShift = 62;       // MAX_SHIFT

enum class Dtype { kFloat16, kBFloat16, kFloat32, kFloat64 };

// A batch viewed as (N, C, S) elements (S = prod(spatial)), with strides in elements. Fast when
// stride_s == 1 (channel planes contiguous, NCHW) or stride_c == 1 (channels contiguous, NHWC);
// any strides are read correctly. C * bins must stay below 2^31.
struct BatchView {
  const void* data;
  Dtype dtype;
  int64_t n, c, s;
  int64_t stride_n, stride_c, stride_s;
  // False: extremes, layouts and sums only, counts left zero (statistics without histograms).
  bool histogram = true;
};

// Outputs, all caller-allocated, C = view.c, B = bins:
//   counts   int64[C * B]  histogram of channel c in its own batch layout (row c)
//   bin_exponent int64[C]  bin exponent of channel c (icprune.stats.binning.bin_layout of lo, hi)
//   bin_offset   int64[C]  bin offset of channel c
//   minimum, maximum double[C]  extremes of channel c
//   sums     double[C]     sum of channel c
// Non-finite values are counted (the return value) and read as 0 everywhere.
int64_t channel_stats(const BatchView& view, int bins, int64_t* counts, int64_t* bin_exponent,
                      int64_t* bin_offset, double* minimum, double* maximum, double* sums);

}  // namespace icprune
