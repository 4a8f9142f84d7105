// One-call merge of batch statistics into running statistics; see merge.h.
#include "merge.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "binning.h"
#include "compensated.h"

namespace icprune {

void merge_batch(const RunningStats& s, const BatchParts& b) {
  const int64_t c = s.c;
  const int bins = s.bins;
  std::vector<int64_t> k(c), off(c);
  for (int64_t j = 0; j < c; ++j) {
    s.minimum[j] = std::min(s.minimum[j], b.minimum[j]);
    s.maximum[j] = std::max(s.maximum[j], b.maximum[j]);
  }
  // bin_layout gives an empty range (+inf, -inf) the finest bins anchored at 0.
  auto layout_of = [bins](double lo, double hi, int64_t& kk, int64_t& oo) {
    kk = kMinExponent;
    oo = 0;
    if (lo <= hi) layout(lo, hi, bins, kk, oo);
  };
  if (s.channel_range) {
    for (int64_t j = 0; j < c; ++j) layout_of(s.minimum[j], s.maximum[j], k[j], off[j]);
  } else {
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t j = 0; j < c; ++j) {
      lo = std::min(lo, s.minimum[j]);
      hi = std::max(hi, s.maximum[j]);
    }
    layout_of(lo, hi, k[0], off[0]);
    std::fill(k.begin(), k.end(), k[0]);
    std::fill(off.begin(), off.end(), off[0]);
  }
  std::vector<int64_t> moved(bins);
  for (int64_t j = 0; j < c; ++j) {
    if (s.histogram) {
      int64_t* row = s.counts + j * bins;
      if (k[j] != s.bin_exponent[j] || off[j] != s.bin_offset[j]) {
        std::fill(moved.begin(), moved.end(), 0);
        rebin_add(row, s.bin_exponent[j], s.bin_offset[j], moved.data(), k[j], off[j], bins);
        std::copy(moved.begin(), moved.end(), row);
      }
      rebin_add(b.counts + j * bins, b.bin_exponent[j], b.bin_offset[j], row, k[j], off[j], bins);
    }
    s.bin_exponent[j] = k[j];
    s.bin_offset[j] = off[j];
    if (b.sums_lo != nullptr)
      compensated_add_one(s.sums[j], s.sums_lo[j], b.sums[j], b.sums_lo[j]);
    else
      compensated_add_one(s.sums[j], s.sums_lo[j], b.sums[j]);
  }
}

int64_t update_stats(const BatchView& view, const RunningStats& state, bool commit_nonfinite,
                     double& maxabs) {
  const int64_t c = state.c;
  BatchView v = view;
  v.histogram = state.histogram;
  std::vector<int64_t> counts(c * state.bins), k(c), off(c);
  std::vector<double> lo(c), hi(c), sums(c);
  const int64_t nonfinite =
      channel_stats(v, state.bins, counts.data(), k.data(), off.data(), lo.data(), hi.data(),
                    sums.data());
  maxabs = 0.0;
  for (int64_t j = 0; j < c; ++j) maxabs = std::max({maxabs, -lo[j], hi[j]});
  if (nonfinite == 0 || commit_nonfinite)
    merge_batch(state, {counts.data(), k.data(), off.data(), lo.data(), hi.data(), sums.data(),
                        nullptr});
  return nonfinite;
}

}  // namespace icprune
