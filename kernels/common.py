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


@triton.jit
def row_offsets(rows, S, stride_n, stride_s, WIDE: tl.constexpr):
    """Element offsets of samples ``rows`` (m = n * S + s, int32) of Tensor[N, C, S] at
    channel 0; int64 when WIDE (the tensor spans >= 2**31 elements), else int32."""
    n = rows // S
    s = rows - n * S
    if WIDE:
        return n.to(tl.int64) * stride_n + s.to(tl.int64) * stride_s
    return n * stride_n + s * stride_s
