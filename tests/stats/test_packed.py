"""The packed Gram triangle (icprune.stats.packed): the C++ passes give the bits of the torch
code, on any shape and strides."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icprune.extension import HAVE_EXT
from icprune.stats import packed
from icprune.stats.compensated import add_

needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="no icprune._C")


def _symmetric(c: int, seed: int) -> torch.Tensor:
    a = torch.randn(
        c, 2 * c + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return a @ a.T


def test_pack_and_unpack_round_trip_and_read_only_the_upper_triangle():
    g = _symmetric(7, 0)
    garbage = torch.triu(g) + torch.tril(torch.full_like(g, 99.0), -1)
    p = packed.pack_upper(garbage)
    assert p.shape == (packed.packed_size(7),) == (28,)
    full = packed.unpack(p, 7)
    assert torch.equal(full, full.T) and torch.equal(torch.triu(full), torch.triu(g))
    assert torch.equal(packed.diagonal(p, 7), g.diagonal())


@needs_ext
@settings(max_examples=30, deadline=None)
@given(
    c=st.integers(1, 40),
    dtype=st.sampled_from([np.float32, np.float64]),
    fortran=st.booleans(),
    two_e=st.sampled_from([0, -80, 2, 90]),
    seed=st.integers(0, 2**16),
)
def test_cpp_add_upper_gives_the_bits_of_the_torch_code(c, dtype, fortran, two_e, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((c, c)).astype(dtype) * 10.0 ** rng.integers(-8, 8, (c, c))
    g = np.asfortranarray(g) if fortran else np.ascontiguousarray(g)
    start = torch.from_numpy(rng.standard_normal(packed.packed_size(c)) * 1e3)
    hi, lo = start.clone(), torch.zeros_like(start)
    packed.add_upper_(hi, lo, g, two_e)  # C++
    ref_hi, ref_lo = start.clone(), torch.zeros_like(start)
    term = packed.pack_upper(torch.from_numpy(g).double())
    add_(ref_hi, ref_lo, torch.ldexp(term, torch.tensor(float(two_e), dtype=torch.float64)))
    assert torch.equal(hi, ref_hi) and torch.equal(lo, ref_lo)


@needs_ext
@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_cpp_unpack_and_distance_give_the_bits_of_the_torch_code(c, seed):
    p = packed.pack_upper(_symmetric(c, seed))
    j, i = torch.tril_indices(c, c)
    full = torch.empty(c, c, dtype=torch.float64)
    full[j, i], full[i, j] = p, p
    assert torch.equal(packed.unpack(p, c), full)
    diag = full.diagonal()
    sq = (diag[:, None] + diag[None, :] - 2 * full).clamp(min=0)
    sq.fill_diagonal_(0.0)
    got = packed.distance(p, c)
    assert torch.equal(got, sq.sqrt()) and torch.equal(got, got.T)


def test_the_torch_fallback_matches_the_cpp_pass(monkeypatch):
    g = _symmetric(9, 3).float()
    hi, lo = torch.zeros(45, dtype=torch.float64), torch.zeros(45, dtype=torch.float64)
    packed.add_upper_(hi, lo, g, 4)
    monkeypatch.setattr(packed, "HAVE_EXT", False)
    hi2, lo2 = torch.zeros_like(hi), torch.zeros_like(lo)
    packed.add_upper_(hi2, lo2, g, 4)
    assert torch.equal(hi, hi2) and torch.equal(lo, lo2)
    assert torch.equal(packed.distance(hi2, 9), packed.distance(hi, 9))


@needs_ext
@pytest.mark.parametrize("c", [45, 46, 64, 128, 129])
def test_distance_roots_on_the_calling_thread_keep_the_bits_of_one_sqrt(c):
    # 46 to 128 channels: more values than torch's parallel grain, rooted in runs on this thread.
    p = packed.pack_upper(_symmetric(c, c) * 1e3)
    j, i = torch.tril_indices(c, c)
    full = torch.empty(c, c, dtype=torch.float64)
    full[j, i], full[i, j] = p, p
    diag = full.diagonal()
    sq = (diag[:, None] + diag[None, :] - 2 * full).clamp(min=0)
    sq.fill_diagonal_(0.0)
    assert torch.equal(packed.distance(p, c), sq.sqrt())
