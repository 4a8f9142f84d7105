import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from icprune.stats.binning import INDEX_BITS, K_MIN, bin_index, bin_layout, rebin

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def _fits(lo: float, hi: float, k: int, bins: int) -> bool:
    return math.floor(math.ldexp(hi, -k)) - math.floor(math.ldexp(lo, -k)) <= bins - 1


@settings(max_examples=300, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=20), st.integers(-130, 140))
def test_bin_index_is_exact_floor(values, k):
    # The documented domain: bin_layout keeps |index| below 2**INDEX_BITS.
    assume(all(abs(math.ldexp(v, -k)) < 2**INDEX_BITS for v in values))
    x = torch.tensor(values, dtype=torch.float64)[:, None]
    got = bin_index(x, torch.tensor([k]))[:, 0].tolist()
    assert got == [math.floor(math.ldexp(v, -k)) for v in values]


@settings(max_examples=300, deadline=None)
@given(finite32, finite32, st.integers(2, 1024))
def test_bin_layout_is_the_smallest_fitting_exponent(a, b, bins):
    lo, hi = min(a, b), max(a, b)
    k, off = bin_layout(
        torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64), bins
    )
    k, off = int(k), int(off)
    assert _fits(lo, hi, k, bins)
    maxabs = max(abs(lo), abs(hi))
    floor_k = K_MIN if maxabs == 0 else max(K_MIN, math.frexp(maxabs)[1] - INDEX_BITS)
    # Minimal: one step finer either breaks the fit or goes below the documented floors.
    assert k == floor_k or not _fits(lo, hi, k - 1, bins)
    assert off == math.floor(math.ldexp(lo, -k))
    assert abs(math.floor(math.ldexp(maxabs, -k))) < 2**INDEX_BITS


def test_bin_layout_of_unseen_channels_is_defined():
    k, off = bin_layout(torch.tensor([math.inf]), torch.tensor([-math.inf]), 8)
    assert k.tolist() == [K_MIN] and off.tolist() == [0]


def test_bin_layout_is_monotone_in_the_range():
    lo = torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)
    k1, _ = bin_layout(lo, hi, 16)
    k2, _ = bin_layout(lo * 4, hi * 4, 16)
    assert torch.all(k2 >= k1)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite32, min_size=2, max_size=60), st.integers(2, 64), st.integers(1, 59))
def test_rebin_equals_binning_directly_at_the_coarser_layout(values, bins, cut):
    x = torch.tensor(values, dtype=torch.float64)
    cut = cut % len(values) or 1
    first = x[:cut]

    def histogram(data, k, off):
        idx = bin_index(data[:, None], k)[:, 0] - off
        return torch.bincount(idx, minlength=bins)[None]

    k1, off1 = bin_layout(first.min()[None], first.max()[None], bins)
    k2, off2 = bin_layout(x.min()[None], x.max()[None], bins)
    moved = rebin(histogram(first, k1, off1), k1, off1, k2, off2)
    assert torch.equal(moved, histogram(first, k2, off2))
