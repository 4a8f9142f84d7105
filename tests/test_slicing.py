"""slicing: the fused C++ gather is bit-identical to torch indexing, and refuses bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import icprune.slicing as slicing
from icprune.extension import HAVE_EXT
from icprune.slicing import slice_channels, slice_channels_ref

needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="icprune._C was not built in this environment")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = {
    "minimal": (1, 1, 1, 1),
    "linear": (37, 53),
    "non-aligned 3x3": (13, 7, 3, 3),
    "large 1x1": (512, 1024, 1, 1),
    "large 3x3": (256, 256, 3, 3),
    "conv1d": (9, 5, 4),
}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = (a.contiguous().view(bits) != b.contiguous().view(bits)).nonzero()
    assert diff.numel() == 0, f"mismatch at indices {diff[:10].tolist()}"


def _picks(shape, generator, keep=0.6):
    out = [
        torch.randperm(n, generator=generator)[: max(1, round(n * keep))].sort().values
        for n in shape[:2]
    ]
    return out


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", list(SHAPES))
def test_bit_identical_to_torch_indexing(dtype, label):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPES[label], generator=g).to(dtype)
    w.view(-1)[0] = float("nan")
    w.view(-1)[-1] = -0.0
    rows, cols = _picks(w.shape, g)
    _same_bits(slice_channels(w, rows, cols), w[rows][:, cols])
    _same_bits(slice_channels(w, rows), w[rows])


@needs_ext
def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(24, 40, 3, 3, generator=g)
    for w in (base.transpose(0, 1), base[::2, 1::3], base[:, :, :2, :2], base.permute(0, 1, 3, 2)):
        rows, cols = _picks(w.shape, g)
        _same_bits(slice_channels(w, rows, cols), w[rows][:, cols])


@needs_ext
@settings(max_examples=40, deadline=None)
@given(
    o=st.integers(1, 40),
    i=st.integers(1, 40),
    k=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_any_indices_match(o, i, k, seed, dtype):
    """Unsorted and repeated indices too: the gather is a plain copy."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, k, generator=g).to(dtype)
    rows = torch.randint(0, o, (torch.randint(0, 2 * o, (1,), generator=g).item(),), generator=g)
    cols = torch.randint(0, i, (torch.randint(1, 2 * i, (1,), generator=g).item(),), generator=g)
    _same_bits(slice_channels(w, rows, cols), w[rows][:, cols])


def test_fallback_without_extension_and_other_dtypes(monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 6, 3, generator=g)
    rows, cols = _picks(w.shape, g)
    monkeypatch.setattr(slicing, "ext", None)
    _same_bits(slice_channels(w, rows, cols), slice_channels_ref(w, rows, cols))
    monkeypatch.undo()
    ints = torch.randint(-5, 5, (8, 6, 3), dtype=torch.int8)
    assert torch.equal(slice_channels(ints, rows, cols), ints[rows][:, cols])


def test_result_is_a_fresh_tensor_without_grad():
    w = torch.randn(6, 4, 3, requires_grad=True)
    out = slice_channels(w, torch.tensor([0, 2]), torch.tensor([1, 3]))
    assert not out.requires_grad and out.is_contiguous()
    out.zero_()
    assert w.abs().sum() > 0


@pytest.mark.parametrize("use_ext", [True, False])
def test_bad_indices_raise(monkeypatch, use_ext):
    if use_ext and not HAVE_EXT:
        pytest.skip("icprune._C was not built in this environment")
    if not use_ext:
        monkeypatch.setattr(slicing, "ext", None)
    w = torch.randn(4, 3, 2)
    with pytest.raises(IndexError):
        slice_channels(w, torch.tensor([0, 4]), torch.tensor([0]))
    with pytest.raises(IndexError):
        slice_channels(w, torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(TypeError, match="LongTensor"):
        slice_channels(w, torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="2\\+ dims"):
        slice_channels(torch.randn(4), torch.tensor([0]), torch.tensor([0]))
