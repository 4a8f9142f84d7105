"""Compensated sums: exact totals, bit-identical for any order and grouping of the terms."""

import itertools
import math
from fractions import Fraction
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icprune.extension import HAVE_EXT
from icprune.stats import compensated
from icprune.stats.compensated import add_

# Terms a * 2**e with a 53-bit significand and |e| <= 25: they span at most ~105 binary orders
# of magnitude (the documented exactness condition), as every realistic batch contribution does.
_term = st.builds(
    lambda m, e, sign: sign * math.ldexp(m, e - 52),
    st.integers(0, 2**53 - 1),
    st.integers(-25, 25),
    st.sampled_from([-1.0, 1.0]),
)


def _total(terms: list[float], order: list[int], cuts: list[int]) -> tuple[float, float]:
    """Compensated total of ``terms`` in ``order``, summed in groups split at ``cuts``, the
    groups then merged right to left (a different tree than one running sum)."""
    ordered = [terms[i] for i in order]
    bounds = [0, *sorted(set(cuts)), len(ordered)]
    groups = []
    for start, stop in itertools.pairwise(bounds):
        hi, lo = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for t in ordered[start:stop]:
            add_(hi, lo, torch.tensor([t, -t / 2], dtype=torch.float64))
        groups.append((hi, lo))
    hi, lo = groups.pop()
    while groups:
        other_hi, other_lo = groups.pop()
        add_(hi, lo, other_hi, other_lo)
    return hi, lo


@settings(max_examples=150, deadline=None)
@given(terms=st.lists(_term, min_size=1, max_size=24), data=st.data())
def test_total_is_exact_and_independent_of_order_and_grouping(terms, data):
    exact = sum(Fraction(t) for t in terms)
    reference = _total(terms, list(range(len(terms))), [])
    order = data.draw(st.permutations(range(len(terms))))
    cuts = data.draw(st.lists(st.integers(0, len(terms)), max_size=5))
    hi, lo = _total(terms, order, cuts)
    assert torch.equal(hi, reference[0]) and torch.equal(lo, reference[1])
    for column, value in enumerate([exact, -exact / 2]):
        assert Fraction(float(hi[column])) + Fraction(float(lo[column])) == value
        assert float(hi[column]) == float(value)  # correctly rounded
        assert abs(float(lo[column])) <= math.ulp(float(hi[column])) / 2


def test_plain_float64_sums_depend_on_the_order_and_compensated_ones_do_not():
    terms = [1.0, 2.0**-53, 2.0**-53, -1.0, 3.0 * 2.0**-80]
    plain = [sum(terms), sum(reversed(terms))]
    assert plain[0] != plain[1]  # the problem
    hi, _ = _total(terms, list(range(5)), [])
    hi_rev, _ = _total(terms, list(reversed(range(5))), [2])
    assert torch.equal(hi, hi_rev) and float(hi[0]) == 2.0**-52 + 3.0 * 2.0**-80


def test_works_in_place_on_matrices_without_reallocating():
    hi, lo = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    ids = (hi.data_ptr(), lo.data_ptr())
    add_(hi, lo, torch.full((3, 3), 0.1, dtype=torch.float64))
    add_(hi, lo, torch.full((3, 3), 0.2, dtype=torch.float64))
    assert (hi.data_ptr(), lo.data_ptr()) == ids
    exact = Fraction(0.1) + Fraction(0.2)
    assert Fraction(float(hi[1, 2])) + Fraction(float(lo[1, 2])) == exact
    assert float(hi[0, 0]) == float(exact) == 0.30000000000000004


@pytest.mark.skipif(not HAVE_EXT, reason="the C++ extension icprune._C is not built")
@settings(max_examples=30, deadline=None)
@given(terms=st.lists(_term, min_size=1, max_size=12), n=st.integers(1, 70000))
def test_cpp_pass_gives_the_bits_of_the_torch_code(terms, n):
    """The fused C++ pass (contiguous CPU tensors) and the torch ops agree bit for bit, also on
    terms beyond the exactness condition (the same rounding happens in the same place)."""
    gen = torch.Generator().manual_seed(len(terms))
    results = []
    for fused in (True, False):
        hi, lo = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for i, t in enumerate(terms):
            x = torch.randn(n, generator=gen.manual_seed(i), dtype=torch.float64) * t
            x_lo = x * 2.0**-60 if i % 2 else None
            with mock.patch.object(compensated, "_fused", lambda *_, f=fused: f):
                add_(hi, lo, x * 2.0 ** (40 * (i % 3)), x_lo)
        results.append((hi, lo))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
