"""Every ChannelStats backend against the torch reference, and the backend choice."""

import ctypes
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icprune.stats import backends
from icprune.stats.backends import HAVE_TRITON, resolve_backend
from icprune.stats.channel_stats import ChannelStats

HAVE_CUDA = torch.cuda.is_available()
# Backends that can run here: the C++ path when built, Triton on CUDA or under the interpreter.
FAST = [
    pytest.param("cpp", marks=pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="no Triton")),
]
#: Gram matrix of a fast backend (float32 per batch) vs the float64 reference, relative to its
#: largest entry; sums likewise. Counts, layouts and extremes are exact.
GRAM_RTOL = 1e-5


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and HAVE_CUDA else "cpu"


def _pair(backend, x, **kw):
    dev = _device(backend)
    fast = ChannelStats(x.shape[1], name="layer.x", device=dev, backend=backend, **kw)
    ref = ChannelStats(x.shape[1], name="layer.x", device=dev, backend="torch", **kw)
    return fast, ref


def _assert_close(fast: ChannelStats, ref: ChannelStats) -> None:
    assert fast.count == ref.count and fast.nonfinite == ref.nonfinite
    for key in ("counts", "bin_exponent", "bin_offset", "minimum", "maximum"):
        assert torch.equal(getattr(fast, key), getattr(ref, key)), key
    for key in ("gram", "sums"):
        want = getattr(ref, key)
        tol = GRAM_RTOL * float(want.abs().max().clamp(min=1e-30))
        torch.testing.assert_close(getattr(fast, key), want, rtol=GRAM_RTOL, atol=tol, msg=key)


def _maps(seed, shape, dtype=torch.float32, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen) * torch.logspace(-2, 2, c).view(
        1, c, *[1] * (len(shape) - 2)
    )
    x = x.to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("range_mode", ["layer", "channel"])
def test_backend_matches_the_reference_over_several_batches(
    backend, dtype, channels_last, range_mode
):
    fast, ref = _pair(backend, _maps(0, (1, 6, 1, 1)), range_mode=range_mode)
    for seed, scale in [(1, 1.0), (2, 30.0), (3, 0.01)]:  # the range grows, then holds
        x = (_maps(seed, (3, 6, 5, 4), dtype, channels_last) * scale).to(_device(backend))
        fast.update(x)
        ref.update(x)
    _assert_close(fast, ref)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(4, 1, 3, 3), (2, 7), (3, 130, 1, 1), (1, 3, 40, 50)])
def test_odd_shapes(backend, shape):
    fast, ref = _pair(backend, torch.zeros(shape))
    x = _maps(4, shape).to(_device(backend))
    fast.update(x)
    ref.update(x)
    _assert_close(fast, ref)


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
def test_cpp_reads_float64_and_strided_views():
    x = _maps(5, (4, 6, 8, 8), torch.float64)
    for view in (x, x[:, :, ::2, 1:], x.transpose(2, 3)):
        fast, ref = _pair("cpp", view)
        fast.update(view)
        ref.update(view)
        _assert_close(fast, ref)


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    c=st.integers(1, 40),
    spatial=st.sampled_from([(), (1, 1), (3, 5), (9, 9)]),
    bins=st.sampled_from([2, 5, 64]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpp_random_shapes_match_the_reference(n, c, spatial, bins, channels_last, seed):
    x = _maps(seed, (n, c, *spatial), channels_last=channels_last and len(spatial) == 2)
    fast, ref = _pair("cpp", x, bins=bins)
    fast.update(x)
    ref.update(x)
    _assert_close(fast, ref)


@pytest.mark.parametrize("backend", FAST)
def test_nan_policies(backend):
    x = _maps(6, (2, 4, 3, 3)).to(_device(backend))
    x[1, 2, 0, 0] = float("nan")
    x[0, 3, 1, 1] = float("-inf")
    fast, ref = _pair(backend, x, nan_policy="zero")
    fast.update(x)
    ref.update(x)
    _assert_close(fast, ref)
    assert fast.nonfinite == 2
    strict = ChannelStats(4, name="layer3.conv", device=x.device, backend=backend)
    with pytest.raises(ValueError, match=r"layer 'layer3\.conv'.*non-finite.*nan_policy"):
        strict.update(x)  # raises here on the CPU; on CUDA at the next read (no host sync)
        strict.entropy()


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
def test_cpp_gram_survives_data_far_from_one():
    for scale in (1e30, 1e-30):
        x = _maps(7, (2, 3, 4, 4)) * scale
        fast, ref = _pair("cpp", x)
        fast.update(x)
        ref.update(x)
        _assert_close(fast, ref)
        assert torch.isfinite(fast.gram).all()


def test_auto_picks_the_fast_backend_for_the_device():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == ("cpp" if backends.HAVE_EXT else "torch")
    assert resolve_backend("auto", torch.device("meta")) == "torch"
    if HAVE_CUDA:
        cuda = torch.device("cuda")
        assert resolve_backend("auto", cuda) == ("triton" if HAVE_TRITON else "torch")
        assert resolve_backend("auto", cuda, dtype=torch.float64) == "torch"


def test_forced_backends_that_cannot_run_say_why(monkeypatch):
    with pytest.raises(ValueError, match="layer 'my.conv': backend must be one of"):
        ChannelStats(3, name="my.conv", backend="cuda")
    with pytest.raises(ValueError, match="backend='cpp' reads CPU memory.*on meta"):
        ChannelStats(3, name="my.conv", device="meta", backend="cpp")
    monkeypatch.setattr(backends, "HAVE_EXT", False)
    with pytest.raises(ValueError, match="backend='cpp' but the C\\+\\+ extension"):
        ChannelStats(3, name="my.conv", backend="cpp")
    monkeypatch.setattr(backends, "HAVE_TRITON", False)
    with pytest.raises(ValueError, match="backend='triton' but Triton is not installed"):
        ChannelStats(3, name="my.conv", backend="triton")
    monkeypatch.setattr(backends, "HAVE_TRITON", True)
    if not HAVE_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
            ChannelStats(3, name="my.conv", backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    s = ChannelStats(3, name="my.conv", backend="torch")
    s.backend = "triton"
    with pytest.raises(ValueError, match="reads float16/bfloat16/float32.*got float64"):
        s.update(torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.gpu
def test_cuda_updates_never_synchronise_with_the_host():
    pytest.importorskip("triton")
    x = _maps(8, (4, 16, 8, 8)).cuda()
    s = ChannelStats(16, name="layer.gpu", device="cuda")
    s.update(x)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            s.update(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.count == 4 * 4 * 64


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)
    ).eval()


@pytest.mark.parametrize("backend", FAST)
def test_calibrate_with_a_fast_backend_equals_the_reference(backend):
    from icprune.calibrate import calibrate

    net = _tiny_net().to(_device(backend))
    data = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    data = [x.to(_device(backend)) for x in data]
    fast = calibrate(net, data, backend=backend, progress=False)
    ref = calibrate(net, data, backend="torch", progress=False)
    assert list(fast) == list(ref) == ["0"]
    assert fast["0"].backend == backend
    _assert_close(fast["0"], ref["0"])


@pytest.mark.skipif(not HAVE_TRITON, reason="no Triton")
def test_calibrate_reports_device_side_non_finite_values_at_the_end():
    from icprune.calibrate import calibrate

    net = _tiny_net().to(_device("triton"))
    bad = torch.full((1, 3, 6, 6), float("nan"), device=_device("triton"))
    with pytest.raises(ValueError, match=r"layer '0'.*non-finite.*found on the device"):
        calibrate(net, [bad], backend="triton", progress=False)


def _poison_syrk_lower_triangle(monkeypatch) -> None:
    """The CPU Gram's BLAS made to leave garbage below the diagonal of every syrk block (a BLAS
    may leave anything there), and its result buffer to start as garbage (the lower blocks are
    never written): the tests below then fail if a backend ever reads that triangle."""
    from icprune.stats import gram

    real_syrk, real_empty = gram.Blas.syrk, np.empty

    def syrk(self, trans, n, k, a, lda, beta, c, ldc):
        real_syrk(self, trans, n, k, a, lda, beta, c, ldc)
        kind = ctypes.c_float if self.itemsize == 4 else ctypes.c_double
        memory = np.ctypeslib.as_array((kind * ((n - 1) * ldc + n)).from_address(c))
        size = self.itemsize
        block = np.lib.stride_tricks.as_strided(memory, (n, n), (ldc * size, size))
        block[np.triu_indices(n, 1)] = 12345.0  # column-major: block[j, i] is entry (i, j)

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.dtype.kind == "f":
            out.fill(12345.0)
        return out

    monkeypatch.setattr(gram.Blas, "syrk", syrk)
    monkeypatch.setattr(np, "empty", empty)


@pytest.mark.parametrize(
    "layout",
    ["channels_last", "long_planes", "short_planes", "float64", "blocks"],
)
def test_cpp_gram_is_exactly_symmetric_whatever_the_blas(monkeypatch, layout):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 16, 16, generator=gen)  # 256 values per plane >= 32 * 4: long planes
    if layout == "blocks":  # 300 channels: three block columns, lower blocks never written
        x = torch.randn(3, 300, 3, 3, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "short_planes":
        x = x[:, :, :2, :2].contiguous()
    elif layout == "float64":
        x = x.double()
    _poison_syrk_lower_triangle(monkeypatch)
    c = x.shape[1]
    x3 = x.reshape(3, c, -1)
    gram = backends.gram_matrix(x3, float(x.abs().max()))
    assert torch.equal(gram, gram.T)
    samples = x3.transpose(0, 1).reshape(c, -1).double()
    torch.testing.assert_close(gram, samples @ samples.T, rtol=1e-5, atol=1e-5 * float(gram.max()))
    if backends.HAVE_EXT:
        s = ChannelStats(c, name="layer.x", backend="cpp")
        s.update(x)
        s.update(x)  # the second add reads the packed total, never a lower triangle
        assert torch.equal(s.gram, s.gram.T) and torch.equal(s.distance(), s.distance().T)
        assert torch.equal(s.correlation(), s.correlation().T)
        torch.testing.assert_close(s.gram, 2 * gram, rtol=1e-6, atol=0)


# --------------------------------------------------------------- names across the C++ boundary


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
def test_the_compiled_binning_constants_are_the_python_ones():
    from icprune.stats import binning

    assert backends.ext.BINNING_CONSTANTS == {
        "K_MIN": binning.K_MIN,
        "INDEX_BITS": binning.INDEX_BITS,
        "MAX_SHIFT": binning.MAX_SHIFT,
    }
    backends.check_compiled_constants(backends.ext.BINNING_CONSTANTS)  # no error


@pytest.mark.parametrize(
    "compiled",
    [
        None,  # a stale build without the constants
        {"K_MIN": -121, "INDEX_BITS": 40, "MAX_SHIFT": 62},
        {"K_MIN": -120, "INDEX_BITS": 40},
    ],
)
def test_drifted_compiled_constants_are_refused(compiled):
    with pytest.raises(ImportError, match="binning constants"):
        backends.check_compiled_constants(compiled)


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
def test_the_cpp_launcher_returns_its_results_by_name():
    x = _maps(3, (2, 5, 7, 3))
    out = backends.ext.channel_stats(x.reshape(2, 5, -1).numpy(), 2, 16)
    fields = set(backends.BatchStats._fields)
    assert isinstance(out, dict) and set(out) == fields - {"gram"}
    batch = backends.cpp_batch(x, 16)
    ref = backends.torch_batch(x, 16)
    for key in ("counts", "bin_exponent", "bin_offset", "minimum", "maximum", "nonfinite"):
        got, want = getattr(batch, key), getattr(ref, key)
        assert torch.equal(got, want) if key != "nonfinite" else got == want, key


def test_the_torch_backend_is_the_one_reference():
    """ChannelStats(backend="torch") adds exactly torch_batch's statistics, and the kernels'
    reference is torch_batch too."""
    x = _maps(5, (3, 4, 6, 6))
    x[0, 1, 2, 2] = float("nan")
    stats = ChannelStats(4, bins=32, range_mode="channel", nan_policy="zero", backend="torch")
    stats.update(x)
    ref = backends.torch_batch(x, 32)
    assert stats.nonfinite == ref.nonfinite == 1
    for key in ("counts", "bin_exponent", "bin_offset", "minimum", "maximum", "sums", "gram"):
        assert torch.equal(getattr(stats, key), getattr(ref, key)), key
    assert backends.BATCH_FUNCTIONS["torch"] is backends.torch_batch


# ------------------------------------------------ the fused CPU update: same bits, any threads


def _batches(layout: str, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    shapes = [(3, 24, 9, 9), (5, 24, 9, 9), (2, 24, 9, 9)]
    out = [(torch.randn(s, generator=gen) * 3 + 1).relu_() - 0.5 for s in shapes]
    if layout == "channels_last":
        out = [x.contiguous(memory_format=torch.channels_last) for x in out]
    return [x.to(dtype) for x in out]


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("range_mode", ["layer", "channel"])
def test_fused_cpp_update_equals_the_batch_path_bit_for_bit(monkeypatch, layout, range_mode):
    """ChannelStats' one-call C++ update (batch pass + merge) gives the bits of computing the
    BatchStats first and adding them with the torch code of _add."""
    batches = _batches(layout, torch.float32)
    fused = ChannelStats(24, range_mode=range_mode, name="l", backend="cpp")
    for x in batches:
        fused.update(x)
    from icprune.stats import channel_stats as module

    monkeypatch.setattr(module, "HAVE_EXT", False)  # -> BatchStats + torch merge
    slow = ChannelStats(24, range_mode=range_mode, name="l", backend="cpp")
    for x in batches:
        slow.update(x)
    for key in ("counts", "bin_exponent", "bin_offset", "minimum", "maximum", "sums", "sums_lo"):
        assert torch.equal(getattr(fused, key), getattr(slow, key)), key
    assert fused.count == slow.count
    # The Gram terms come from the same syrk: the packed totals are the same bits too.
    assert torch.equal(fused.gram_packed, slow.gram_packed)


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels, side", [(24, 80), (300, 7)])
def test_cpu_statistics_do_not_depend_on_the_thread_count(layout, channels, side):
    """torch/OpenMP threads (the Gram's block workers too) and BLAS threads 1, 2 and 3: the same
    state, bit for bit (the C++ pass splits work into fixed chunks reduced in order; the Gram is
    cut into blocks fixed by the shape, each on one BLAS thread). 24 x 80 x 80 is above the C++
    pass's one-thread limit (2**20 values); 300 channels are cut into Gram blocks."""
    from threadpoolctl import threadpool_limits

    gen = torch.Generator().manual_seed(12)
    batches = [torch.randn(n, channels, side, side, generator=gen).relu_() - 0.3 for n in (7, 2)]
    if layout == "channels_last":
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    states = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with threadpool_limits(threads):
                s = ChannelStats(channels, name="l", backend="cpp")
                for x in batches:
                    s.update(x)
                states.append(s.state_dict())
    finally:
        torch.set_num_threads(before)
    for state in states[1:]:
        for key, value in states[0].items():
            other = state[key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.skipif(not backends.HAVE_EXT, reason="no icprune._C")
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 70),
    spatial=st.sampled_from([(), (1,), (3, 5), (16, 16)]),
    bins=st.sampled_from([2, 7, 64]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpp_pass_without_histograms_matches_the_reference(
    n, c, spatial, bins, channels_last, seed
):
    x = torch.randn(n, c, *spatial, generator=torch.Generator().manual_seed(seed))
    if channels_last and len(spatial) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    out = backends.ext.channel_stats(x.reshape(n, c, -1).numpy(), 2, bins, False)
    ref = backends.torch_batch(x, bins)
    assert not out["counts"].any()
    for key in ("bin_exponent", "bin_offset", "minimum", "maximum"):
        assert torch.equal(torch.from_numpy(out[key]), getattr(ref, key)), key
    torch.testing.assert_close(
        torch.from_numpy(out["sums"]), ref.sums, rtol=1e-12, atol=1e-12 * float(x.abs().sum())
    )
