// Gram matrices kept as one packed triangle in double-double: the exact, split-independent
// totals of icprune.ChannelStats (icprune/stats/channel_stats.py), half the memory of full
// matrices.
//
// Packed layout: the lower triangle, row by row - entry (j, i), i <= j, at j * (j + 1) / 2 + i
// (the order of torch.tril_indices). A Gram matrix is symmetric, so this is all of it.
#pragma once

#include <cstdint>

namespace icprune {

// Entries of a packed triangle of a C x C matrix.
inline int64_t packed_size(int64_t c) { return c * (c + 1) / 2; }

// (hi, lo) += g * 2^two_e over the lower triangle, compensated exactly as compensated_add (the
// same IEEE operations, so the same bits as icprune.stats.compensated.add_ on the packed
// entries). g: entry (j, i), i <= j, read at g[j * row_stride + i * col_stride] (elements), so
// the upper triangle of a column-major BLAS syrk result is read with row_stride = C,
// col_stride = 1; the other triangle is never read, whatever the BLAS left there. hi, lo:
// double[packed_size(c)]. Deterministic for any thread count (entries are independent).
void gram_add_packed_f32(const float* g, int64_t c, int64_t row_stride, int64_t col_stride,
                         int two_e, double* hi, double* lo);
void gram_add_packed_f64(const double* g, int64_t c, int64_t row_stride, int64_t col_stride,
                         int two_e, double* hi, double* lo);

// out[j][i] = out[i][j] = packed entry (j, i): the full symmetric C x C row-major matrix.
void gram_unpack(const double* packed, int64_t c, double* out);

// out[j][i] = max((G_jj + G_ii) - 2 G_ji, 0), 0 on the diagonal: the squared distance matrix of
// ChannelStats.distance() from the packed Gram (the same IEEE operations in the same order as
// its torch code, so the same bits), row-major C x C. The square root is left to torch: its
// vectorised sqrt is not always correctly rounded, and scores must keep their bits.
void gram_squared_distance(const double* packed, int64_t c, double* out);

}  // namespace icprune
