#include "slicing.h"

#include <cstring>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace icprune {
namespace {

void check_indices(const int64_t* idx, int64_t n, int64_t bound, const char* what) {
  for (int64_t j = 0; j < n; ++j) {
    if (idx[j] < 0 || idx[j] >= bound) {
      throw py::index_error(std::string("slice_channels: ") + what + " index " +
                            std::to_string(idx[j]) + " is outside [0, " + std::to_string(bound) +
                            ")");
    }
  }
}

// Runs of consecutive column indices: (first column, first output column, length).
struct Run {
  int64_t col, out, len;
};

std::vector<Run> runs_of(const int64_t* cols, int64_t n_cols) {
  std::vector<Run> runs;
  for (int64_t c = 0; c < n_cols; ++c) {
    if (!runs.empty() && cols[c] == runs.back().col + runs.back().len) {
      ++runs.back().len;
    } else {
      runs.push_back({cols[c], c, 1});
    }
  }
  return runs;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ICPRUNE_AVX512 1
// AVX-512 row compression for the common case: 4- or 8-byte elements, K == 1, packed columns
// and strictly increasing column indices. Each 16 (8) element chunk of a kept row is loaded
// under the chunk's kept-column mask and compressed into place: the order of columns is kept,
// so the result is exactly the scalar gather.
template <int Bytes>
__attribute__((target("avx512f"))) void compress_rows(const char* src, int64_t stride0,
                                                      const int64_t* rows, int64_t n_rows,
                                                      const std::vector<uint16_t>& masks,
                                                      int64_t n_cols, char* dst, bool parallel) {
  constexpr int lanes = 64 / Bytes;
  const int64_t n_chunks = static_cast<int64_t>(masks.size());
  const uint16_t* mask = masks.data();
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < n_rows; ++r) {
    const char* in = src + rows[r] * stride0;
    char* out = dst + r * n_cols * Bytes;
    int64_t pos = 0;
    for (int64_t j = 0; j < n_chunks; ++j) {
      const uint16_t m = mask[j];
      if (m == 0) continue;
      const char* from = in + j * lanes * Bytes;
      const int taken = __builtin_popcount(m);
      if constexpr (Bytes == 4) {
        const __m512i v = _mm512_maskz_loadu_epi32(m, from);
        if (pos + lanes <= n_cols) {  // room in this row: compress in register, store all lanes
          _mm512_storeu_si512(out + pos * Bytes, _mm512_maskz_compress_epi32(m, v));
        } else {
          _mm512_mask_compressstoreu_epi32(out + pos * Bytes, m, v);
        }
      } else {
        const __m512i v = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), from);
        if (pos + lanes <= n_cols) {
          _mm512_storeu_si512(out + pos * Bytes,
                              _mm512_maskz_compress_epi64(static_cast<__mmask8>(m), v));
        } else {
          _mm512_mask_compressstoreu_epi64(out + pos * Bytes, static_cast<__mmask8>(m), v);
        }
      }
      pos += taken;
    }
  }
}

// Kept-column bit masks, one per chunk of 64 / Bytes columns; empty if cols is not strictly
// increasing (the compression cannot reorder or repeat columns).
std::vector<uint16_t> chunk_masks(const int64_t* cols, int64_t n_cols, int64_t width, int lanes) {
  std::vector<uint16_t> masks((width + lanes - 1) / lanes, 0);
  for (int64_t c = 0; c < n_cols; ++c) {
    if (c > 0 && cols[c] <= cols[c - 1]) return {};
    masks[cols[c] / lanes] |= static_cast<uint16_t>(1u << (cols[c] % lanes));
  }
  return masks;
}
#endif

// Element type T only sets the copy width: every element is moved as raw bits. Columns are
// copied run by run: a run of consecutive kept columns is one contiguous block when the column
// stride equals the K block (the usual contiguous weight), else element block by block.
template <typename T>
void gather(const char* src, int64_t stride0, int64_t stride1, int64_t k, const int64_t* rows,
            int64_t n_rows, const int64_t* cols, int64_t n_cols, T* dst) {
  const std::vector<Run> runs = runs_of(cols, n_cols);
  const int64_t n_runs = static_cast<int64_t>(runs.size());
  const Run* run = runs.data();
  const bool packed = stride1 == k * static_cast<int64_t>(sizeof(T));
  // Threads only pay off past ~256 KiB of output.
  const bool parallel = n_rows * n_cols * k * static_cast<int64_t>(sizeof(T)) >= (int64_t{1} << 18);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < n_rows; ++r) {
    const char* row = src + rows[r] * stride0;
    T* out = dst + r * n_cols * k;
    if (packed && k == 1) {
      const T* in = reinterpret_cast<const T*>(row);  // aligned: torch storage of T elements
      for (int64_t c = 0; c < n_cols; ++c) out[c] = in[cols[c]];
    } else if (packed) {
      for (int64_t j = 0; j < n_runs; ++j) {
        std::memcpy(out + run[j].out * k, row + run[j].col * stride1,
                    sizeof(T) * k * run[j].len);
      }
    } else {
      for (int64_t c = 0; c < n_cols; ++c) {
        std::memcpy(out + c * k, row + cols[c] * stride1, sizeof(T) * k);
      }
    }
  }
}

}  // namespace

void slice_channels(const py::array& src, const Index& rows,
                    const Index& cols, py::array& dst) {
  if (src.ndim() != 3 || dst.ndim() != 3 || rows.ndim() != 1 || cols.ndim() != 1) {
    throw std::invalid_argument(
        "slice_channels: src and dst must be 3-D (O, I, K), rows and cols 1-D");
  }
  const int64_t item = src.itemsize();
  const int64_t k = src.shape(2);
  if (dst.itemsize() != item || (item != 2 && item != 4 && item != 8)) {
    throw std::invalid_argument("slice_channels: src and dst need the same 2-, 4- or 8-byte dtype");
  }
  if (k > 1 && src.strides(2) != item) {
    throw std::invalid_argument("slice_channels: the trailing dim of src must be contiguous");
  }
  const int64_t n_rows = rows.shape(0), n_cols = cols.shape(0);
  if (dst.shape(0) != n_rows || dst.shape(1) != n_cols || dst.shape(2) != k ||
      !(dst.flags() & py::array::c_style) || !dst.writeable()) {
    throw std::invalid_argument(
        "slice_channels: dst must be a writeable C-contiguous (len(rows), len(cols), K) array");
  }
  const int64_t* r = rows.data();
  const int64_t* c = cols.data();
  check_indices(r, n_rows, src.shape(0), "row");
  check_indices(c, n_cols, src.shape(1), "column");
  const char* s = static_cast<const char*>(src.data());
  void* d = dst.mutable_data();
  const int64_t stride0 = src.strides(0), stride1 = src.strides(1);
  py::gil_scoped_release release;
#ifdef ICPRUNE_AVX512
  if (k == 1 && (item == 4 || item == 8) && stride1 == item && n_cols > 0 &&
      __builtin_cpu_supports("avx512f")) {
    const int lanes = static_cast<int>(64 / item);
    const std::vector<uint16_t> masks = chunk_masks(c, n_cols, src.shape(1), lanes);
    if (!masks.empty()) {
      const bool parallel = n_rows * n_cols * item >= (int64_t{1} << 18);
      if (item == 4) {
        compress_rows<4>(s, stride0, r, n_rows, masks, n_cols, static_cast<char*>(d), parallel);
      } else {
        compress_rows<8>(s, stride0, r, n_rows, masks, n_cols, static_cast<char*>(d), parallel);
      }
      return;
    }
  }
#endif
  switch (item) {
    case 2:
      gather(s, stride0, stride1, k, r, n_rows, c, n_cols, static_cast<uint16_t*>(d));
      break;
    case 4:
      gather(s, stride0, stride1, k, r, n_rows, c, n_cols, static_cast<uint32_t*>(d));
      break;
    default:
      gather(s, stride0, stride1, k, r, n_rows, c, n_cols, static_cast<uint64_t*>(d));
  }
}

}  // namespace icprune
