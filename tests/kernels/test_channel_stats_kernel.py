"""The Triton kernels against their reference, ``channel_stats_ref`` (ChannelStats' float64 torch
path), under TRITON_INTERPRET=1 without a GPU; unchanged on a GPU, where tensors move to CUDA.

Counts, bin layouts, extremes and the non-finite count must be bit-identical; sums and Gram
matrices match within per-dtype/per-precision tolerances relative to their largest entry."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icprune.stats.backends import BatchStats
from icprune.stats.binning import bin_layout

pytest.importorskip("triton")
from icprune.kernels import channel_stats as kernels
from icprune.kernels.channel_stats import KernelConfig, channel_stats, channel_stats_ref
from icprune.kernels.gram import GRAM_CHUNK

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Gram relative to max|G| (and sums relative to max_c sum|x_c|): 16-bit inputs have exact
#: products and float32 accumulation; float32 input per gram_precision. TF32 keeps 11
#: significant bits: |error| <= 2**-10 * sum |a_i b_i| <= 2**-10 * max|G|, plus accumulation.
GRAM_RTOL = {
    torch.float16: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float32: 1e-5,  # "3xtf32" (default) and "ieee"
    "tf32": 2e-3,
}
SUM_RTOL = 1e-6
EXACT = ("counts", "bin_exponent", "bin_offset", "minimum", "maximum", "nonfinite")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mismatch(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
    bad = torch.nonzero(got != want)[:5].tolist()
    return f"{name}: {int((got != want).sum())} mismatches, first at {bad}"


def _assert_matches(x: torch.Tensor, bins: int, precision: str = "3xtf32", **kw) -> BatchStats:
    """Run the kernels on ``x`` and compare every field with the reference."""
    got = channel_stats(x, bins, gram_precision=precision, **kw)
    want = channel_stats_ref(x, bins)
    assert isinstance(got, BatchStats)
    for name in BatchStats._fields:
        g, w = getattr(got, name), getattr(want, name)
        assert g.device == x.device and g.dtype == w.dtype and g.shape == w.shape, name
        if name in EXACT:
            assert torch.equal(g, w), _mismatch(name, g, w)
    scale = float(x.double().abs().nan_to_num(0, 0, 0).sum((0, 2)).max().clamp(min=1e-300))
    err = float((got.sums - want.sums).abs().max())
    assert err <= SUM_RTOL * scale, f"sums: error {err:.3g} > {SUM_RTOL} * {scale:.3g}"
    rtol = GRAM_RTOL["tf32" if precision == "tf32" and x.dtype == torch.float32 else x.dtype]
    top = float(want.gram.abs().max().clamp(min=1e-300))
    diff = (got.gram - want.gram).abs()
    worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    assert float(diff.max()) <= rtol * top, f"gram: {float(diff.max()) / top:.3g} rel at {worst}"
    assert torch.equal(got.gram, got.gram.T), "the Gram matrix must be exactly symmetric"
    return got


def _maps(n, c, s, dtype=torch.float32, seed=0, channels_last=False, relu=False):
    """Tensor[N, C, S] with per-channel scales over four decades, optionally ReLU'd (zeros)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, s, generator=gen) * torch.logspace(-2, 2, c).view(1, c, 1) + 0.5
    x = x.clamp(min=0) if relu else x
    x = x.to(dtype)
    if channels_last:  # channels contiguous, read in place
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(DEVICE)


SHAPES = [
    pytest.param((1, 1, 1), id="minimal"),
    pytest.param((2, 3, 5), id="non-aligned"),
    pytest.param((5, 20, 1), id="1x1-spatial"),
    pytest.param((2, 33, 300), id="non-aligned-multi-tile"),
    pytest.param((4, 130, 49), id="large-two-gram-blocks"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_reference(shape, channels_last, dtype):
    _assert_matches(_maps(*shape, dtype, seed=sum(shape), channels_last=channels_last), 16)


@pytest.mark.parametrize("precision", ["3xtf32", "tf32", "ieee"])
def test_gram_precisions_meet_their_tolerance(precision):
    _assert_matches(_maps(3, 40, 64, relu=True), 64, precision)


def test_low_precision_gram_is_within_twice_torch_in_that_precision():
    """flash-attention's rule: error at most ~2x torch's doing the same in that precision."""
    x = _maps(8, 48, 250, seed=3, relu=True)
    rows = x.transpose(1, 2).reshape(-1, x.shape[1]).cpu()
    want = rows.double().T @ rows.double()

    def err(g):
        return float((g.cpu().double() - want).abs().max() / want.abs().max())

    tf32 = rows.view(torch.int32)
    tf32 = ((tf32 + 0xFFF + ((tf32 >> 13) & 1)) & -8192).view(torch.float32)
    floor = 2**-24  # below this, both are at the float32 rounding of the largest entry
    ours = err(channel_stats(x, 8, gram_precision="3xtf32").gram)
    assert ours <= 2 * max(err(rows.T @ rows), floor), ours
    ours = err(channel_stats(x, 8, gram_precision="tf32").gram)
    assert ours <= 2 * max(err(tf32.T @ tf32), floor), ours


@pytest.mark.parametrize("programs", [1, 2, 3, 7])
def test_results_do_not_depend_on_the_number_of_programs(programs):
    x = _maps(3, 9, 700, seed=4, relu=True)
    got = _assert_matches(x, 32, programs=programs)
    base = channel_stats(x, 32, programs=5)
    for name in EXACT:
        assert torch.equal(getattr(got, name), getattr(base, name)), name


@pytest.mark.parametrize("flat", [False, True], ids=["per-channel", "flat"])
@pytest.mark.parametrize("block", [(128, 1), (64, 4), (32, 8), (16, 32)])
def test_every_tile_shape_and_histogram_form_is_exact(block, flat):
    x = _maps(2, 37, 90, seed=5, channels_last=block[1] > 4)
    cfg = kernels.default_config(x, 64)._replace(
        block_m=block[0], block_c=block[1], flat_histogram=flat
    )
    _assert_matches(x, 64, programs=2, config=cfg)


def test_running_histograms_are_moved_exactly_when_the_range_grows():
    """One program sees a range that grows tile after tile (by factors up to 2**60, both
    signs), so its running histogram is re-laid out many times, then meets the batch layout."""
    m = torch.arange(2048, dtype=torch.float64)
    growth = torch.pow(2.0, m / 2048 * 60 - 30)
    signs = torch.where(m % 3 == 0, -1.0, 1.0)
    x = (signs * growth * (1 + (m % 7) / 7)).float().view(1, 1, -1)
    x = torch.cat([x, x.flip(-1), -x], 1).to(DEVICE)  # growing, shrinking, mirrored
    cfg = kernels.default_config(x, 16)._replace(block_m=128)
    for programs in (1, 3):
        _assert_matches(x, 16, programs=programs, config=cfg)


def test_gram_accumulates_float64_across_chunks():
    x = _maps(2, 3, GRAM_CHUNK + 700, seed=6) + 3.0  # several chunks in one program
    _assert_matches(x, 8, programs=1)


def test_non_finite_extreme_and_constant_values():
    x = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(3))
    x[0, 1, 2] = float("nan")
    x[1, 3, 3] = float("inf")
    x[1, 0, 0] = 3e38  # float32 Gram products would overflow without the power-of-two scale
    x[0, 0, 1] = -1e-40  # subnormal, negative: its product with 2**-k underflows to -0
    x[:, 4] = 2.5  # constant channel
    got = _assert_matches(x.to(DEVICE), 16)
    assert int(got.nonfinite) == 2
    for scale in (1e30, 1e-30):  # far from 1: scaled by a power of two, exactly
        _assert_matches(_maps(2, 6, 30, seed=7) * scale, 3)
        _assert_matches((_maps(2, 6, 30, seed=7) * scale).bfloat16(), 3)
    _assert_matches(torch.zeros(2, 3, 4, device=DEVICE), 8)


FLOAT32_EDGES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0**-126, -(2.0**-149), 2.0**127, -(2.0**100)]),
    st.builds(lambda e, s: s * 2.0**e, st.integers(-149, 127), st.sampled_from([-1.0, 1.0])),
    st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lo=FLOAT32_EDGES, hi=FLOAT32_EDGES, mid=FLOAT32_EDGES, bins=st.sampled_from([2, 3, 64]))
def test_layouts_equal_bin_layout_at_float32_edges(lo, hi, mid, bins):
    """The in-kernel float64 layout (batch and running) is bin_layout, bit for bit."""
    lo, hi = min(lo, hi), max(lo, hi)
    mid = min(max(mid, lo), hi)
    x = torch.tensor([[[lo, mid, hi, mid]]], dtype=torch.float32).to(DEVICE)
    got = channel_stats(x, bins, gram=False)
    k, off = bin_layout(x.double().amin(-1).view(1), x.double().amax(-1).view(1), bins)
    assert torch.equal(got.bin_exponent, k) and torch.equal(got.bin_offset, off)
    want = channel_stats_ref(x, bins)
    assert torch.equal(got.counts, want.counts)
    scale = float(x.double().abs().sum())
    assert float((got.sums - want.sums).abs().max()) <= SUM_RTOL * scale  # no fp32 overflow


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 20),
    s=st.integers(1, 60),
    bins=st.sampled_from([2, 3, 16, 64, 100]),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
    relu=st.booleans(),
    programs=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_the_reference(
    n, c, s, bins, scale, dtype, channels_last, relu, programs, seed
):
    x = _maps(n, c, s, torch.float32, seed, channels_last, relu) * scale
    _assert_matches(x.to(dtype), bins, programs=programs)


def test_reference_is_channel_stats_torch_path():
    """channel_stats_ref bins every float64 sample by bin_layout of its channel's range."""
    x = _maps(2, 4, 11, seed=8, relu=True)
    ref = channel_stats_ref(x, 8)
    samples = x.double().transpose(0, 1).reshape(4, -1)
    k, off = bin_layout(samples.amin(1), samples.amax(1), 8)
    index = torch.floor(torch.ldexp(samples, -k[:, None].double())).long() - off[:, None]
    counts = torch.zeros(4, 8, dtype=torch.int64, device=x.device).scatter_add_(
        1, index, torch.ones_like(index)
    )
    assert torch.equal(ref.counts, counts) and torch.equal(ref.bin_exponent, k)
    torch.testing.assert_close(ref.gram, samples @ samples.T, rtol=1e-14, atol=0)


def test_statistics_pass_alone_and_named_fields():
    x = _maps(2, 6, 10)
    out = channel_stats(x, 16, gram=False)
    assert out.gram is None and out.counts.shape == (6, 16)
    assert out.nonfinite.dim() == 0 and out.nonfinite.dtype == torch.int64
    assert int(out.counts.sum()) == 6 * 20


@pytest.mark.parametrize(
    ("x", "kw", "pattern"),
    [
        (torch.ones(2, 3), {}, r"Tensor\[N, C, S\]"),
        (torch.ones(2, 3, 4, dtype=torch.float64), {}, "float64"),
        (torch.ones(2, 3, 4), {"bins": 1}, r"bins must be an int in \[2, 8192\]"),
        (torch.ones(2, 3, 4), {"bins": 8193}, r"bins must be an int in \[2, 8192\]"),
        (torch.ones(2, 3, 4), {"bins": 8.0}, "bins must be an int"),
        (torch.ones(0, 3, 4), {}, "empty batch"),
        (torch.ones(2, 3, 4), {"gram_precision": "fp16"}, "gram_precision must be one of"),
        (torch.ones(2, 3, 4), {"programs": 0}, "programs must be an int >= 1"),
        (torch.ones(2, 3, 4), {"config": "block_c=3"}, "block_m and block_c must be powers"),
        (torch.ones(2, 3, 4), {"config": "block_g=8"}, "block_g and block_k must be powers"),
        (torch.ones(2, 3, 4), {"config": "block_c=32", "bins": 2048}, "histogram slots"),
    ],
)
def test_launcher_rejects_impossible_input(x, kw, pattern):
    x = x.to(DEVICE)
    kw = dict(kw)
    bins = kw.pop("bins", 8)
    if "config" in kw:
        field, value = kw["config"].split("=")
        kw["config"] = kernels.default_config(x, 8)._replace(**{field: int(value)})
    with pytest.raises(ValueError, match=pattern):
        channel_stats(x, bins, **kw)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"is on cpu.*TRITON_INTERPRET=1"):
        channel_stats(torch.ones(2, 3, 4), 8)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))


def test_default_config_follows_the_memory_layout():
    nchw = torch.empty(2, 64, 49)
    last = nchw.transpose(1, 2).contiguous().transpose(1, 2)
    assert kernels.default_config(nchw, 64).block_c == 4
    assert kernels.default_config(last, 64).block_c * 4 >= 32  # >= 32 contiguous bytes
    assert kernels.default_config(last.half(), 4096).block_c * 4096 <= 2 * kernels.MAX_BINS
    cfg = kernels.default_config(torch.empty(1, 2048, 1), 64)
    assert isinstance(cfg, KernelConfig) and cfg.block_g == 128
    assert math.log2(cfg.block_m).is_integer()


def test_very_wide_layer_with_tiny_maps():
    """Many channel blocks, one sample each (the statistics pass; the Gram of C > 128 is in
    the 'large-two-gram-blocks' shape)."""
    x = torch.randn(1, 1500, 1, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = channel_stats(x, 4, gram=False)
    want = channel_stats_ref(x, 4)
    for name in EXACT:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_gram_is_symmetric_whatever_the_partials_hold(monkeypatch):
    """A diagonal block's tensor-core product need not be bit-symmetric: the finish writes each
    entry once and its mirror from the same value. A fake partial kernel writes asymmetric
    partials; the Gram matrix must still be exactly symmetric."""
    from icprune.kernels import gram as gram_kernels

    class Skewed:
        def __getitem__(self, grid):
            def launch(x, flags, part, *args, **kwargs):
                gen = torch.Generator().manual_seed(0)
                part.copy_(torch.rand(part.shape, generator=gen).to(part.device))

            return launch

    monkeypatch.setattr(gram_kernels, "_gram", Skewed())
    x = torch.randn(2, 150, 9, device=DEVICE)  # two channel blocks: diagonal and off-diagonal
    gram = channel_stats(x, 16).gram
    assert not torch.equal(gram, torch.zeros_like(gram))
    assert torch.equal(gram, gram.T)
