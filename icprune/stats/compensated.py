"""Compensated (double-double) float64 sums: the exact, order-independent accumulation of
:class:`icprune.ChannelStats` sums and Gram matrices.

A running total is kept as two float64 tensors ``(hi, lo)`` of the same shape: ``hi`` is the
total rounded to the nearest float64 and ``lo = total - hi`` the remainder, both exact. Adding a
term uses Knuth's TwoSum, which returns the rounding error of a float64 addition exactly, so no
bit of any term is lost as long as the exact total fits in about 106 significant bits (the
precise condition is in :func:`add_`). A total that is exact is a function of the multiset of
terms alone, so it is bit-identical for any order and any grouping of the additions; and since
``(hi, lo)`` is renormalised after every addition, ``hi`` is that total correctly rounded.

Contiguous CPU tensors go through one fused pass of the C++ extension (csrc/compensated.cpp,
no temporaries); everything else through elementwise torch code, which runs on any device and
never synchronises with the host. Both perform the same IEEE operations in the same order, so
they give the same bits.
"""

from __future__ import annotations

import torch

from icprune.extension import HAVE_EXT, ext


def _fused(*tensors: torch.Tensor | None) -> bool:
    """True when the C++ pass can update these tensors in place (CPU, contiguous float64)."""
    return HAVE_EXT and all(
        t is None or (t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float64)
        for t in tensors
    )


def add_(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor, x_lo: torch.Tensor | None = None):
    """Add ``x`` (plus ``x_lo``, the remainder of another compensated total) to ``(hi, lo)``, in
    place.

    Exactness: let every term ever added to an entry (all ``x``, ``x_lo``) be a multiple of
    ``2**q`` (q: the position of the lowest set bit among them) and the sum of their magnitudes
    be below ``2**(q + 105)``. Then every step is free of rounding, ``hi + lo`` is the exact sum
    and ``hi`` its correctly rounded float64 value, whatever the order and grouping of the
    additions. Beyond that (terms spanning more than ~105 binary orders of magnitude) the total
    is still accurate to about ``2**-104`` times the sum of magnitudes per addition, but ``hi``
    may differ in its last bit between groupings. Terms must be finite.

    Args:
        hi: Tensor[...] float64, the rounded running total (updated in place).
        lo: Tensor[...] float64, its remainder (updated in place).
        x: Tensor[...] float64 term, same shape and device.
        x_lo: optional Tensor[...] float64, the remainder belonging to ``x`` when ``x`` is the
            ``hi`` of another compensated total (merging two totals).
    """
    if _fused(hi, lo, x, x_lo):
        none = x_lo is None
        ext.compensated_add(hi.numpy(), lo.numpy(), x.numpy(), None if none else x_lo.numpy())
        return
    # TwoSum(hi, x) = (s, err) with s + err == hi + x exactly.
    s = hi + x
    v = s - hi
    w = s - v
    hi.sub_(w)  # hi - (s - v)
    v.neg_().add_(x)  # x - v
    hi.add_(v)  # err
    lo.add_(hi)
    if x_lo is not None:
        lo.add_(x_lo)
    # Renormalise: TwoSum(s, lo) = (hi, lo).
    torch.add(s, lo, out=hi)
    torch.sub(hi, s, out=v)
    torch.sub(hi, v, out=w)
    w.neg_().add_(s)  # s - (hi - v)
    lo.sub_(v).add_(w)  # (lo - v) + (s - (hi - v))
