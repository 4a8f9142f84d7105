// One pass over a batch: per-channel extremes, sums and exact power-of-two histograms.
//
// The work is split into items (a run of rows of one channel plane, or a tile of NHWC rows).
// Each item bins its values in a layout computed from its own range; a layout for a larger range
// is always coarser and aligned (icprune/binning.py), so item histograms move into the channel's
// batch layout exactly (rebin) - the counts equal binning every value at once, bit for bit.
// Each item is read from memory once: its second sweep (the histogram) hits the cache.
#include "channel_stats.h"

#include "binning.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define ICPRUNE_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ICPRUNE_MULTIVERSION
#endif
#if defined(__GNUC__)
#define ICPRUNE_INLINE inline __attribute__((always_inline))
#else
#define ICPRUNE_INLINE inline
#endif

namespace icprune {
namespace {

// Values per item: small enough that an item stays in L2 between its two sweeps.
constexpr int64_t kItemValues = 1 << 15;
// Bytes per NHWC tile of rows (all channels): read twice, the second time from L2.
constexpr int64_t kTileBytes = 1 << 17;
// Values per chunk of NHWC tiles: the unit of parallel work (and of the sums' reduction order).
constexpr int64_t kChunkValues = 1 << 18;
// Smaller batches run on one thread: waking a team costs more than it saves (and much more on a
// loaded machine).
constexpr int64_t kParallelValues = 1 << 20;

// Loads: each returns the value in the compute type F, exactly (float for 16/32-bit inputs,
// double for float64), branch-free so that the loops vectorise.
struct LoadF16 {
  using type = uint16_t;
  using F = float;
  static ICPRUNE_INLINE float get(uint16_t h) {
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    const uint32_t normal = sign | ((exp + 112u) << 23) | (mant << 13);
    const uint32_t special = sign | 0x7f800000u | (mant << 13);  // inf, nan
    const uint32_t bits = exp == 0x1f ? special : normal;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    const float sub = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24, exact
    return exp == 0 ? (sign ? -sub : sub) : f;
  }
};
struct LoadBF16 {
  using type = uint16_t;
  using F = float;
  static ICPRUNE_INLINE float get(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};
struct LoadF32 {
  using type = float;
  using F = float;
  static ICPRUNE_INLINE float get(float v) { return v; }
};
struct LoadF64 {
  using type = double;
  using F = double;
  static ICPRUNE_INLINE double get(double v) { return v; }
};

// A non-finite value reads as 0 (v - v is 0 exactly for finite v, NaN otherwise).
template <typename F>
ICPRUNE_INLINE F finite_or_zero(F v) {
  return (v - v) == F(0) ? v : F(0);
}

// Running statistics of one channel over some of its values, binned in their own layout.
struct Partial {
  double lo = INFINITY, hi = -INFINITY, sum = 0.0;
  int64_t k = kMinExponent, off = 0, nonfinite = 0;
  int64_t* hist = nullptr;  // [bins]
};

// Bin of a finite value v in a layout with scale 2^-k and offset off, both exact in F (see
// csrc/channel_stats.h): floor(v * scale) - off. Only an underflow of v * scale can be inexact,
// and it only matters for a negative v rounding to -0, whose bin is -1.
template <typename F>
ICPRUNE_INLINE int32_t index_in(F v, F scale, F off) {
  const F t = v * scale;
  return static_cast<int32_t>(std::floor(t) - off) - ((t == F(0)) & (v < F(0)));
}

// ---------------------------------------------------------------- planes (NCHW): one channel

// Extremes, sum and non-finite count of values, accumulated per SIMD lane (W lanes of F):
// element-wise updates of small arrays, which compilers vectorise without fast-math.
template <typename F>
struct Lanes {
  static constexpr int W = 64 / sizeof(F);
  F lo[W], hi[W];
  double sum[W];
  int32_t bad[W];
  Lanes() {
    std::fill(lo, lo + W, F(INFINITY));
    std::fill(hi, hi + W, F(-INFINITY));
    std::fill(sum, sum + W, 0.0);
    std::fill(bad, bad + W, 0);
  }
  ICPRUNE_INLINE void add(int l, F raw) {
    const F v = finite_or_zero(raw);
    bad[l] += (raw - raw) != F(0);
    lo[l] = v < lo[l] ? v : lo[l];
    hi[l] = v > hi[l] ? v : hi[l];
    sum[l] += v;
  }
};

template <typename L>
ICPRUNE_INLINE void scan(const typename L::type* p, int64_t count, Lanes<typename L::F>& acc) {
  constexpr int W = Lanes<typename L::F>::W;
  int64_t j = 0;
  for (; j + W <= count; j += W)
    for (int l = 0; l < W; ++l) acc.add(l, L::get(p[j + l]));
  for (; j < count; ++j) acc.add(0, L::get(p[j]));
}

// Runs of `count` values at base + i*step_n (i < rows) + j (j < count), of one channel.
// sub: [4 * bins] scratch. Without `histogram` only extremes, layout and sums are computed (the
// item's counts are zeros).
template <typename L>
ICPRUNE_INLINE void plane_item(const typename L::type* base, int64_t step_n, int64_t rows,
                               int64_t count, int bins, bool histogram, Partial& out,
                               int32_t* sub) {
  using F = typename L::F;
  Lanes<F> acc;
  for (int64_t r = 0; r < rows; ++r) scan<L>(base + r * step_n, count, acc);
  out.lo = INFINITY;
  out.hi = -INFINITY;
  out.sum = 0.0;
  out.nonfinite = 0;
  for (int l = 0; l < Lanes<F>::W; ++l) {
    out.lo = std::min<double>(out.lo, acc.lo[l]);
    out.hi = std::max<double>(out.hi, acc.hi[l]);
    out.sum += acc.sum[l];
    out.nonfinite += acc.bad[l];
  }
  layout(out.lo, out.hi, bins, out.k, out.off);
  if (!histogram) {
    std::fill(out.hist, out.hist + bins, 0);
    return;
  }
  // Four interleaved sub-histograms keep repeated bins from serialising on one counter.
  std::fill(sub, sub + 4 * bins, 0);
  const F scale = static_cast<F>(scale_of(out.k)), off = static_cast<F>(out.off);
  int32_t idx[256];
  for (int64_t r = 0; r < rows; ++r) {
    const typename L::type* p = base + r * step_n;
    for (int64_t j0 = 0; j0 < count; j0 += 256) {
      const int64_t len = std::min<int64_t>(256, count - j0);
      for (int64_t j = 0; j < len; ++j)
        idx[j] = index_in(finite_or_zero(L::get(p[j0 + j])), scale, off) +
                 static_cast<int32_t>(j & 3) * bins;
      for (int64_t j = 0; j < len; ++j) ++sub[idx[j]];
    }
  }
  for (int b = 0; b < bins; ++b)
    out.hist[b] = static_cast<int64_t>(sub[b]) + sub[bins + b] + sub[2 * bins + b] +
                  sub[3 * bins + b];
}

using PlaneFn = void (*)(const void*, int64_t, int64_t, int64_t, int, bool, Partial&, int32_t*);

#define ICPRUNE_PLANE(NAME, LOAD)                                                             \
  ICPRUNE_MULTIVERSION void NAME(const void* base, int64_t step_n, int64_t rows, int64_t count, \
                                 int bins, bool histogram, Partial& out, int32_t* sub) {      \
    plane_item<LOAD>(static_cast<const LOAD::type*>(base), step_n, rows, count, bins,         \
                     histogram, out, sub);                                                    \
  }
ICPRUNE_PLANE(plane_f16, LoadF16)
ICPRUNE_PLANE(plane_bf16, LoadBF16)
ICPRUNE_PLANE(plane_f32, LoadF32)
ICPRUNE_PLANE(plane_f64, LoadF64)

// ------------------------------------------------------------ rows (NHWC): all channels at once

// Scratch of one thread for rows_tile, all [C] except idx [tile rows * C].
struct RowsScratch {
  std::vector<double> lo, hi, sum, scale, off;
  std::vector<int32_t> idx;
  std::vector<int64_t> rebin;  // [bins]
  RowsScratch(int64_t c, int64_t rows, int bins)
      : lo(c), hi(c), sum(c), scale(c), off(c), idx(rows * c), rebin(bins) {}
};

// Widen p's range to [lo, hi], moving its counts to the new layout (scratch: [bins]); returns
// whether the layout changed.
bool widen(Partial& p, double lo, double hi, int bins, int64_t* scratch) {
  if (lo >= p.lo && hi <= p.hi) return false;
  const bool empty = !(p.lo <= p.hi);
  p.lo = std::min(p.lo, lo);
  p.hi = std::max(p.hi, hi);
  int64_t k, off;
  layout(p.lo, p.hi, bins, k, off);
  if (!empty && (k != p.k || off != p.off)) {
    std::fill(scratch, scratch + bins, 0);
    rebin_add(p.hist, p.k, p.off, scratch, k, off, bins);
    std::copy(scratch, scratch + bins, p.hist);
  }
  p.k = k;
  p.off = off;
  return true;
}

// Tile of `rows` rows; row r starts at row_ptr[r] and holds C contiguous channel values.
// state: the C running partials of this thread, whose histograms are one [C * bins] block.
template <typename L>
ICPRUNE_INLINE void rows_tile(const typename L::type* const* row_ptr, int64_t rows, int64_t c,
                              int bins, bool histogram, Partial* state, RowsScratch& w) {
  using F = typename L::F;
  F* __restrict tlo = reinterpret_cast<F*>(w.lo.data());
  F* __restrict thi = reinterpret_cast<F*>(w.hi.data());
  double* __restrict tsum = w.sum.data();
  std::fill(tlo, tlo + c, F(INFINITY));
  std::fill(thi, thi + c, F(-INFINITY));
  std::fill(tsum, tsum + c, 0.0);
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const typename L::type* __restrict p = row_ptr[r];
    for (int64_t j = 0; j < c; ++j) {
      const F raw = L::get(p[j]);
      const F v = finite_or_zero(raw);
      bad += (raw - raw) != F(0);
      tlo[j] = std::min(tlo[j], v);
      thi[j] = std::max(thi[j], v);
      tsum[j] += v;
    }
  }
  state[0].nonfinite += bad;
  // scale/off hold F values of each channel's current layout, off folding in the row j * bins.
  F* __restrict scale = reinterpret_cast<F*>(w.scale.data());
  F* __restrict off = reinterpret_cast<F*>(w.off.data());
  for (int64_t j = 0; j < c; ++j) {
    state[j].sum += tsum[j];
    if (widen(state[j], tlo[j], thi[j], bins, w.rebin.data())) {
      scale[j] = static_cast<F>(scale_of(state[j].k));
      off[j] = static_cast<F>(state[j].off);
    }
  }
  if (!histogram) return;
  int32_t* __restrict idx = w.idx.data();
  for (int64_t r = 0; r < rows; ++r) {
    const typename L::type* __restrict p = row_ptr[r];
    int32_t* __restrict out = idx + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j)
      out[j] = index_in(finite_or_zero(L::get(p[j])), scale[j], off[j]) +
               static_cast<int32_t>(j) * bins;
  }
  int64_t* hist = state[0].hist;
  for (int64_t i = 0; i < rows * c; ++i) ++hist[idx[i]];
}

using RowsFn = void (*)(const void* const*, int64_t, int64_t, int, bool, Partial*,
                        RowsScratch&);

#define ICPRUNE_ROWS(NAME, LOAD)                                                               \
  ICPRUNE_MULTIVERSION void NAME(const void* const* row_ptr, int64_t rows, int64_t c, int bins, \
                                 bool histogram, Partial* state, RowsScratch& w) {             \
    rows_tile<LOAD>(reinterpret_cast<const LOAD::type* const*>(row_ptr), rows, c, bins,        \
                    histogram, state, w);                                                      \
  }
ICPRUNE_ROWS(rows_f16, LoadF16)
ICPRUNE_ROWS(rows_bf16, LoadBF16)
ICPRUNE_ROWS(rows_f32, LoadF32)
ICPRUNE_ROWS(rows_f64, LoadF64)

size_t element_size(Dtype dtype) {
  return dtype == Dtype::kFloat64 ? 8 : dtype == Dtype::kFloat32 ? 4 : 2;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Merge the partials of channel j (a list of pointers) into the channel's own batch layout.
void finish_channel(const std::vector<const Partial*>& parts, int bins, int64_t* counts,
                    int64_t& k, int64_t& off, double& lo, double& hi, double& sum) {
  lo = INFINITY;
  hi = -INFINITY;
  sum = 0.0;
  for (const Partial* p : parts) {
    lo = std::min(lo, p->lo);
    hi = std::max(hi, p->hi);
    sum += p->sum;
  }
  layout(lo, hi, bins, k, off);
  std::fill(counts, counts + bins, 0);
  for (const Partial* p : parts) rebin_add(p->hist, p->k, p->off, counts, k, off, bins);
}

int64_t planes(const BatchView& v, int bins, int64_t* counts, int64_t* bin_exponent,
               int64_t* bin_offset, double* minimum, double* maximum, double* sums) {
  static const PlaneFn fns[] = {plane_f16, plane_bf16, plane_f32, plane_f64};
  const PlaneFn fn = fns[static_cast<int>(v.dtype)];
  const int64_t per_item = std::max<int64_t>(1, kItemValues / std::max<int64_t>(v.s, 1));
  const int64_t items_per_channel = (v.n + per_item - 1) / per_item;
  const int64_t items = v.c * items_per_channel;
  std::vector<Partial> parts(items);
  std::vector<int64_t> hists(items * bins);
  const size_t esize = element_size(v.dtype);
  const char* base = static_cast<const char*>(v.data);
  std::vector<std::vector<int32_t>> subs(max_threads(), std::vector<int32_t>(4 * bins));
  const bool parallel = v.n * v.c * v.s >= kParallelValues;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t ch = i / items_per_channel, n0 = (i % items_per_channel) * per_item;
    const int64_t rows = std::min(per_item, v.n - n0);
    parts[i].hist = hists.data() + i * bins;
    const char* start = base + (n0 * v.stride_n + ch * v.stride_c) * esize;
    fn(start, v.stride_n, rows, v.s, bins, v.histogram, parts[i], subs[thread_id()].data());
  }
  int64_t nonfinite = 0;
  for (const Partial& p : parts) nonfinite += p.nonfinite;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t ch = 0; ch < v.c; ++ch) {
    std::vector<const Partial*> mine;
    for (int64_t i = 0; i < items_per_channel; ++i) mine.push_back(&parts[ch * items_per_channel + i]);
    finish_channel(mine, bins, counts + ch * bins, bin_exponent[ch], bin_offset[ch], minimum[ch],
                   maximum[ch], sums[ch]);
  }
  return nonfinite;
}

int64_t rows(const BatchView& v, int bins, int64_t* counts, int64_t* bin_exponent,
             int64_t* bin_offset, double* minimum, double* maximum, double* sums) {
  static const RowsFn fns[] = {rows_f16, rows_bf16, rows_f32, rows_f64};
  const RowsFn fn = fns[static_cast<int>(v.dtype)];
  const int64_t c = v.c, total = v.n * v.s;
  const size_t esize = element_size(v.dtype);
  const int64_t tile = std::max<int64_t>(8, kTileBytes / static_cast<int64_t>(c * esize));
  // Fixed chunks of whole tiles, independent of the thread count, reduced in chunk order: the
  // float64 sums (and everything else) are the same bits for any number of threads.
  const int64_t tiles = (total + tile - 1) / tile;
  const int64_t tiles_per_chunk =
      std::max<int64_t>(1, kChunkValues / std::max<int64_t>(1, tile * c));
  const int64_t chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  const int64_t chunk_rows = tiles_per_chunk * tile;
  std::vector<std::vector<Partial>> state(chunks, std::vector<Partial>(c));
  std::vector<std::vector<int64_t>> hists(chunks, std::vector<int64_t>(c * bins, 0));
  const char* base = static_cast<const char*>(v.data);
  const bool parallel = chunks > 1 && total * c >= kParallelValues;
#pragma omp parallel if (parallel)
  {
    RowsScratch scratch(c, tile, bins);
    std::vector<const void*> row_ptr(tile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < chunks; ++q) {
      for (int64_t j = 0; j < c; ++j) state[q][j].hist = hists[q].data() + j * bins;
      const int64_t r_end = std::min(total, (q + 1) * chunk_rows);
      for (int64_t r0 = q * chunk_rows; r0 < r_end; r0 += tile) {
        const int64_t len = std::min(tile, r_end - r0);
        for (int64_t r = 0; r < len; ++r) {
          const int64_t n = (r0 + r) / v.s, s = (r0 + r) % v.s;
          row_ptr[r] = base + (n * v.stride_n + s * v.stride_s) * esize;
        }
        fn(row_ptr.data(), len, c, bins, v.histogram, state[q].data(), scratch);
      }
    }
  }
  int64_t nonfinite = 0;
  for (int64_t q = 0; q < chunks; ++q) nonfinite += state[q][0].nonfinite;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t ch = 0; ch < c; ++ch) {
    std::vector<const Partial*> mine;
    for (int64_t q = 0; q < chunks; ++q)
      if (state[q][ch].lo <= state[q][ch].hi) mine.push_back(&state[q][ch]);
    finish_channel(mine, bins, counts + ch * bins, bin_exponent[ch], bin_offset[ch], minimum[ch],
                   maximum[ch], sums[ch]);
  }
  return nonfinite;
}

}  // namespace

int64_t channel_stats(const BatchView& view, int bins, int64_t* counts, int64_t* bin_exponent,
                      int64_t* bin_offset, double* minimum, double* maximum, double* sums) {
  const bool contiguous_planes = view.s > 1 && view.stride_s == 1;
  if (!contiguous_planes && view.stride_c == 1) {
    return rows(view, bins, counts, bin_exponent, bin_offset, minimum, maximum, sums);
  }
  return planes(view, bins, counts, bin_exponent, bin_offset, minimum, maximum, sums);
}

}  // namespace icprune
