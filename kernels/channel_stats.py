"""Triton kernels for the statistics of one batch of feature maps, exact in their counts.

:func:`channel_stats` reads a Tensor[N, C, S] (any strides: contiguous and channels_last are
both read in place, no transposed copy) of float16/bfloat16/float32 and returns the same
:class:`icprune.backends.BatchStats` fields as the C++ path: each channel's histogram in the bin
layout of its own batch range (icprune/binning.py), extremes, sums, the Gram matrix and the
number of non-finite values - all as device tensors, with no host synchronisation.

How counts stay exact: ``_tile_stats`` gives every (BLOCK_M samples x BLOCK_C channels) tile its
own layout - the smallest power-of-two layout that fits the tile's range, computed in-kernel with
integer bit arithmetic - and bins it there with integer counts. A layout for a larger range is
coarser and aligned, so ``_finish`` moves the tile histograms into the batch layout exactly
(:func:`icprune.binning.rebin`). Every value is a float32 (float16/bfloat16 widen exactly) and a
bin index ``floor(x * 2**-k) - off`` is exact in float32 (scaling by a power of two is exact; an
underflow only matters for a tiny negative x rounding to -0, whose bin is -1 - handled).

Precision: tile sums in float32 (BLOCK_M values), added in float64 across tiles. The Gram matrix
``A @ A.T`` is ``tl.dot`` with ``input_precision="ieee"`` (full float32 products; "tf32" would be
several times faster on tensor cores but keeps only 10 mantissa bits), float32 accumulation over
one split of at most ``GRAM_SPLIT_M`` samples, float64 across splits; data are scaled by a power
of two first when their magnitude is far from 1, so float32 neither overflows nor underflows.
Upper-triangular blocks only; the launcher mirrors the upper triangle entry by entry, so the
result is exactly symmetric (a diagonal block's ``tl.dot`` need not be).

:func:`channel_stats_ref` is the same computation in plain torch (float64), for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from icprune.backends import mirror_upper
from icprune.binning import INDEX_BITS, K_MIN, bin_layout, rebin

#: Samples per histogram tile, channels per tile.
BLOCK_M = 256
BLOCK_C = 16
#: Gram: channel block, samples per tl.dot step, samples per split (float32 accumulation).
GRAM_BLOCK_C = 32
GRAM_BLOCK_K = 32
GRAM_SPLIT_M = 8192
#: Inputs the kernels read (float64 has no fast path on GPUs: use the torch backend).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _pow2(e):
    """2.0**e as float32 for int32 e in [-149, 127], built from its bits (exact, no exp2)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    sub = (1 << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


@triton.jit
def _floor_log2(v):
    """floor(log2(v)) of positive float32 v as int32 (subnormals give -127: below K_MIN)."""
    return ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _bin(v, scale):
    """floor(v * scale) as float32, exact for power-of-two scale (a tiny negative v whose
    product underflows to -0 is in bin -1)."""
    t = v * scale
    return tl.floor(t) - tl.where((t == 0.0) & (v < 0.0), 1.0, 0.0)


@triton.jit
def _tile_stats(
    x_ptr,  # (N, C, S) input, element strides stride_n, stride_c, stride_s
    counts_ptr,  # (T, C, BINS) int32 out: histogram of each tile in its own layout
    k_ptr,  # (T, C) int32 out: bin exponent of each tile's layout
    off_ptr,  # (T, C) float32 out: bin offset (an integer value, exact) of each tile's layout
    lo_ptr,  # (T, C) float32 out: tile minimum (non-finite read as 0)
    hi_ptr,  # (T, C) float32 out: tile maximum
    sum_ptr,  # (T, C) float32 out: tile sum
    bad_ptr,  # (T, C) int32 out: non-finite values in the tile
    C,
    S,
    M,
    stride_n,
    stride_c,
    stride_s,
    BINS: tl.constexpr,
    BINS_P2: tl.constexpr,  # next power of two >= BINS
    BIN_BITS: tl.constexpr,  # (BINS - 1).bit_length()
    K_MIN: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    cb = tl.program_id(1)
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = m < M
    col_ok = c < C
    ok = row_ok[:, None] & col_ok[None, :]
    n = (m // S).to(tl.int64)
    s = (m % S).to(tl.int64)
    ptrs = x_ptr + (n * stride_n + s * stride_s)[:, None] + c.to(tl.int64)[None, :] * stride_c
    raw = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    finite = tl.abs(raw) < float("inf")  # False for NaN and +-inf
    v = tl.where(finite, raw, 0.0)
    bad = tl.sum((ok & ~finite).to(tl.int32), axis=0)
    lo = tl.min(tl.where(ok, v, float("inf")), axis=0)
    hi = tl.max(tl.where(ok, v, float("-inf")), axis=0)
    total = tl.sum(v, axis=0)
    lo = tl.where(col_ok, lo, 0.0)
    hi = tl.where(col_ok, hi, 0.0)
    # Smallest fitting layout (icprune.binning.bin_layout): a lower bound, then fixed steps up.
    half_span = hi * 0.5 - lo * 0.5
    k = tl.full((BLOCK_C,), K_MIN, tl.int32)
    k_fit = _floor_log2(tl.where(half_span > 0, half_span, 1.0)) - BIN_BITS  # one below: rounding
    k = tl.where(half_span > 0, tl.maximum(k, k_fit), k)
    maxabs = tl.maximum(tl.abs(lo), tl.abs(hi))
    k_mag = _floor_log2(tl.where(maxabs > 0, maxabs, 1.0)) + 1 - INDEX_BITS
    k = tl.where(maxabs > 0, tl.maximum(k, k_mag), k)
    for _ in tl.static_range(4):
        scale = _pow2(-k)
        k += ((_bin(hi, scale) - _bin(lo, scale)) > BINS - 1).to(tl.int32)
    scale = _pow2(-k)
    off = _bin(lo, scale)
    index = _bin(v, scale[None, :]) - off[None, :]
    index = tl.minimum(tl.maximum(index, 0.0), BINS - 1.0).to(tl.int32)
    flat = tl.arange(0, BLOCK_C)[None, :] * BINS_P2 + index
    hist = tl.histogram(
        tl.reshape(flat, (BLOCK_M * BLOCK_C,)),
        BLOCK_C * BINS_P2,
        mask=tl.reshape(ok, (BLOCK_M * BLOCK_C,)),
    )
    slot = tl.arange(0, BLOCK_C * BINS_P2)
    hc = cb * BLOCK_C + slot // BINS_P2
    hb = slot % BINS_P2
    out = (tile.to(tl.int64) * C + hc) * BINS + hb
    tl.store(counts_ptr + out, hist, mask=(hc < C) & (hb < BINS))
    row = tile.to(tl.int64) * C + c
    tl.store(k_ptr + row, k, mask=col_ok)
    tl.store(off_ptr + row, off, mask=col_ok)
    tl.store(lo_ptr + row, lo, mask=col_ok)
    tl.store(hi_ptr + row, hi, mask=col_ok)
    tl.store(sum_ptr + row, total, mask=col_ok)
    tl.store(bad_ptr + row, bad, mask=col_ok)


@triton.jit
def _gram(
    x_ptr,  # (N, C, S) input, element strides stride_n, stride_c, stride_s
    pairs_ptr,  # (P, 2) int32: channel blocks (bi, bj), bi <= bj, of each program
    scale_ptr,  # (1,) float32: power-of-two factor applied to every value
    out_ptr,  # (SPLITS, C, C) float32 out: partial A @ A.T per split (upper blocks only)
    C,
    S,
    M,
    stride_n,
    stride_c,
    stride_s,
    SPLIT_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    bi = tl.load(pairs_ptr + 2 * tl.program_id(0))
    bj = tl.load(pairs_ptr + 2 * tl.program_id(0) + 1)
    split = tl.program_id(1)
    ci = bi * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = bj * BLOCK_C + tl.arange(0, BLOCK_C)
    scale = tl.load(scale_ptr)
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for k0 in range(split * SPLIT_M, tl.minimum((split + 1) * SPLIT_M, M), BLOCK_K):
        m = k0 + tl.arange(0, BLOCK_K)
        base = ((m // S).to(tl.int64) * stride_n + (m % S).to(tl.int64) * stride_s)[:, None]
        row_ok = (m < M)[:, None]
        a = tl.load(
            x_ptr + base + ci.to(tl.int64)[None, :] * stride_c,
            mask=row_ok & (ci < C)[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            x_ptr + base + cj.to(tl.int64)[None, :] * stride_c,
            mask=row_ok & (cj < C)[None, :],
            other=0.0,
        ).to(tl.float32)
        a = tl.where(tl.abs(a) < float("inf"), a, 0.0) * scale
        b = tl.where(tl.abs(b) < float("inf"), b, 0.0) * scale
        acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
    out = out_ptr + (split.to(tl.int64) * C + ci.to(tl.int64)[:, None]) * C + cj[None, :]
    tl.store(out, acc, mask=(ci < C)[:, None] & (cj < C)[None, :])


def channel_stats(x: torch.Tensor, bins: int, gram: bool = True):
    """Statistics of one batch, computed on ``x``'s device by the Triton kernels.

    Args:
        x: Tensor[N, C, S] of float16, bfloat16 or float32 (S = prod(spatial); any strides, so
            channels_last feature maps are read in place), on a CUDA device - or on the CPU under
            ``TRITON_INTERPRET=1``.
        bins: number of histogram bins B (>= 2).
        gram: compute the Gram matrix (False: ``gram`` is None; for benchmarking the one-pass
            histogram kernel alone).

    Returns:
        (counts Tensor[C, B] int64 in each channel's own batch layout, exponent Tensor[C] int64,
        offset Tensor[C] int64, minimum Tensor[C] float64, maximum Tensor[C] float64, sums
        Tensor[C] float64, gram Tensor[C, C] float64, nonfinite 0-d int64 tensor), the fields of
        :class:`icprune.backends.BatchStats`, all on ``x.device``; nothing is read back to the
        host. Non-finite values are read as 0 everywhere.

    Raises:
        ValueError: wrong rank, dtype, bins, or an empty batch.
    """
    if x.dim() != 3:
        raise ValueError(f"channel_stats: expected a Tensor[N, C, S], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(
            f"channel_stats: dtype {x.dtype} is not supported by the Triton kernels "
            f"(supported: {DTYPES}); use ChannelStats(backend='torch') for float64"
        )
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"channel_stats: bins must be an int >= 2, got {bins!r}")
    n, c, s = x.shape
    m = n * s
    if m == 0 or c == 0:
        raise ValueError(f"channel_stats: empty batch of shape {tuple(x.shape)}")
    if c * bins >= 2**31 or m >= 2**31:
        raise ValueError(f"channel_stats: C * bins and N * S must stay below 2**31, got {c}, {m}")
    dev = x.device
    tiles = triton.cdiv(m, BLOCK_M)
    part = {"device": dev}
    t_counts = torch.empty(tiles, c, bins, dtype=torch.int32, **part)
    t_k = torch.empty(tiles, c, dtype=torch.int32, **part)
    t_off, t_lo, t_hi, t_sum = (torch.empty(tiles, c, dtype=torch.float32, **part) for _ in "1234")
    t_bad = torch.empty(tiles, c, dtype=torch.int32, **part)
    bins_p2 = triton.next_power_of_2(bins)
    _tile_stats[(tiles, triton.cdiv(c, BLOCK_C))](
        x, t_counts, t_k, t_off, t_lo, t_hi, t_sum, t_bad, c, s, m, *x.stride(),
        BINS=bins, BINS_P2=bins_p2, BIN_BITS=(bins - 1).bit_length(), K_MIN=K_MIN,
        INDEX_BITS=INDEX_BITS, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    lo = t_lo.amin(0).double()
    hi = t_hi.amax(0).double()
    k, off = bin_layout(lo, hi, bins)
    counts = rebin(
        t_counts.view(tiles * c, bins).long(),
        t_k.view(-1).long(),
        t_off.view(-1).long(),
        k.repeat(tiles),
        off.repeat(tiles),
    )
    counts = counts.view(tiles, c, bins).sum(0)
    sums = t_sum.double().sum(0)
    nonfinite = t_bad.sum(dtype=torch.int64)
    maxabs = torch.maximum(lo.abs().max(), hi.abs().max())
    gram = _gram_matrix(x, maxabs) if gram else None
    return counts, k, off, lo, hi, sums, gram, nonfinite


def _gram_matrix(x: torch.Tensor, maxabs: torch.Tensor) -> torch.Tensor:
    """Tensor[C, C] float64 ``A @ A.T`` of Tensor[N, C, S] ``x`` by ``_gram``; ``maxabs`` (0-d
    float64 device tensor) picks the power-of-two scale, on the device."""
    n, c, s = x.shape
    m = n * s
    exponent = torch.frexp(maxabs).exponent.to(torch.float64)
    far = (maxabs > 0) & ((maxabs > 2.0**40) | (maxabs < 2.0**-40))
    exponent = torch.where(far, exponent, torch.zeros_like(exponent))
    scale = torch.ldexp(torch.ones(1, dtype=torch.float32, device=x.device), -exponent.float())
    splits = triton.cdiv(m, GRAM_SPLIT_M)
    block_c = GRAM_BLOCK_C if c <= 256 else 2 * GRAM_BLOCK_C
    blocks = triton.cdiv(c, block_c)
    # Symmetric: one program per block pair bi <= bj; the lower blocks are mirrored below.
    pairs = torch.triu_indices(blocks, blocks).T.to(device=x.device, dtype=torch.int32)
    part = torch.zeros(splits, c, c, dtype=torch.float32, device=x.device)
    _gram[(pairs.shape[0], splits)](
        x, pairs.contiguous(), scale, part, c, s, m, *x.stride(),
        SPLIT_M=GRAM_SPLIT_M, BLOCK_C=block_c, BLOCK_K=GRAM_BLOCK_K,
    )  # fmt: skip
    upper = part.double().sum(0)
    # Blocks below the diagonal were not computed, and a diagonal block's tl.dot need not be
    # bit-symmetric: mirror the upper triangle, entry by entry.
    return mirror_upper(torch.ldexp(upper, 2.0 * exponent))


def channel_stats_ref(x: torch.Tensor, bins: int):
    """What :func:`channel_stats` computes, in plain float64 torch (same arguments and return
    values; ``nonfinite`` as a 0-d int64 tensor)."""
    samples = x.double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, M)
    finite = torch.isfinite(samples)
    samples = torch.where(finite, samples, torch.zeros_like(samples))
    lo, hi = samples.amin(1), samples.amax(1)
    k, off = bin_layout(lo, hi, bins)
    index = torch.floor(torch.ldexp(samples, -k[:, None].double())).long() - off[:, None]
    counts = torch.zeros(x.shape[1], bins, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    gram = mirror_upper(samples @ samples.T)
    nonfinite = (~finite).sum(dtype=torch.int64)
    return counts, k, off, lo, hi, samples.sum(1), gram, nonfinite
