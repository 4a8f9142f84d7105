// Adding a batch's statistics (each channel in its own bin layout) into the running statistics
// of a ChannelStats, in one call: what ChannelStats._add does with torch ops
// (icprune/stats/channel_stats.py), with the same results bit for bit.
#pragma once

#include <cstdint>

#include "channel_stats.h"

namespace icprune {

// Running statistics of C channels, all caller-owned and updated in place (B = bins).
struct RunningStats {
  int64_t c;
  int bins;
  bool channel_range;  // range_mode "channel" (else "layer": one layout shared by all channels)
  bool histogram;      // histograms kept (else counts are left untouched)
  int64_t* counts;     // [C * B]
  int64_t* bin_exponent;
  int64_t* bin_offset;  // [C] each
  double* minimum;
  double* maximum;
  double* sums;
  double* sums_lo;  // [C] each
};

// A batch (or another instance) in its own per-channel layouts, read only. sums_lo may be null.
struct BatchParts {
  const int64_t* counts;  // [C * B]
  const int64_t* bin_exponent;
  const int64_t* bin_offset;
  const double* minimum;
  const double* maximum;
  const double* sums;
  const double* sums_lo;
};

// Extremes widened, the layout recomputed (icprune.stats.binning.bin_layout of the new extremes,
// per channel or over the layer), the running counts moved into it and the batch's added
// (exact rebins), sums added compensated (TwoSum, as icprune.stats.compensated.add_).
void merge_batch(const RunningStats& state, const BatchParts& batch);

// One batch into running statistics in one call: channel_stats() of the batch (histograms only
// if state.histogram) and, unless it held non-finite values and commit_nonfinite is false (then
// nothing is changed), merge_batch(). Returns the number of non-finite values (read as 0) and
// sets maxabs to the largest magnitude of the batch (0 for all-zero data).
int64_t update_stats(const BatchView& view, const RunningStats& state, bool commit_nonfinite,
                     double& maxabs);

}  // namespace icprune
