"""The Triton kernels against their float64 reference (under TRITON_INTERPRET=1 without a GPU;
unchanged on a GPU, where the tensors are moved to CUDA)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
from icprune.kernels.channel_stats import channel_stats, channel_stats_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Gram and sums: float32 products and tile sums, float64 across tiles (relative to the largest).
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
NAMES = ("counts", "exponent", "offset", "minimum", "maximum", "sums", "gram", "nonfinite")


def _assert_matches(x: torch.Tensor, bins: int) -> None:
    got = channel_stats(x, bins)
    want = channel_stats_ref(x, bins)
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert g.device == x.device and g.dtype == w.dtype, name
        if name in ("sums", "gram"):
            tol = RTOL[x.dtype] * float(w.abs().max().clamp(min=1e-30))
            torch.testing.assert_close(g, w, rtol=RTOL[x.dtype], atol=tol, msg=name)
        else:  # counts, layouts, extremes and the non-finite count are exact
            assert torch.equal(g, w), (name, g, w)
    assert torch.equal(got[6], got[6].T)  # symmetric by construction, not by tl.dot


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "c", "s"),
    [
        (2, 3, 5),  # C and N*S not multiples of the blocks
        (3, 1, 7),  # C = 1
        (5, 20, 1),  # 1x1 spatial
        (2, 17, 300),  # several sample tiles, C just over a block
    ],
)
def test_kernel_matches_the_reference(n, c, s, dtype):
    gen = torch.Generator().manual_seed(n * 100 + c)
    x = (torch.randn(n, c, s, generator=gen) * 4 + 1).to(dtype).to(DEVICE)
    _assert_matches(x, 16)


def test_channels_last_memory_is_read_in_place():
    x = torch.randn(3, 24, 4, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x = x.to(memory_format=torch.channels_last).reshape(3, 24, 20)
    assert x.stride(1) == 1  # channels contiguous: the kernel reads this layout, no copy
    _assert_matches(x, 64)


def test_very_wide_layer_with_tiny_maps():
    x = torch.randn(1, 2048, 1, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _assert_matches(x, 4)


def test_non_finite_extreme_and_constant_values():
    x = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(3))
    x[0, 1, 2] = float("nan")
    x[1, 3, 3] = float("inf")
    x[1, 0, 0] = 3e38  # float32 Gram products would overflow without the power-of-two scale
    x[0, 0, 1] = -1e-40  # subnormal, negative: its product with 2**-k underflows to -0
    x[:, 4] = 2.5  # constant channel
    _assert_matches(x.to(DEVICE), 16)
    _assert_matches((torch.randn(2, 3, 8) * 1e-30).to(DEVICE), 3)
    assert int(channel_stats(x.to(DEVICE), 16)[-1]) == 2


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 20),
    s=st.integers(1, 40),
    bins=st.sampled_from([2, 3, 16, 64]),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_the_reference(n, c, s, bins, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, s, generator=gen) * scale * torch.rand(1, c, 1, generator=gen)
    _assert_matches(x.to(DEVICE), bins)


@pytest.mark.parametrize(
    ("x", "bins", "pattern"),
    [
        (torch.ones(2, 3), 8, r"Tensor\[N, C, S\]"),
        (torch.ones(2, 3, 4, dtype=torch.float64), 8, "float64"),
        (torch.ones(2, 3, 4), 1, "bins must be an int >= 2"),
        (torch.ones(0, 3, 4), 8, "empty batch"),
    ],
)
def test_launcher_rejects_impossible_input(x, bins, pattern):
    with pytest.raises(ValueError, match=pattern):
        channel_stats(x.to(DEVICE), bins)


def test_gram_launcher_mirrors_entry_by_entry_whatever_the_kernel_computed(monkeypatch):
    """A diagonal block's tl.dot need not be bit-symmetric: the launcher keeps the upper
    triangle only. A fake kernel writes an asymmetric matrix; the result must be symmetric."""
    from icprune.kernels import channel_stats as kernels

    class Skewed:
        def __getitem__(self, grid):
            def launch(x, pairs, scale, part, *args, **kwargs):
                gen = torch.Generator().manual_seed(0)
                part.copy_(torch.rand(part.shape, generator=gen).to(part.device))

            return launch

    monkeypatch.setattr(kernels, "_gram", Skewed())
    x = torch.randn(2, 40, 9, device=DEVICE)  # 40 channels: a diagonal block and an off one
    gram = kernels.channel_stats(x, 16)[6]
    assert torch.equal(gram, gram.T)
