"""``A @ A.T`` of one batch on tensor cores: the Gram kernel of :mod:`icprune.kernels`.

:func:`gram_matrix` computes the C x C Gram matrix of the C x (N*S) samples of a Tensor[N, C, S]
(any strides, read in place) in two launches, with no host synchronisation:

1. ``_gram`` - output-stationary split-K GEMM over the upper block pairs (bi <= bj) only: the
   program of (pair, split) streams its split's samples through ``tl.dot`` (wgmma on Hopper),
   accumulating float32 over at most GRAM_CHUNK samples, then adding that chunk into its own
   float32 partial with one round-to-nearest addition per entry. Programs of one split are
   consecutive, so they run together and read the split's samples from L2 rather than HBM.
   Splits are sized so that about as many programs run as the device holds: partials are
   bounded by programs, not by samples.
2. ``_gram_finish`` - the splits of each block added in float64 in a fixed order (a fixed
   reduction tree: deterministic), the power-of-two scale undone, the lower blocks mirrored;
   every output entry has exactly one writer, so the matrix is exactly symmetric.

Precision (measured in bench/gram_precision.py, documented in docs/method.md): float16 and
bfloat16 products are exact on the tensor cores; float32 input uses "3xtf32" by default - each
value split into TF32 ``hi + lo`` (rounded to nearest in-kernel, so the interpreter computes the
same products as the tensor cores) and ``lo*hi + hi*lo + hi*hi`` accumulated, about float32
accuracy at 3x the TF32 work - or "tf32" (one product, <= 2**-10 relative), or "ieee" (SIMT
FMA, slow). Data whose max|x| is above 2**40 or below 2**-40 are scaled by a power of two on
the device before the products and back after them (exact), so float32 neither overflows nor
underflows.
"""

from __future__ import annotations

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

#: Gram products for float32 input (16-bit inputs always use their exact native products).
GRAM_PRECISIONS = ("3xtf32", "tf32", "ieee")
#: Tensor-core accumulation over at most this many samples: it truncates, and its bias grows
#: with the steps (bench/gram_precision.py); chunks are then added with rounding to nearest.
GRAM_CHUNK = 2048
#: Data scaled by a power of two before the products when max|x| is outside 2**+-40.
GRAM_SCALE_BITS = 40
_PRECISION_CODE = {"3xtf32": 2, "tf32": 1, "ieee": 3}


@triton.jit
def round_tf32(x):
    """float32 -> the nearest TF32 value (10 mantissa bits, ties to even), as float32. Inputs
    are finite and below 2**126 in magnitude (non-finite zeroed, data scaled)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gram_step(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """acc += a.T @ b for tiles a, b Tensor[BK, BG] (16-bit: native products; float32: 1 =
    tf32, 2 = 3xtf32, 3 = ieee). WIDEN: 16-bit tiles as float32 IEEE products - the same exact
    products; for the interpreter, whose dot reads bfloat16 as raw bits."""
    if a.dtype != tl.float32:
        if WIDEN:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)  # float16/bfloat16 products are exact in fp32
    elif PRECISION == 1:
        acc = tl.dot(tl.trans(round_tf32(a)), round_tf32(b), acc, input_precision="tf32")
    elif PRECISION == 2:
        a_hi = round_tf32(a)
        b_hi = round_tf32(b)
        a_lo = round_tf32(a - a_hi)  # a - a_hi is exact; its TF32 rounding drops ~2**-22 |a|
        b_lo = round_tf32(b - b_hi)
        acc = tl.dot(tl.trans(a_lo), b_hi, acc, input_precision="tf32")
        acc = tl.dot(tl.trans(a_hi), b_lo, acc, input_precision="tf32")
        acc = tl.dot(tl.trans(a_hi), b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
    return acc


@triton.jit
def _gram(
    x_ptr,  # (N, C, S) input, element strides stride_n, stride_c, stride_s
    flags_ptr,  # (2,) int64: [1] frexp exponent of max|x| + FLAG_BIAS (from _stats_finish)
    part_ptr,  # (SPLITS, PAIRS, BG, BG) float32, zeroed: block (bi, bj) of A @ A.T per split
    C,
    S,
    M,
    NB,  # channel blocks; PAIRS = NB * (NB + 1) / 2 upper pairs, grid = PAIRS * SPLITS
    SPLIT_M,  # samples per split (program)
    CHUNK,  # samples per float32 accumulation (a multiple of BLOCK_K)
    stride_n,
    stride_c,
    stride_s,
    PRECISION: tl.constexpr,
    SCALED: tl.constexpr,  # apply the power-of-two scale (bfloat16/float32 input)
    FLAG_BIAS: tl.constexpr,
    SCALE_BITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_MODE: tl.constexpr,  # icprune.kernels.common.row_mode of the input and BLOCK_K
    WIDE: tl.constexpr,
    WIDEN: tl.constexpr,  # 16-bit tiles widened to float32 (interpreter; see _gram_step)
):
    pairs = NB * (NB + 1) // 2
    pid = tl.program_id(0)
    pair = pid % pairs  # the pairs of one split run together: its samples are read once
    split = pid // pairs
    # Upper pair -> (bi, bj): row bi starts at bi * NB - bi * (bi - 1) / 2.
    bi = pair * 0
    for r in range(1, NB):
        bi += (r * NB - r * (r - 1) // 2 <= pair).to(tl.int32)
    bj = bi + pair - (bi * NB - bi * (bi - 1) // 2)
    ci = bi * BLOCK_G + tl.arange(0, BLOCK_G)
    cj = bj * BLOCK_G + tl.arange(0, BLOCK_G)
    if WIDE:
        col_i = ci.to(tl.int64) * stride_c
        col_j = cj.to(tl.int64) * stride_c
    else:
        col_i = ci * stride_c
        col_j = cj * stride_c
    scale = 1.0
    if SCALED:
        e = (tl.load(flags_ptr + 1) - FLAG_BIAS).to(tl.int32)
        far = (e > SCALE_BITS + 1) | ((e < 1 - SCALE_BITS) & (e > -FLAG_BIAS))
        scale = tl.where(far, pow2_f32(-e), 1.0)
    block = part_ptr + (split.to(tl.int64) * pairs + pair) * (BLOCK_G * BLOCK_G)
    m0 = split * SPLIT_M
    m1 = tl.minimum(m0 + SPLIT_M, M)
    for c0 in range(m0, m1, CHUNK):  # tensor-core accumulation within a chunk only
        acc = tl.zeros((BLOCK_G, BLOCK_G), tl.float32)
        for k0 in range(c0, tl.minimum(c0 + CHUNK, m1), BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            base = row_offsets(k0, BLOCK_K, S, stride_n, stride_s, ROW_MODE, WIDE)[:, None]
            row_ok = (rows < m1)[:, None]
            a = tl.load(x_ptr + base + col_i[None, :], mask=row_ok & (ci < C)[None, :], other=0.0)
            b = tl.load(x_ptr + base + col_j[None, :], mask=row_ok & (cj < C)[None, :], other=0.0)
            a = tl.where(tl.abs(a) < float("inf"), a, 0.0)
            b = tl.where(tl.abs(b) < float("inf"), b, 0.0)
            if SCALED:  # power-of-two scale: exact, also when cast back to bfloat16
                a = (a.to(tl.float32) * scale).to(a.dtype)
                b = (b.to(tl.float32) * scale).to(b.dtype)
            acc = _gram_step(a, b, acc, PRECISION, WIDEN)
        # Add the chunk into the program's own zeroed partial, rounding to nearest (unbiased,
        # unlike the tensor cores' accumulation). A float atomic here is deterministic: each
        # address belongs to this program alone, so its additions come in chunk order. (A
        # load-add-store would hold a second tile in registers and spill at 128 x 128.)
        g = tl.arange(0, BLOCK_G)  # (pointers formed here: a live 128 x 128 tile would spill)
        tl.atomic_add(block + g[:, None] * BLOCK_G + g[None, :], acc, sem="relaxed")


@triton.jit
def _gram_finish(
    part_ptr,  # (SPLITS, PAIRS, BG, BG) float32: _gram partials
    flags_ptr,  # (2,) int64: [1] frexp exponent of max|x| + FLAG_BIAS
    out_ptr,  # (C, C) float64 out: A @ A.T, symmetric
    C,
    NB,
    SPLITS,
    SCALED: tl.constexpr,
    FLAG_BIAS: tl.constexpr,
    SCALE_BITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ROWS: tl.constexpr,  # rows of the block per program (grid = PAIRS x BLOCK_G / ROWS)
    BLOCK_S: tl.constexpr,  # splits added per step
):
    pairs = NB * (NB + 1) // 2
    pair = tl.program_id(0)
    r0 = tl.program_id(1) * ROWS
    bi = pair * 0
    for q in range(1, NB):
        bi += (q * NB - q * (q - 1) // 2 <= pair).to(tl.int32)
    bj = bi + pair - (bi * NB - bi * (bi - 1) // 2)
    flat = tl.arange(0, ROWS * BLOCK_G)  # rows r0 .. r0 + ROWS - 1 of the block, contiguous
    total = tl.zeros((ROWS * BLOCK_G,), tl.float64)
    for s0 in range(0, SPLITS, BLOCK_S):  # a fixed order and tree: deterministic
        s = s0 + tl.arange(0, BLOCK_S)
        at = (s.to(tl.int64)[:, None] * pairs + pair) * (BLOCK_G * BLOCK_G) + r0 * BLOCK_G
        part = tl.load(part_ptr + at + flat[None, :], mask=(s < SPLITS)[:, None], other=0.0)
        total += tl.sum(part.to(tl.float64), axis=0)
    if SCALED:
        e = (tl.load(flags_ptr + 1) - FLAG_BIAS).to(tl.int32)
        far = (e > SCALE_BITS + 1) | ((e < 1 - SCALE_BITS) & (e > -FLAG_BIAS))
        undo = ((1023 + tl.where(far, 2 * e, 0)).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        total = total * undo  # 2.0**(2 e), exact
    r = r0 + flat // BLOCK_G
    col = flat % BLOCK_G
    i = bi * BLOCK_G + r
    j = bj * BLOCK_G + col
    ok = (i < C) & (j < C)
    # Each entry has one writer: in a diagonal block, row r writes (i, j) for col >= r and the
    # mirrored (j, i) for col > r; an off-diagonal block writes itself and its mirror.
    reach = col + (bi != bj).to(tl.int32) * BLOCK_G  # >= BLOCK_G off the diagonal
    tl.store(out_ptr + i.to(tl.int64) * C + j, total, mask=ok & (reach >= r))
    tl.store(out_ptr + j.to(tl.int64) * C + i, total, mask=ok & (reach > r))


def gram_splits(m: int, pairs: int, target: int, block_k: int) -> int:
    """Samples per Gram split (one program per split and block pair): enough splits for about
    ``target`` programs, a multiple of ``block_k``. Partials are bounded by the programs."""
    want = triton.cdiv(m, max(1, triton.cdiv(target, pairs)))
    return triton.cdiv(want, block_k) * block_k


def gram_matrix(
    x: torch.Tensor,
    flags: torch.Tensor,
    precision: str = "3xtf32",
    *,
    programs: int,
    block_g: int,
    block_k: int,
    warps: int = 8,
    stages: int = 3,
) -> torch.Tensor:
    """``A @ A.T`` of the C x (N*S) samples of Tensor[N, C, S] ``x`` (float16/bfloat16/float32,
    any strides; non-finite values read as 0), as Tensor[C, C] float64 on ``x.device``.

    Args:
        x: the batch (checked by the caller, :func:`icprune.kernels.channel_stats.channel_stats`).
        flags: Tensor[2] int64 on the device; flags[1] is the frexp exponent of max|x| plus
            FLAG_BIAS (0: all zero), as the statistics finish writes it - it picks the
            power-of-two scale without a host synchronisation.
        precision: products of float32 input, one of GRAM_PRECISIONS.
        programs: programs to aim for (the sample splits are sized from it).
        block_g, block_k: channels per block, samples per step (powers of two >= 16).
        warps, stages: launch options of ``_gram``.
    """
    n, c, s = x.shape
    m = n * s
    span = 1 + sum((d - 1) * st for d, st in zip(x.shape, x.stride(), strict=True))
    wide = span >= 2**31  # int64 element offsets
    nb = triton.cdiv(c, block_g)
    pairs = nb * (nb + 1) // 2
    split_m = gram_splits(m, pairs, programs, block_k)
    splits = triton.cdiv(m, split_m)
    shape = (splits, pairs, block_g, block_g)
    part = torch.zeros(shape, dtype=torch.float32, device=x.device)
    scaled = x.dtype != torch.float16  # float16 cannot overflow or underflow float32 products
    common = {"SCALED": scaled, "FLAG_BIAS": FLAG_BIAS, "SCALE_BITS": GRAM_SCALE_BITS}
    _gram[(pairs * splits,)](
        x, flags, part, c, s, m, nb, split_m, GRAM_CHUNK // block_k * block_k, *sample_strides(x),
        PRECISION=_PRECISION_CODE[precision], BLOCK_G=block_g, BLOCK_K=block_k,
        ROW_MODE=row_mode(x, block_k), WIDE=wide, WIDEN=interpreting(),
        num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    out = torch.empty(c, c, dtype=torch.float64, device=x.device)
    # Rows per finishing program: one program per pair on the interpreter, else enough
    # programs to fill the device with tiles of at most 8192 partial values.
    block_s = min(64, triton.next_power_of_2(splits))
    rows = block_g if x.device.type != "cuda" else max(1, 8192 // (block_s * block_g))
    rows = min(rows, block_g, max(1, pairs * block_g // programs))
    rows = 1 << (rows.bit_length() - 1)  # a power of two dividing block_g
    _gram_finish[(pairs, block_g // rows)](
        part, flags, out, c, nb, splits, BLOCK_G=block_g, ROWS=rows, BLOCK_S=block_s,
        num_warps=4, **common,
    )  # fmt: skip
    return out


#: The launchable kernels of this module by name, for tools that compile them on their own
#: (bench/gpu_sass.py reads their SASS for register spills).
JIT_KERNELS = {"gram": _gram, "gram_finish": _gram_finish}
