"""Exact, split-independent histogram binning with power-of-two bin widths.

A histogram of ``B`` bins is described per channel by its *bin layout*: an integer
``bin_exponent`` (written ``k`` in formulas) and an integer ``bin_offset`` (``off``): bin ``j``
covers ``[(off + j) * 2**k, (off + j + 1) * 2**k)``. A value ``x`` falls in the bin of absolute
index ``floor(x / 2**k)``, an exact operation in floating point (scaling by a power of two only
changes the exponent), so the same value always lands in the same bin.

The layout is a function of the data's minimum and maximum alone (see :func:`bin_layout`), and a
histogram laid out for a smaller range is turned into one for a larger range exactly, by merging
``2**d`` neighbouring bins (:func:`rebin`). Hence the counts never depend on how the data was
split into batches or in which order the pieces were merged.
"""

from __future__ import annotations

import torch

#: Smallest bin exponent: the finest bins are ``2**-120`` wide (2**120 is finite in fp32 and fp64).
K_MIN = -120
#: Absolute bin indices stay below ``2**INDEX_BITS`` in magnitude (exact in int64 and fp32 math).
INDEX_BITS = 40
#: Largest shift applied to an int64 bin index when coarsening (indices are below 2**40).
MAX_SHIFT = 62
#: Fitting steps of bin_layout after its lower bound (2 suffice; one spare).
LAYOUT_STEPS = 3


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) of positive finite fp64 values, exactly (via frexp). Tensor[...] -> int64."""
    _, exponent = torch.frexp(x)
    return exponent.to(torch.int64) - 1


def bin_index(x: torch.Tensor, bin_exponent: torch.Tensor) -> torch.Tensor:
    """Absolute bin index ``floor(x / 2**bin_exponent)`` of every value.

    Args:
        x: Tensor[..., C] float64 values (finite).
        bin_exponent: Tensor[C] int64 bin exponents, broadcast over the last axis of ``x``.

    Returns:
        Tensor[..., C] int64 absolute bin indices.
    """
    return torch.floor(torch.ldexp(x, -bin_exponent.to(torch.float64))).to(torch.int64)


def bin_layout(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin layout (bin_exponent ``k``, bin_offset ``off``) of a ``bins``-bin histogram covering
    ``[lo, hi]``.

    ``k`` is the smallest integer with ``floor(hi / 2**k) - floor(lo / 2**k) <= bins - 1``, but at
    least :data:`K_MIN` and at least ``floor(log2(max(|lo|, |hi|))) + 1 - INDEX_BITS`` (so that
    constant data gets a defined layout and indices stay small). ``off = floor(lo / 2**k)``.
    Both are non-decreasing in the range, which is what makes streaming exact.

    Args:
        lo: Tensor[C] float64 per-channel minimum (finite), or +inf where nothing was seen.
        hi: Tensor[C] float64 per-channel maximum (finite), or -inf where nothing was seen.
        bins: number of bins B >= 2.

    Returns:
        (bin_exponent, bin_offset): two Tensor[C] int64. Channels with no data get
        ``bin_exponent = K_MIN``, ``bin_offset = 0``.
    """
    seen = lo <= hi
    lo = torch.where(seen, lo, torch.zeros_like(lo))
    hi = torch.where(seen, hi, torch.zeros_like(hi))
    # Halve before subtracting so that the span cannot overflow for fp64 data near its maximum.
    half_span = hi / 2 - lo / 2
    k = torch.full_like(lo, K_MIN, dtype=torch.int64)
    wide = half_span > 0
    # A lower bound of the fitting exponent: span / 2**k must be at most B to fit.
    k_fit = _floor_log2(torch.where(wide, half_span, torch.ones_like(half_span))) + 1
    k_fit = k_fit - (bins - 1).bit_length()
    k = torch.where(wide, torch.maximum(k, k_fit), k)
    maxabs = torch.maximum(lo.abs(), hi.abs())
    nonzero = maxabs > 0
    k_mag = _floor_log2(torch.where(nonzero, maxabs, torch.ones_like(maxabs))) + 1 - INDEX_BITS
    k = torch.where(nonzero, torch.maximum(k, k_mag), k)
    # k is now at most 2 below the answer (span / 2**k < 4 * 2**bitlen(B-1)); a fixed number of
    # steps, not a data-dependent loop, so that nothing waits for the device (CUDA tensors).
    for _ in range(LAYOUT_STEPS):
        k = k + (bin_index(hi, k) - bin_index(lo, k) > bins - 1).to(torch.int64)
    off = torch.where(seen, bin_index(lo, k), torch.zeros_like(k))
    return k, off


def rebin(
    counts: torch.Tensor,
    bin_exponent: torch.Tensor,
    bin_offset: torch.Tensor,
    new_bin_exponent: torch.Tensor,
    new_bin_offset: torch.Tensor,
) -> torch.Tensor:
    """Move histogram counts to a coarser (or shifted) bin layout, exactly.

    Requires ``new_bin_exponent >= bin_exponent`` and a new layout that covers every non-empty
    old bin, which :func:`bin_layout` guarantees for a range that contains the old one.

    Args:
        counts: Tensor[C, B] int64 counts in the layout (bin_exponent, bin_offset).
        bin_exponent, bin_offset: Tensor[C] int64, the counts' layout.
        new_bin_exponent, new_bin_offset: Tensor[C] int64, the layout to move them to.

    Returns:
        Tensor[C, B] int64 counts in the new layout (same total per channel).
    """
    bins = counts.shape[1]
    shift = (new_bin_exponent - bin_exponent).clamp(0, MAX_SHIFT)
    absolute = bin_offset[:, None] + torch.arange(bins, device=counts.device)
    # Arithmetic right shift of int64 is floor division by 2**shift, also for negative indices.
    target = (absolute >> shift[:, None]) - new_bin_offset[:, None]
    # Empty bins beyond the data may point outside the new window; they carry no counts.
    target = target.clamp(0, bins - 1)
    out = torch.zeros_like(counts)
    return out.scatter_add_(1, target, counts)
