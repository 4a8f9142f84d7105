"""Triton kernels for the statistics of one batch of feature maps, exact in their counts.

:func:`channel_stats` reads a Tensor[N, C, S] (any strides: contiguous and channels_last are
both read in place, no transposed copy) of float16/bfloat16/float32 and returns the
:class:`icprune.stats.backends.BatchStats` of the batch - each channel's histogram in the bin layout
of its own batch range (icprune/stats/binning.py), extremes, sums, the Gram matrix and the number of
non-finite values - as device tensors, with no host synchronisation, in five launches:

1. ``_stats_pass`` - ONE read of the input for histograms, extremes, sums and non-finite counts.
   Persistent programs: program (cb, pm) owns BLOCK_C channels and a contiguous run of sample
   tiles, and keeps one int32 histogram per channel in registers across all its tiles, in the
   layout of the range it has seen so far (:func:`icprune.stats.binning.bin_layout`, mirrored op by
   op in float64 by ``_layout``). When a tile widens the range, the running histogram is moved to
   the new, coarser layout exactly (``_relayout``: bins merge 2**d : 1 and shift, computed from a
   prefix sum, as :func:`icprune.stats.binning.rebin` does). Partials are bounded by the number of
   programs (a few per SM), not by the number of tiles: P x C x B int32.
2. ``_stats_finish`` - per (channel block, partial): the batch extremes and layout from all
   partials, the partial moved into the batch layout and added to the int64 counts with integer
   atomics (order-independent, so deterministic); sums in float64 (a fixed reduction tree).
3. the Gram matrix, two launches of :mod:`icprune.kernels.gram` (tensor cores; it reads the
   input a second time - partly from L2 where the map is small - and picks its power-of-two
   scale from the extremes this pass left on the device).

(plus one memset of the int64 outputs accumulated with atomics).

Why counts are exact: every value is a float32 (float16/bfloat16 widen exactly); its bin index
``floor(x * 2**-k) - off`` is exact in float32 (scaling by a power of two is exact; a product
that is subnormal lies in (-1, 1), whose floor depends on the sign alone; the one inexact case,
a tiny negative x whose product underflows - or is flushed - to -0, is put in bin -1 as float64
would); a layout for a larger range is coarser and aligned, so moving counts between layouts
only adds integers. Races: the interpreter runs programs one after another and cannot show
them, so by construction every output element has one writer, or is accumulated with integer
atomics (exact, order-free); the one float atomic (kernels/gram.py) adds into a partial that a
single program owns, in that program's order.

Sums: float32 per tile of values scaled by a power of two (no overflow), float64 across tiles
and partials (fixed order). Gram: see :mod:`icprune.kernels.gram` and docs/method.md.

:func:`channel_stats_ref` is the reference: :func:`icprune.stats.backends.torch_batch`, the one
float64 torch reference that ``ChannelStats(backend="torch")`` runs too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from icprune.kernels.common import (
    FLAG_BIAS,
    interpreting,
    pow2_f32,
    row_mode,
    row_offsets,
    sample_strides,
)
from icprune.kernels.gram import GRAM_PRECISIONS, gram_matrix

from icprune.stats.backends import BatchStats, torch_batch
from icprune.stats.binning import INDEX_BITS, K_MIN, LAYOUT_STEPS, MAX_SHIFT

#: Inputs the kernels read (float64 has no fast path on GPUs: use the torch backend).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest number of bins: one program's histogram lives in registers and shared memory.
MAX_BINS = 8192
#: Programs per SM for the persistent statistics pass and the Gram splits.
PROGRAMS_PER_SM = 2
#: Programs on the CPU interpreter (several, so that tests merge partials).
INTERPRETER_PROGRAMS = 4


class KernelConfig(NamedTuple):
    """Block sizes of one launch (:func:`default_config` picks them; the GPU bench sweeps them).

    Attributes:
        block_m: samples per statistics tile (power of two).
        block_c: channels per statistics program (power of two, at most 32).
        flat_histogram: one ``tl.histogram`` over ``block_c * bins`` slots per tile (cheap where
            Triton lowers it to shared-memory atomics, Triton >= 3.7), instead of one per
            channel (cheaper where it is lowered to warp ballots, whose cost grows with bins).
        stats_warps: warps per statistics program.
        block_g: channels per Gram block (>= 16, power of two).
        block_k: samples per Gram step (>= 16, power of two).
        gram_warps, gram_stages: warps and software-pipelining depth of the Gram kernel.
    """

    block_m: int
    block_c: int
    flat_histogram: bool
    stats_warps: int
    block_g: int
    block_k: int
    gram_warps: int
    gram_stages: int


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _layout(
    lo,
    hi,
    BINS: tl.constexpr,
    BIN_BITS: tl.constexpr,
    K_MIN: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    STEPS: tl.constexpr,
):
    """:func:`icprune.stats.binning.bin_layout` of float64 lo/hi (same shape), op by op in float64
    (so bit-identical): returns (k int32, off int64). lo > hi means nothing seen.

    Bit arithmetic inline (one helper call costs milliseconds on the interpreter):
    floor(log2(v)) of a positive normal float64 is its biased exponent - 1023 (frexp's
    exponent - 1), and 2.0**-k is the float64 with biased exponent 1023 - k."""
    seen = lo <= hi
    lo = tl.where(seen, lo, 0.0)
    hi = tl.where(seen, hi, 0.0)
    half_span = hi * 0.5 - lo * 0.5
    k = tl.full(lo.shape, K_MIN, tl.int32)
    wide = half_span > 0
    bits = tl.where(wide, half_span, 1.0).to(tl.int64, bitcast=True)
    k_fit = (((bits >> 52) & 0x7FF) - 1023 + 1 - BIN_BITS).to(tl.int32)
    k = tl.where(wide, tl.maximum(k, k_fit), k)
    maxabs = tl.maximum(tl.abs(lo), tl.abs(hi))
    nonzero = maxabs > 0
    bits = tl.where(nonzero, maxabs, 1.0).to(tl.int64, bitcast=True)
    k_mag = (((bits >> 52) & 0x7FF) - 1023 + 1 - INDEX_BITS).to(tl.int32)
    k = tl.where(nonzero, tl.maximum(k, k_mag), k)
    for _ in tl.static_range(STEPS):
        scale = ((1023 - k).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        # |hi|, |lo| < 2**(INDEX_BITS + 1) * 2**k here: floors and difference are exact.
        k += ((tl.floor(hi * scale) - tl.floor(lo * scale)) > BINS - 1).to(tl.int32)
    scale = ((1023 - k).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    off = tl.where(seen, tl.floor(lo * scale), 0.0).to(tl.int64)
    return k, off


@triton.jit
def _bin_index(v, scale, off, BINS: tl.constexpr):
    """Bin of float32 v in the layout (scale = 2**-k float32, off float32 exact integer):
    int32 in [0, BINS - 1]. A negative v whose product is -0 or flushed to 0 is in bin -1."""
    f = tl.floor(v * scale)
    f = tl.where((f == 0.0) & (v < 0.0), -1.0, f)
    return tl.minimum(tl.maximum(f - off, 0.0), BINS - 1.0).to(tl.int32)


@triton.jit
def _relayout(acc, k_old, off_old, k_new, off_new, BINS: tl.constexpr):
    """Histograms acc (R, BINS_P2) int32, row r in layout (k_old[r], off_old[r]), moved to
    (k_new[r], off_new[r]) exactly: requires k_new >= k_old and a new window covering every
    non-empty old bin (bin_layout of a range that contains the old one).

    New bin j takes old bins [s(j), s(j + 1)) with s(j) = clamp((off_new + j) * 2**d - off_old,
    0, BINS): a difference of the prefix sums. s is computed in float64, exact wherever the
    clamp does not bind (|values| < 2**53); d is capped at 62, which changes nothing: a nonzero
    (off_new + j) * 2**62 is beyond any window."""
    width: tl.constexpr = acc.shape[1]
    prefix = tl.cumsum(acc, axis=1)  # inclusive: prefix[:, i] = sum of acc[:, :i + 1]
    j = tl.arange(0, width)[None, :]
    d = tl.minimum(tl.maximum(k_new - k_old, 0), 62).to(tl.int64)[:, None]
    step = (tl.full(d.shape, 1, tl.int64) << d).to(tl.float64)
    base = off_new.to(tl.float64)[:, None]
    old = off_old.to(tl.float64)[:, None]
    s = tl.minimum(tl.maximum((base + j) * step - old, 0.0), BINS * 1.0).to(tl.int32)
    e = tl.minimum(tl.maximum((base + j + 1) * step - old, 0.0), BINS * 1.0).to(tl.int32)
    below_s = tl.where(s > 0, tl.gather(prefix, tl.maximum(s - 1, 0), axis=1), 0)
    below_e = tl.where(e > 0, tl.gather(prefix, tl.maximum(e - 1, 0), axis=1), 0)
    return tl.where(j < BINS, below_e - below_s, 0)


@triton.jit
def _halves(x):
    """Tensor[R, W] -> its even and odd columns, two Tensor[R, W // 2]."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def _interleave(even, odd):
    """Rows of two Tensor[W // 2, B] interleaved into Tensor[W, B] (inverse of ``_halves``)."""
    both = tl.permute(tl.join(even, odd), (0, 2, 1))  # [i, parity, b]
    return tl.reshape(both, (2 * even.shape[0], even.shape[1]))


@triton.jit
def _hist1(idx, ok, BINS_P2: tl.constexpr):
    """idx, ok Tensor[BM, 1] -> Tensor[1, BINS_P2] int32 histogram of the valid indices."""
    flat = tl.reshape(idx, (idx.shape[0],))
    h = tl.histogram(flat, BINS_P2, mask=tl.reshape(ok, (ok.shape[0],)))
    return tl.reshape(h, (1, BINS_P2))


@triton.jit
def _hist2(idx, ok, BINS_P2: tl.constexpr):
    """Per-column histograms of Tensor[BM, 2] -> Tensor[2, BINS_P2] (one tl.histogram each)."""
    i0, i1 = tl.split(idx)
    m0, m1 = tl.split(ok)
    h0 = tl.histogram(i0, BINS_P2, mask=m0)
    h1 = tl.histogram(i1, BINS_P2, mask=m1)
    return tl.permute(tl.join(h0, h1), (1, 0))


@triton.jit
def _hist4(idx, ok, BINS_P2: tl.constexpr):
    ie, io = _halves(idx)
    me, mo = _halves(ok)
    return _interleave(_hist2(ie, me, BINS_P2), _hist2(io, mo, BINS_P2))


@triton.jit
def _hist8(idx, ok, BINS_P2: tl.constexpr):
    ie, io = _halves(idx)
    me, mo = _halves(ok)
    return _interleave(_hist4(ie, me, BINS_P2), _hist4(io, mo, BINS_P2))


@triton.jit
def _hist16(idx, ok, BINS_P2: tl.constexpr):
    ie, io = _halves(idx)
    me, mo = _halves(ok)
    return _interleave(_hist8(ie, me, BINS_P2), _hist8(io, mo, BINS_P2))


@triton.jit
def _hist32(idx, ok, BINS_P2: tl.constexpr):
    ie, io = _halves(idx)
    me, mo = _halves(ok)
    return _interleave(_hist16(ie, me, BINS_P2), _hist16(io, mo, BINS_P2))


@triton.jit
def _histograms(idx, ok, BINS_P2: tl.constexpr, FLAT: tl.constexpr):
    """Per-channel histograms of a tile: idx, ok Tensor[BM, BC] -> Tensor[BC, BINS_P2] int32.

    FLAT: one histogram over BC * BINS_P2 slots (index c * BINS_P2 + bin); else one per
    channel, the columns separated by a tree of splits (register renames, at most one layout
    conversion) - see KernelConfig.flat_histogram."""
    bm: tl.constexpr = idx.shape[0]
    bc: tl.constexpr = idx.shape[1]
    if FLAT:
        flat = tl.arange(0, bc)[None, :] * BINS_P2 + idx
        h = tl.histogram(
            tl.reshape(flat, (bm * bc,)), bc * BINS_P2, mask=tl.reshape(ok, (bm * bc,))
        )
        out = tl.reshape(h, (bc, BINS_P2))
    elif bc == 1:
        out = _hist1(idx, ok, BINS_P2)
    elif bc == 2:
        out = _hist2(idx, ok, BINS_P2)
    elif bc == 4:
        out = _hist4(idx, ok, BINS_P2)
    elif bc == 8:
        out = _hist8(idx, ok, BINS_P2)
    elif bc == 16:
        out = _hist16(idx, ok, BINS_P2)
    else:
        out = _hist32(idx, ok, BINS_P2)
    return out


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_step(
    x_ptr, t, c, col, col_ok, M, S, stride_n, stride_s, lo_run, hi_run, k_run, off_run, sum_run,
    bad_run, acc, BINS: tl.constexpr, BINS_P2: tl.constexpr, BIN_BITS: tl.constexpr,
    K_MIN: tl.constexpr, INDEX_BITS: tl.constexpr, STEPS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, FLAT: tl.constexpr, ROW_MODE: tl.constexpr, WIDE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """One tile (BLOCK_M samples x BLOCK_C channels, tile index t) into a program's running
    state: extremes, layout (k, off), sums, non-finite counts and the Tensor[BLOCK_C, BINS_P2]
    histograms ``acc``, re-laid out exactly when the tile widens the range. MASKED: bounds-check
    samples and channels (the last tile / channel block only)."""
    offsets = row_offsets(t * BLOCK_M, BLOCK_M, S, stride_n, stride_s, ROW_MODE, WIDE)
    ptrs = x_ptr + offsets[:, None] + col[None, :]
    if MASKED:
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows < M)[:, None] & col_ok[None, :]
        raw = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    else:  # a constant mask: every select on it folds away
        ok = tl.full((BLOCK_M, BLOCK_C), 1, tl.int1)
        raw = tl.load(ptrs).to(tl.float32)
    finite = tl.abs(raw) < float("inf")  # False for NaN and +-inf
    v = tl.where(finite, raw, 0.0)
    bad_run += tl.sum((ok & ~finite).to(tl.int32), axis=0)
    lo_t = tl.min(tl.where(ok, v, float("inf")), axis=0)
    hi_t = tl.max(tl.where(ok, v, float("-inf")), axis=0)
    # Tile sums in float32 of values scaled by 2**-e (e: frexp exponent of the tile's
    # max|v|, so |v * 2**-e| < 1 and BLOCK_M of them cannot overflow), float64 across.
    top = tl.maximum(tl.abs(lo_t), tl.abs(hi_t))
    e = tl.where(top > 0, ((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126, 0)
    e = tl.where(col_ok, e, 0)
    part = tl.sum(v * pow2_f32(-e)[None, :], axis=0).to(tl.float64)
    sum_run += part * ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    grew = (lo_t < lo_run) | (hi_t > hi_run)
    lo_run = tl.minimum(lo_run, lo_t)
    hi_run = tl.maximum(hi_run, hi_t)
    if tl.max(grew.to(tl.int32), axis=0) > 0:  # rare after the first tiles
        k_new, off_new = _layout(
            lo_run.to(tl.float64), hi_run.to(tl.float64), BINS, BIN_BITS, K_MIN, INDEX_BITS,
            STEPS,
        )  # fmt: skip
        moved = (k_new != k_run) | (off_new != off_run)
        if tl.max(moved.to(tl.int32), axis=0) > 0:
            acc = _relayout(acc, k_run, off_run, k_new, off_new, BINS)
        k_run = k_new
        off_run = off_new
    index = _bin_index(v, pow2_f32(-k_run)[None, :], off_run.to(tl.float32)[None, :], BINS)
    acc += _histograms(index, ok, BINS_P2, FLAT)
    return lo_run, hi_run, k_run, off_run, sum_run, bad_run, acc


@triton.jit
def _stats_pass(
    x_ptr,  # (N, C, S) input, element strides stride_n, stride_c, stride_s
    hist_ptr,  # (P, C, BINS) int32 out: histogram of each sample-run program, own layout
    k_ptr,  # (P, C) int32 out: bin exponent of that layout
    off_ptr,  # (P, C) int64 out: bin offset of that layout
    lo_ptr,  # (P, C) float32 out: minimum (non-finite read as 0; +inf if no sample)
    hi_ptr,  # (P, C) float32 out: maximum (-inf if no sample)
    sum_ptr,  # (P, C) float64 out: sum (float32 per scaled tile, float64 across tiles)
    bad_ptr,  # (P, C) int32 out: non-finite values
    C,
    S,
    M,  # N * S samples per channel
    P,  # sample-run programs per channel block (grid = cdiv(C, BLOCK_C) * P)
    stride_n,
    stride_c,
    stride_s,
    BINS: tl.constexpr,
    BINS_P2: tl.constexpr,  # next power of two >= BINS
    BIN_BITS: tl.constexpr,  # (BINS - 1).bit_length()
    K_MIN: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FLAT: tl.constexpr,
    ROW_MODE: tl.constexpr,  # icprune.kernels.common.row_mode of the input and BLOCK_M
    WIDE: tl.constexpr,  # int64 element offsets (the input spans >= 2**31 elements)
):
    pid = tl.program_id(0)
    blocks = tl.cdiv(C, BLOCK_C)
    cb = pid % blocks  # neighbouring programs read neighbouring channels of the same samples
    pm = pid // blocks
    tiles = tl.cdiv(M, BLOCK_M)
    t0 = (pm.to(tl.int64) * tiles // P).to(tl.int32)
    t1 = ((pm.to(tl.int64) + 1) * tiles // P).to(tl.int32)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = c < C
    if WIDE:
        col = c.to(tl.int64) * stride_c
    else:
        col = c * stride_c
    lo_run = tl.full((BLOCK_C,), float("inf"), tl.float32)
    hi_run = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    k_run = tl.full((BLOCK_C,), K_MIN, tl.int32)
    off_run = tl.zeros((BLOCK_C,), tl.int64)
    sum_run = tl.zeros((BLOCK_C,), tl.float64)
    bad_run = tl.zeros((BLOCK_C,), tl.int32)
    acc = tl.zeros((BLOCK_C, BINS_P2), tl.int32)
    # Whole tiles skip every mask (the compiler folds them away); only the tiles past the last
    # whole one and the last channel block pay for them. (Two loops, not a branch per tile:
    # a branch merging the running state makes compilation take minutes.)
    whole = tl.where((cb + 1) * BLOCK_C <= C, tl.minimum(t1, M // BLOCK_M), t0)
    whole = tl.maximum(whole, t0)
    for t in range(t0, whole):
        lo_run, hi_run, k_run, off_run, sum_run, bad_run, acc = _tile_step(
            x_ptr, t, c, col, col_ok, M, S, stride_n, stride_s, lo_run, hi_run, k_run,
            off_run, sum_run, bad_run, acc, BINS, BINS_P2, BIN_BITS, K_MIN, INDEX_BITS, STEPS,
            BLOCK_M, BLOCK_C, FLAT, ROW_MODE, WIDE, False,
        )  # fmt: skip
    for t in range(whole, t1):
        lo_run, hi_run, k_run, off_run, sum_run, bad_run, acc = _tile_step(
            x_ptr, t, c, col, col_ok, M, S, stride_n, stride_s, lo_run, hi_run, k_run,
            off_run, sum_run, bad_run, acc, BINS, BINS_P2, BIN_BITS, K_MIN, INDEX_BITS, STEPS,
            BLOCK_M, BLOCK_C, FLAT, ROW_MODE, WIDE, True,
        )  # fmt: skip
    row = pm.to(tl.int64) * C + c
    b = tl.arange(0, BINS_P2)
    tl.store(hist_ptr + row[:, None] * BINS + b[None, :], acc, mask=col_ok[:, None] & (b < BINS))
    tl.store(k_ptr + row, k_run, mask=col_ok)
    tl.store(off_ptr + row, off_run, mask=col_ok)
    tl.store(lo_ptr + row, lo_run, mask=col_ok)
    tl.store(hi_ptr + row, hi_run, mask=col_ok)
    tl.store(sum_ptr + row, sum_run, mask=col_ok)
    tl.store(bad_ptr + row, bad_run, mask=col_ok)


@triton.jit
def _stats_finish(
    hist_ptr,  # (P, C, BINS) int32: _stats_pass partials, each in its own layout
    k_ptr,  # (P, C) int32
    off_ptr,  # (P, C) int64
    lo_ptr,  # (P, C) float32
    hi_ptr,  # (P, C) float32
    sum_ptr,  # (P, C) float64
    bad_ptr,  # (P, C) int32
    counts_ptr,  # (C, BINS) int64 out, zeroed: batch histograms (integer atomics)
    exp_ptr,  # (C,) int64 out: batch bin exponent
    boff_ptr,  # (C,) int64 out: batch bin offset
    min_ptr,  # (C,) float64 out
    max_ptr,  # (C,) float64 out
    sums_ptr,  # (C,) float64 out
    flags_ptr,  # (2,) int64, zeroed: [0] non-finite total (atomic add), [1] frexp exponent of
    #            max|x| + FLAG_BIAS (atomic max; 0: all zero) for the Gram scale
    C,
    P,
    BINS: tl.constexpr,
    BINS_P2: tl.constexpr,
    BIN_BITS: tl.constexpr,
    K_MIN: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    STEPS: tl.constexpr,
    P_P2: tl.constexpr,  # next power of two >= P
    BLOCK_F: tl.constexpr,
    FLAG_BIAS: tl.constexpr,
):
    fb = tl.program_id(0)  # channel block
    p = tl.program_id(1)  # the partial this program moves into the batch layout
    c = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = c < C
    parts = tl.arange(0, P_P2)
    both = (parts < P)[:, None] & col_ok[None, :]
    grid = parts.to(tl.int64)[:, None] * C + c[None, :]
    lo = tl.min(tl.load(lo_ptr + grid, mask=both, other=float("inf")), axis=0)
    hi = tl.max(tl.load(hi_ptr + grid, mask=both, other=float("-inf")), axis=0)
    k, off = _layout(lo.to(tl.float64), hi.to(tl.float64), BINS, BIN_BITS, K_MIN, INDEX_BITS, STEPS)
    row = p.to(tl.int64) * C + c
    b = tl.arange(0, BINS_P2)
    in_bins = col_ok[:, None] & (b < BINS)[None, :]
    part = tl.load(hist_ptr + row[:, None] * BINS + b[None, :], mask=in_bins, other=0)
    k_p = tl.load(k_ptr + row, mask=col_ok, other=K_MIN)
    off_p = tl.load(off_ptr + row, mask=col_ok, other=0)
    moved = _relayout(part, k_p, off_p, k, off, BINS).to(tl.int64)
    out = c.to(tl.int64)[:, None] * BINS + b[None, :]
    tl.atomic_add(counts_ptr + out, moved, mask=in_bins & (moved != 0), sem="relaxed")
    if p == 0:  # one writer per channel for everything that is not a count
        tl.store(exp_ptr + c, k.to(tl.int64), mask=col_ok)
        tl.store(boff_ptr + c, off, mask=col_ok)
        tl.store(min_ptr + c, lo.to(tl.float64), mask=col_ok)
        tl.store(max_ptr + c, hi.to(tl.float64), mask=col_ok)
        total = tl.sum(tl.load(sum_ptr + grid, mask=both, other=0.0), axis=0)
        tl.store(sums_ptr + c, total, mask=col_ok)
        bad = tl.sum(tl.load(bad_ptr + grid, mask=both, other=0).to(tl.int64))
        tl.atomic_add(flags_ptr, bad, sem="relaxed")
        maxabs = tl.max(tl.where(col_ok, tl.maximum(tl.abs(lo), tl.abs(hi)), 0.0), axis=0)
        if maxabs > 0:  # frexp exponent (float32 bits; subnormals count as 2**-126)
            e = ((maxabs.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
            tl.atomic_max(flags_ptr + 1, (e + FLAG_BIAS).to(tl.int64), sem="relaxed")


# ----------------------------------------------------------------------------- launcher


@functools.cache
def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def _sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index`` (a cached property query, not a device sync)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_for(x: torch.Tensor) -> int:
    """Number of persistent programs a launch targets on ``x``'s device."""
    if x.device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _sm_count(x.device.index or 0)


def default_config(x: torch.Tensor, bins: int) -> KernelConfig:
    """Block sizes for Tensor[N, C, S] ``x`` and ``bins`` (first choices, to be confirmed by
    ``bench/gpu_kernels.py --sweep`` on a GPU).

    Where Triton lowers ``tl.histogram`` to shared-memory atomics (>= 3.7), one flat histogram
    per tile of ~4096 values; where it lowers to warp ballots (3.6, whose cost grows with the
    slots), one histogram per channel over tiles of ~2048 values. channels_last (channel
    stride 1): 16 channels per program with atomics, 8 with ballots (32-64 contiguous bytes
    per sample; 32 channels spill registers on sm_90); NCHW: 4 channels per program, runs
    along the samples. A program's histograms stay within 4096 slots. The Gram uses
    64-channel blocks for C <= 64, else 128, and 32-sample steps (64 spill with 3.6).
    bench/gpu_sass.py checks these for spills; bench/gpu.sh times alternatives."""
    c = x.shape[1]
    flat = _triton_version() >= (3, 7)
    if x.stride(1) == 1 and c > 1:  # channels last
        block_c = 16 if flat else 8
    else:
        block_c = 4
    bins_p2 = triton.next_power_of_2(bins)
    block_c = max(1, min(block_c, triton.next_power_of_2(c), 4096 // bins_p2))
    block_m = max(16, (4096 if flat else 2048) // block_c)
    block_g = 64 if c <= 64 else 128
    block_k = 32
    return KernelConfig(
        block_m=block_m,
        block_c=block_c,
        flat_histogram=flat,
        stats_warps=4,
        block_g=block_g,
        block_k=block_k,
        gram_warps=4 if block_g == 64 else 8,
        gram_stages=3,
    )


def _check_config(cfg: KernelConfig, bins: int) -> None:
    def pow2(v: int) -> bool:
        return isinstance(v, int) and v >= 1 and v & (v - 1) == 0

    if not (pow2(cfg.block_m) and cfg.block_m <= 8192 and pow2(cfg.block_c) and cfg.block_c <= 32):
        raise ValueError(
            f"channel_stats: block_m and block_c must be powers of two, block_m <= 8192 and "
            f"block_c <= 32; got {cfg}"
        )
    if cfg.block_c * triton.next_power_of_2(bins) > 2 * MAX_BINS:
        raise ValueError(
            f"channel_stats: block_c * bins = {cfg.block_c} * {bins} histogram slots per program "
            f"exceed {2 * MAX_BINS}; use a smaller block_c"
        )
    if not (pow2(cfg.block_g) and cfg.block_g >= 16 and pow2(cfg.block_k) and cfg.block_k >= 16):
        raise ValueError(
            f"channel_stats: block_g and block_k must be powers of two >= 16 (tl.dot), got {cfg}"
        )


def channel_stats(
    x: torch.Tensor,
    bins: int,
    gram: bool = True,
    *,
    gram_precision: str = "3xtf32",
    programs: int | None = None,
    config: KernelConfig | None = None,
) -> BatchStats:
    """Statistics of one batch, computed on ``x``'s device by the Triton kernels.

    Args:
        x: Tensor[N, C, S] of float16, bfloat16 or float32 (S = prod(spatial); any strides, so
            channels_last feature maps are read in place), on a CUDA device - or on the CPU under
            ``TRITON_INTERPRET=1``.
        bins: number of histogram bins B, 2 <= B <= MAX_BINS.
        gram: compute the Gram matrix (False: ``gram`` is None; the one-read statistics pass
            alone, e.g. for benchmarking it).
        gram_precision: Gram products of float32 input, one of GRAM_PRECISIONS (16-bit input
            always uses its exact native products); see the module docstring.
        programs: persistent programs to aim for (default: PROGRAMS_PER_SM per SM, or
            INTERPRETER_PROGRAMS on the CPU); results depend on it only in float rounding.
        config: block sizes (default :func:`default_config`).

    Returns:
        :class:`icprune.stats.backends.BatchStats` on ``x.device``: counts Tensor[C, B] int64 in
        each channel's own batch layout, bin_exponent and bin_offset Tensor[C] int64, minimum,
        maximum and sums Tensor[C] float64, gram Tensor[C, C] float64 (or None), nonfinite a 0-d
        int64 tensor. Nothing is read back to the host; non-finite values are read as 0 everywhere.

    Raises:
        ValueError: wrong rank, dtype, device, bins, precision, programs or config, an empty
            batch, or sizes the kernels cannot index (checked before any launch).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"channel_stats: expected a Tensor[N, C, S], got {shape}")
    if x.dtype not in DTYPES:
        raise ValueError(
            f"channel_stats: dtype {x.dtype} is not supported by the Triton kernels "
            f"(supported: {DTYPES}); use ChannelStats(backend='torch') for float64"
        )
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"channel_stats: x is on {x.device}; the kernels run on CUDA tensors, or on CPU "
            f"tensors when TRITON_INTERPRET=1 is set before Triton is imported"
        )
    if not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise ValueError(f"channel_stats: bins must be an int in [2, {MAX_BINS}], got {bins!r}")
    if gram_precision not in GRAM_PRECISIONS:
        raise ValueError(
            f"channel_stats: gram_precision must be one of {GRAM_PRECISIONS}, got "
            f"{gram_precision!r}"
        )
    n, c, s = x.shape
    m = n * s
    if m == 0 or c == 0:
        raise ValueError(f"channel_stats: empty batch of shape {tuple(x.shape)}")
    if c * bins >= 2**31 or m >= 2**31 or c >= 2**24:
        raise ValueError(
            f"channel_stats: C * bins and N * S must stay below 2**31 and C below 2**24, got "
            f"C = {c}, bins = {bins}, N * S = {m}"
        )
    target = programs_for(x) if programs is None else programs
    if not isinstance(target, int) or target < 1:
        raise ValueError(f"channel_stats: programs must be an int >= 1, got {programs!r}")
    cfg = default_config(x, bins) if config is None else config
    _check_config(cfg, bins)
    span = 1 + sum((d - 1) * st for d, st in zip(x.shape, x.stride(), strict=True))
    wide = span >= 2**31
    consts = {
        "BINS": bins,
        "BIN_BITS": (bins - 1).bit_length(),
        "K_MIN": K_MIN,
        "INDEX_BITS": INDEX_BITS,
        "STEPS": LAYOUT_STEPS,
    }
    bins_p2 = triton.next_power_of_2(bins)
    dev = x.device
    # Statistics pass: blocks x runs programs, each run at least one tile.
    blocks = triton.cdiv(c, cfg.block_c)
    runs = max(1, min(triton.cdiv(target, blocks), triton.cdiv(m, cfg.block_m)))
    part = {"device": dev}
    p_hist = torch.empty(runs, c, bins, dtype=torch.int32, **part)
    p_k = torch.empty(runs, c, dtype=torch.int32, **part)
    p_off = torch.empty(runs, c, dtype=torch.int64, **part)
    p_lo = torch.empty(runs, c, dtype=torch.float32, **part)
    p_hi = torch.empty(runs, c, dtype=torch.float32, **part)
    p_sum = torch.empty(runs, c, dtype=torch.float64, **part)
    p_bad = torch.empty(runs, c, dtype=torch.int32, **part)
    _stats_pass[(blocks * runs,)](
        x, p_hist, p_k, p_off, p_lo, p_hi, p_sum, p_bad, c, s, m, runs, *sample_strides(x),
        BINS_P2=bins_p2, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, FLAT=cfg.flat_histogram,
        ROW_MODE=row_mode(x, cfg.block_m), WIDE=wide,
        num_warps=cfg.stats_warps, **consts,
    )  # fmt: skip
    # Integer outputs accumulated with atomics live in one zeroed buffer: one memset.
    ints = torch.zeros(c * bins + 2, dtype=torch.int64, **part)
    counts, flags = ints[: c * bins].view(c, bins), ints[c * bins :]
    exponent = torch.empty(c, dtype=torch.int64, **part)
    offset = torch.empty(c, dtype=torch.int64, **part)
    lo, hi, sums = (torch.empty(c, dtype=torch.float64, **part) for _ in "123")
    widest = 16 if dev.type == "cuda" else 64  # fewer, wider programs on the interpreter
    block_f = max(1, min(widest, triton.next_power_of_2(c), 4096 // bins_p2))
    _stats_finish[(triton.cdiv(c, block_f), runs)](
        p_hist, p_k, p_off, p_lo, p_hi, p_sum, p_bad, counts, exponent, offset, lo, hi, sums,
        flags, c, runs, BINS_P2=bins_p2, P_P2=triton.next_power_of_2(runs), BLOCK_F=block_f,
        FLAG_BIAS=FLAG_BIAS, num_warps=4, **consts,
    )  # fmt: skip
    g = None
    if gram:
        g = gram_matrix(
            x, flags, gram_precision, programs=target, block_g=cfg.block_g,
            block_k=cfg.block_k, warps=cfg.gram_warps, stages=cfg.gram_stages,
        )  # fmt: skip
    return BatchStats(
        counts=counts, bin_exponent=exponent, bin_offset=offset, minimum=lo, maximum=hi,
        sums=sums, gram=g, nonfinite=flags[0],
    )  # fmt: skip


def channel_stats_ref(x: torch.Tensor, bins: int) -> BatchStats:
    """THE reference for :func:`channel_stats`: :func:`icprune.stats.backends.torch_batch` (the
    float64 torch statistics ``ChannelStats(backend="torch")`` adds too) of Tensor[N, C, S]
    ``x``, with ``nonfinite`` as a 0-d int64 tensor on ``x.device`` like the kernels'. Its counts
    and layouts equal :func:`bin_layout` binning of the float64 samples; the fast path must
    match it exactly there, and within the documented tolerance in sums and Gram."""
    if x.dim() != 3:
        raise ValueError(f"channel_stats_ref: expected a Tensor[N, C, S], got {tuple(x.shape)}")
    ref = torch_batch(x, bins)
    return ref._replace(nonfinite=torch.tensor(ref.nonfinite, dtype=torch.int64, device=x.device))


#: The launchable kernels of this module by name, for tools that compile them on their own
#: (bench/gpu_sass.py reads their SASS for register spills).
JIT_KERNELS = {"stats_pass": _stats_pass, "stats_finish": _stats_finish}


def _check_constants() -> None:
    """The kernels' float32/float64 arithmetic assumes these binning constants."""
    if not (-126 <= K_MIN and INDEX_BITS + 2 <= 52 and MAX_SHIFT == 62):
        raise ImportError(
            f"icprune.kernels.channel_stats assumes K_MIN >= -126, INDEX_BITS <= 50 and "
            f"MAX_SHIFT == 62 (got {K_MIN}, {INDEX_BITS}, {MAX_SHIFT}); update the kernels with "
            f"icprune/stats/binning.py"
        )


_check_constants()
