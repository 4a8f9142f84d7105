"""Pieces shared by the Triton kernels of icprune.kernels: bit-built powers of two, sample
addressing of a Tensor[N, C, S], and the device flags the statistics pass hands to the Gram.

Nothing here queries a GPU at import time.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: Layout of the int64 flags written by the statistics finish and read by the Gram kernels:
#: flags[0] = number of non-finite values, flags[1] = frexp exponent of max|x| + FLAG_BIAS
#: (0 when every value is 0, so that a zeroed buffer means "nothing seen").
FLAG_BIAS = 1024


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def pow2_f32(e):
    """2.0**e as float32 for int32 e in [-149, 127], built from its bits (exact, no exp2)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    sub = (1 << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


#: How a tile of consecutive samples m = n * S + s finds its elements (``row_mode``): one
#: stride for every sample (channels_last, or N == 1 / S == 1), planes at least a tile long (at
#: most one image boundary per tile), or short planes.
ROWS_UNIFORM, ROWS_LONG_PLANES, ROWS_SHORT_PLANES = 0, 1, 2


def sample_strides(x) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_s) of Tensor[N, C, S] ``x`` as the kernels take them: with
    S == 1 the sample stride is the image stride (s is always 0, so nothing else changes)."""
    stride_n, stride_c, stride_s = x.stride()
    return stride_n, stride_c, stride_n if x.shape[2] == 1 else stride_s


def row_mode(x, block: int) -> int:
    """The ``MODE`` of :func:`row_offsets` for tiles of ``block`` samples of Tensor[N, C, S]
    ``x`` (strides as :func:`sample_strides` gives them)."""
    n, _, s = x.shape
    stride_n, _, stride_s = sample_strides(x)
    if n == 1 or s == 1 or stride_n == s * stride_s:
        return ROWS_UNIFORM
    return ROWS_LONG_PLANES if s >= block else ROWS_SHORT_PLANES


@triton.jit
def row_offsets(
    m0, BLOCK: tl.constexpr, S, stride_n, stride_s, MODE: tl.constexpr, WIDE: tl.constexpr
):
    """Element offsets, at channel 0, of the BLOCK consecutive samples m0 .. m0 + BLOCK - 1
    (m = n * S + s) of Tensor[N, C, S]: int64 when WIDE, else int32.

    No division per sample (it costs ~20 instructions, more than the rest of a sample's work):
    MODE ROWS_UNIFORM: m * stride_s; ROWS_LONG_PLANES (S >= BLOCK): the tile crosses at most
    one image boundary, found by one comparison; ROWS_SHORT_PLANES (S < BLOCK): the image within
    the tile is floor((r + 0.5) / S) in float32 for r < 2 * BLOCK <= 2**14, exact because the
    quotient lies at least 0.5 / S from an integer and float32 errs by < 2**-21 relative."""
    r = tl.arange(0, BLOCK)
    if MODE == 0:
        if WIDE:
            return (m0.to(tl.int64) + r) * stride_s
        return (m0 + r) * stride_s
    n0 = m0 // S  # one division per tile
    r = r + (m0 - n0 * S)  # position from the start of image n0
    if MODE == 1:
        q = (r >= S).to(tl.int32)
    else:
        q = tl.floor((r.to(tl.float32) + 0.5) * (1.0 / S.to(tl.float32))).to(tl.int32)
    s = r - q * S
    if WIDE:
        return (n0 + q).to(tl.int64) * stride_n + s.to(tl.int64) * stride_s
    return (n0 + q) * stride_n + s * stride_s
