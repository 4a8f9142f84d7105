import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icprune.extension import HAVE_EXT
from icprune.scoring import layer_scores
from icprune.stats import compensated, packed
from icprune.stats.backends import RUNNING_KEYS
from icprune.stats.binning import K_MIN, bin_layout
from icprune.stats.channel_stats import PARTS, ChannelStats

# Gram matrices of the same data summed in another order agree to fp64 round-off.
GRAM_RTOL = 1e-12
DATA = Path(__file__).parent.parent / "data"


def _features(seed: int, n=12, c=5, h=4, w=3, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 2, c)[None, :, None, None]
    shift = torch.linspace(-3, 3, c)[None, :, None, None]
    return (torch.randn(n, c, h, w, generator=gen) * scale + shift).to(dtype)


def _stats(x, bins=16, range_mode="layer", **kw) -> ChannelStats:
    kw.setdefault("backend", "torch")  # the reference; other backends: test_backends.py
    s = ChannelStats(x.shape[1], bins=bins, range_mode=range_mode, name="layer.test", **kw)
    s.update(x)
    return s


def _assert_same(a: ChannelStats, b: ChannelStats) -> None:
    assert a.count == b.count
    assert torch.equal(a.counts, b.counts), (a.counts - b.counts).nonzero()
    assert torch.equal(a.bin_exponent, b.bin_exponent)
    assert torch.equal(a.bin_offset, b.bin_offset)
    assert torch.equal(a.minimum, b.minimum) and torch.equal(a.maximum, b.maximum)
    scale = a.gram.abs().max()
    torch.testing.assert_close(a.gram, b.gram, rtol=GRAM_RTOL, atol=GRAM_RTOL * scale)
    torch.testing.assert_close(a.sums, b.sums, rtol=GRAM_RTOL, atol=GRAM_RTOL * a.sums.abs().max())


def _brute_force_counts(x: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """Histogram with Python floats and math.floor, one value at a time."""
    rows = x.double().movedim(1, -1).reshape(-1, x.shape[1]).T.tolist()
    out = torch.zeros_like(stats.counts)
    for c, row in enumerate(rows):
        k, off = int(stats.bin_exponent[c]), int(stats.bin_offset[c])
        for v in row:
            out[c, math.floor(math.ldexp(v, -k)) - off] += 1
    return out


@pytest.mark.parametrize("range_mode", ["layer", "channel"])
def test_counts_equal_a_brute_force_histogram(range_mode):
    x = _features(0)
    s = _stats(x, range_mode=range_mode)
    assert torch.equal(s.counts, _brute_force_counts(x, s))
    assert torch.all(s.counts.sum(1) == x.numel() // x.shape[1])


def test_layer_mode_shares_one_layout_and_channel_mode_has_its_own():
    x = _features(1)
    layer, channel = _stats(x, range_mode="layer"), _stats(x, range_mode="channel")
    lo, hi = x.double().amin((0, 2, 3)), x.double().amax((0, 2, 3))
    k, off = bin_layout(lo.min()[None], hi.max()[None], 16)
    assert torch.all(layer.bin_exponent == k) and torch.all(layer.bin_offset == off)
    k, off = bin_layout(lo, hi, 16)
    assert torch.equal(channel.bin_exponent, k) and torch.equal(channel.bin_offset, off)
    assert len(set(channel.bin_exponent.tolist())) > 1


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 24),
    c=st.integers(1, 7),
    spatial=st.sampled_from([(), (1,), (3,), (2, 3), (1, 1), (2, 2, 2)]),
    bins=st.sampled_from([2, 3, 16, 64]),
    range_mode=st.sampled_from(["layer", "channel"]),
    data=st.data(),
)
def test_any_split_order_and_merge_gives_the_single_batch_result(
    seed, n, c, spatial, bins, range_mode, data
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=gen) * torch.logspace(-3, 3, c).view(
        1, c, *[1] * len(spatial)
    )
    whole = _stats(x, bins, range_mode)
    cuts = sorted(data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=4, unique=True)))
    pieces = [p for p in torch.tensor_split(x, [k for k in cuts if k < n]) if p.shape[0]]
    order = data.draw(st.permutations(range(len(pieces))))
    streamed = ChannelStats(c, bins=bins, range_mode=range_mode, name="layer.test", backend="torch")
    for i in order:
        streamed.update(pieces[i])
    _assert_same(whole, streamed)
    merged = [_stats(pieces[i], bins, range_mode) for i in order]
    while len(merged) > 1:  # merge as a tree, pairing neighbours
        merged = [
            merged[i].merge(merged[i + 1]) if i + 1 < len(merged) else merged[i]
            for i in range(0, len(merged), 2)
        ]
    _assert_same(whole, merged[0])


def test_merging_into_an_empty_instance_and_merging_an_empty_one_are_identities():
    x = _features(2)
    whole = _stats(x)
    empty = ChannelStats(5, bins=16, name="layer.test")
    _assert_same(whole, empty.merge(_stats(x)))
    _assert_same(whole, _stats(x).merge(ChannelStats(5, bins=16, name="layer.test")))


def test_channels_last_and_contiguous_give_the_same_statistics():
    x = _features(3)
    _assert_same(_stats(x), _stats(x.to(memory_format=torch.channels_last)))
    _assert_same(_stats(x), _stats(x.transpose(2, 3)[..., :, :].transpose(2, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs_are_binned_exactly_as_their_values(dtype):
    x = _features(4, dtype=dtype)
    _assert_same(_stats(x), _stats(x.double()))


def test_linear_layer_input_of_shape_n_by_c():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(5))
    s = _stats(x)
    assert s.count == 50
    torch.testing.assert_close(s.gram, x.double().T @ x.double())


def test_entropy_matches_numpy():
    x = _features(6)
    s = _stats(x)
    p = s.counts.numpy() / s.count
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    np.testing.assert_allclose(s.entropy().numpy(), expected, rtol=1e-12)
    assert torch.all(s.entropy() <= math.log(16) + 1e-12)


def test_correlation_and_distance_match_torch():
    x = _features(7)
    s = _stats(x)
    rows = x.double().movedim(1, 0).reshape(5, -1)
    torch.testing.assert_close(s.correlation(), torch.corrcoef(rows), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.distance(), torch.cdist(rows, rows), rtol=1e-9, atol=1e-9)
    assert torch.equal(s.correlation(), s.correlation().T)


def test_channel_mode_entropy_is_invariant_to_power_of_two_scaling_and_layer_mode_is_not():
    x = _features(8)
    scaled = x.clone()
    scaled[:, 4] *= 2.0**-10  # the widest channel shrinks to a sliver of the layer's range
    channel, channel_scaled = _stats(x, range_mode="channel"), _stats(scaled, range_mode="channel")
    assert torch.equal(channel.entropy(), channel_scaled.entropy())
    layer, layer_scaled = _stats(x, range_mode="layer"), _stats(scaled, range_mode="layer")
    assert layer_scaled.entropy()[4] < layer.entropy()[4] - 0.5


@pytest.mark.parametrize("value", [0.0, 0.1, -7.5, 3e38])
def test_constant_channels_give_finite_values(value):
    x = _features(9)
    x[:, 1] = value
    for mode in ("layer", "channel"):
        s = _stats(x, range_mode=mode)
        assert torch.all(torch.isfinite(s.entropy())) and torch.all(torch.isfinite(s.correlation()))
        assert torch.all(torch.isfinite(s.distance()))
        assert s.entropy()[1] == 0.0
        assert s.constant().tolist() == [False, True, False, False, False]
        assert torch.all(s.correlation()[1, [0, 2, 3, 4]] == 0) and s.correlation()[1, 1] == 1


def test_all_constant_layer_and_all_zero_layer():
    for value in (0.0, 2.5):
        s = _stats(torch.full((4, 3, 2, 2), value))
        assert torch.equal(s.entropy(), torch.zeros(3, dtype=torch.float64))
        assert torch.equal(s.correlation(), torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_raise_naming_the_layer(bad):
    x = _features(10)
    x[3, 2, 1, 1] = bad
    s = ChannelStats(5, name="layer3.0.conv2")
    with pytest.raises(
        ValueError, match=r"layer '?layer3\.0\.conv2'?.*non-finite.*channel\(s\) \[2\].*nan_policy"
    ):
        s.update(x)
    assert s.count == 0 and s.counts.sum() == 0  # nothing half-added


def test_nan_policy_zero_counts_and_scores_them_as_zeros():
    x = _features(11)
    x[0, 0, 0, 0] = float("nan")
    x[1, 4, 0, 0] = float("inf")
    s = _stats(x, nan_policy="zero")
    assert s.nonfinite == 2
    _assert_same(s, _stats(torch.nan_to_num(x, nan=0.0, posinf=0.0)))


def test_empty_tensor_is_a_no_op_and_estimators_need_samples():
    s = ChannelStats(3, name="empty.layer")
    s.update(torch.zeros(0, 3, 4, 4))
    s.update(torch.zeros(2, 3, 0))
    assert s.count == 0
    with pytest.raises(ValueError, match="empty.layer.*at least 1 sample"):
        s.entropy()
    s.update(torch.ones(1, 3))
    with pytest.raises(ValueError, match="empty.layer.*correlation needs at least 2"):
        s.correlation()


@pytest.mark.parametrize(
    ("x", "error", "pattern"),
    [
        (torch.ones(2, 3, dtype=torch.int64), TypeError, "dtype torch.int64.*cast"),
        (torch.ones(2, 3, dtype=torch.complex64), TypeError, "dtype torch.complex64"),
        (torch.ones(2, 4), ValueError, r"shape \(N, 3, \*spatial\), got \(2, 4\)"),
        (torch.ones(3), ValueError, r"got \(3,\)"),
        ([[1.0, 2.0, 3.0]], TypeError, "expected a torch.Tensor, got list"),
    ],
)
def test_bad_input_raises_a_clear_error(x, error, pattern):
    with pytest.raises(error, match=f"layer 'my.conv'.*{pattern}"):
        ChannelStats(3, name="my.conv").update(x)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_channels": 0}, "num_channels must be an int >= 1"),
        ({"num_channels": True}, "num_channels must be an int >= 1, got True"),
        ({"bins": 1}, r"bins must be an int in \[2, 65536\]"),
        ({"bins": 2**40}, r"bins must be an int in \[2, 65536\], got 1099511627776"),
        ({"range_mode": "global"}, "range_mode must be one of"),
        ({"nan_policy": "omit"}, "nan_policy must be one of"),
    ],
)
def test_bad_settings_raise(kwargs, pattern):
    kw = {"num_channels": 3, "name": "my.conv", **kwargs}
    with pytest.raises(ValueError, match=f"my.conv.*{pattern}"):
        ChannelStats(**kw)


def test_merge_refuses_incompatible_statistics():
    a = ChannelStats(3, bins=16, name="a")
    for other in (
        ChannelStats(4, bins=16),
        ChannelStats(3, bins=8),
        ChannelStats(3, bins=16, range_mode="channel"),
        ChannelStats(3, bins=16, read_at="weights"),
    ):
        with pytest.raises(ValueError, match="layer 'a': cannot merge"):
            a.merge(other)
    with pytest.raises(TypeError, match="can only merge a ChannelStats"):
        a.merge({"count": 1})


def test_state_dict_round_trips_bit_identically_through_a_weights_only_load():
    x = _features(12)
    s = _stats(x, read_at="bn", nan_policy="zero")
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    restored = ChannelStats.from_state_dict(
        torch.load(buffer, weights_only=True), backend=s.backend
    )
    assert restored.name == s.name and restored.read_at == "bn" and restored.nan_policy == "zero"
    for key, value in s.state_dict().items():
        other = restored.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    # Restored statistics keep streaming exactly like the original.
    more = _features(13) * 10
    s.update(more)
    restored.update(more)
    _assert_same(s, restored)
    assert torch.equal(s.gram, restored.gram)


def test_load_state_dict_refuses_mismatches():
    state = _stats(_features(14)).state_dict()
    with pytest.raises(ValueError, match="saved statistics have"):
        ChannelStats(5, bins=8, name="x").load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        ChannelStats(5, bins=16).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="'gram' has the wrong type or shape"):
        ChannelStats(5, bins=16).load_state_dict({**state, "gram": torch.zeros(2, 2)})


def test_statistics_refuse_data_from_another_device():
    s = ChannelStats(3, name="dev.layer", device="meta")
    with pytest.raises(ValueError, match="dev.layer.*on cpu but the statistics are on meta"):
        s.update(torch.ones(2, 3))


def _assert_identical(a: ChannelStats, b: ChannelStats) -> None:
    """Every tensor of the two state dicts bit-identical, and the same scores."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), (key, (value - sb[key]).abs().max())
        else:
            assert value == sb[key], key
    if a.count >= 2 and a.parts == PARTS:
        for independence in ("distance", "correlation"):
            sa_, sb_ = (layer_scores(s, independence=independence) for s in (a, b))
            assert torch.equal(sa_.score, sb_.score)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    c=st.integers(1, 6),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(["torch", "cpp"]),
    kept=st.sampled_from([PARTS, ("gram",), ("histogram",), ()]),
    data=st.data(),
)
def test_sums_and_gram_are_bit_identical_for_any_distribution_of_batches(
    seed, sizes, c, scale, dtype, backend, kept, data
):
    """One instance fed every batch in order == batches dealt to several instances in any order,
    merged in any order: sums, gram (plain float64 sums would differ in the last bits), counts
    and scores, bit for bit."""
    if backend == "cpp" and not HAVE_EXT:
        backend = "torch"
    gen = torch.Generator().manual_seed(seed)
    shift = torch.linspace(-2, 2, c).view(1, c, 1)
    batches = [
        ((torch.randn(n, c, 5, generator=gen, dtype=torch.float64) + shift) * scale).to(dtype)
        for n in sizes
    ]
    one_pass = ChannelStats(c, bins=16, name="layer.test", backend=backend, parts=kept)
    for x in batches:
        one_pass.update(x)
    parts = data.draw(st.integers(1, 4))
    owner = data.draw(
        st.lists(st.integers(0, parts - 1), min_size=len(batches), max_size=len(batches))
    )
    order = data.draw(st.permutations(range(len(batches))))
    pieces = [
        ChannelStats(c, bins=16, name="layer.test", backend=backend, parts=kept)
        for _ in range(parts)
    ]
    for i in order:
        pieces[owner[i]].update(batches[i])
    merge_order = data.draw(st.permutations(range(parts)))
    merged = ChannelStats(c, bins=16, name="layer.test", backend=backend, parts=kept)
    for i in merge_order:
        merged.merge(pieces[i])
    _assert_identical(one_pass, merged)


def test_plain_float64_accumulation_would_not_be_split_independent():
    """Guards the test above: the same batch contributions summed in plain float64 in two
    orders differ, so bit-identity there is the compensated sum's doing."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 6, 5, generator=gen, dtype=torch.float64) for _ in range(8)]
    grams = [x.movedim(1, -1).reshape(-1, 6).T @ x.movedim(1, -1).reshape(-1, 6) for x in batches]
    forward, backward = (
        torch.zeros(6, 6, dtype=torch.float64),
        torch.zeros(6, 6, dtype=torch.float64),
    )
    for g in grams:
        forward += g
    for g in reversed(grams):
        backward += g
    assert not torch.equal(forward, backward)
    a = ChannelStats(6, name="layer.test", backend="torch")
    b = ChannelStats(6, name="layer.test", backend="torch")
    for x in batches:
        a.update(x)
    for x in reversed(batches):
        b.update(x)
    _assert_identical(a, b)


def test_version_1_state_is_refused_with_a_clear_message():
    state = _stats(_features(15)).state_dict()
    old = {k: v for k, v in state.items() if k not in ("sums_lo", "gram_lo")}
    old["version"] = 1
    with pytest.raises(ValueError, match="version 1.*recompute"):
        ChannelStats(5, bins=16).load_state_dict(old)


# ---------------------------------------------------------------- symmetry by construction


def _skew_square_products(monkeypatch) -> None:
    """Make every square ``@`` product slightly asymmetric, as MKL's ``A @ A.T`` is on AVX-512
    CPUs: the test then fails on any CPU if icprune trusts the BLAS to be symmetric."""
    matmul = torch.Tensor.__matmul__

    def skewed(a, b):
        out = matmul(a, b)
        if out.dim() == 2 and out.shape[0] == out.shape[1]:
            out = out + torch.triu(out, 1) * 2.0**-30
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", skewed)


def _assert_symmetric(s: ChannelStats) -> None:
    for matrix in (s.gram, s.gram_lo, s.correlation(), s.distance()):
        assert torch.equal(matrix, matrix.T)


def test_gram_correlation_and_distance_are_exactly_symmetric_whatever_the_blas(monkeypatch):
    _skew_square_products(monkeypatch)
    s = _stats(_features(40))
    s.update(_features(41))
    _assert_symmetric(s)


def test_the_gram_matrix_is_kept_as_one_packed_triangle():
    a, b = _stats(_features(42)), _stats(_features(43))
    assert a.gram_packed.shape == a.gram_packed_lo.shape == (5 * 6 // 2,)
    j, i = torch.tril_indices(5, 5)
    assert torch.equal(a.gram[j, i], a.gram_packed) and torch.equal(a.gram[i, j], a.gram_packed)
    a.merge(b)
    _assert_symmetric(a)


def _as_version_2(state: dict) -> dict:
    """A version-2 state (full C x C Gram matrices, no 'parts') with the statistics of a
    version-3 ``state`` of both parts."""
    old = {k: v for k, v in state.items() if k != "parts"}
    c = state["num_channels"]
    old["gram"], old["gram_lo"] = (packed.unpack(state[k], c) for k in ("gram", "gram_lo"))
    return {**old, "version": 2}


def test_load_state_dict_mirrors_a_slightly_asymmetric_gram_and_refuses_a_tampered_one():
    state = _stats(_features(44)).state_dict()
    v2 = _as_version_2(state)
    gram = v2["gram"]
    old = {**v2, "gram": gram + torch.triu(gram, 1) * 2.0**-30}  # an older file's round-off
    s = ChannelStats(5, bins=16, name="layer.test")
    s.load_state_dict(old)
    _assert_symmetric(s)
    assert torch.equal(torch.triu(s.gram), torch.triu(old["gram"]))  # the upper triangle kept
    tampered = gram.clone()
    tampered[0, 1] += 0.1 * gram.abs().max()
    with pytest.raises(ValueError, match="'gram' is not symmetric"):
        s.load_state_dict({**v2, "gram": tampered})


def test_version_2_files_written_by_the_old_code_load_to_the_same_statistics():
    """tests/data/stats_state_v2.pt was written by icprune with state version 2 (full Gram
    matrices, before the packed triangle) from: for range_mode in ("layer", "channel"):
    ChannelStats(5, bins=16, range_mode=mode, name=f"layer.{mode}", read_at="bn",
    backend="torch") updated with 3 batches torch.randn(2, 5, 3, 3, float64) * (i + 1) of one
    Generator seeded 2026. The same batches give the same statistics today, bit for bit (the
    float64 torch path is unchanged), and the old file loads to them."""
    saved = torch.load(DATA / "stats_state_v2.pt", weights_only=True)
    gen = torch.Generator().manual_seed(2026)
    for mode in ("layer", "channel"):
        assert saved[mode]["version"] == 2 and saved[mode]["gram"].shape == (5, 5)
        fresh = ChannelStats(
            5, bins=16, range_mode=mode, name=f"layer.{mode}", read_at="bn", backend="torch"
        )
        for i in range(3):
            fresh.update(torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64) * (i + 1))
        loaded = ChannelStats.from_state_dict(saved[mode], backend="torch")
        _assert_identical(loaded, fresh)
        assert torch.equal(loaded.gram, saved[mode]["gram"])
        assert torch.equal(loaded.gram_lo, saved[mode]["gram_lo"])
        for key, value in fresh.state_dict().items():  # re-saved as version 3, bit-identical
            other = loaded.state_dict()[key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# ------------------------------------------------------------------- validated, atomic loads


def _replace(key, value):
    return lambda state: state.update({key: value})


def _scale(key, factor):
    return lambda state: state.update({key: state[key] * factor})


def _counts_minus_one(state):
    counts = state["counts"].clone()
    counts[0, counts[0].argmax()] *= -1
    state["counts"] = counts


def _counts_one_more(state):
    counts = state["counts"].clone()
    counts[2, 0] += 1
    state["counts"] = counts


def _nan_at(key):
    def edit(state):
        value = state[key].clone()
        value.view(-1)[0] = float("nan")
        state[key] = value

    return edit


def _swap_extremes(state):
    state["minimum"], state["maximum"] = state["maximum"].clone(), state["minimum"].clone()


LOAD_TAMPERING = [
    (_counts_minus_one, "'counts' holds negative histogram counts"),
    (_counts_one_more, "histogram of channel 2 holds 145 samples but count is 144"),
    (_replace("nan_policy", "explode"), "nan_policy 'explode', not one of"),
    (_replace("read_at", "everywhere"), "read_at 'everywhere', not one of"),
    (_replace("bin_exponent", torch.full((5,), 10**6)), "not the bin layout of the saved extremes"),
    (
        lambda s: s.update(counts=s["counts"].double()),
        r"'counts' has the wrong type or shape: "
        r"torch.float64 of shape \(5, 16\), expected torch.int64",
    ),
    (_nan_at("sums"), "'sums' holds NaN or Inf"),
    (_nan_at("gram"), "'gram' holds NaN or Inf"),
    (_scale("gram_lo", 0.0), None),  # zero remainders are valid (a coarser total)
    (lambda s: s.update(sums_lo=s["sums"] * 1e-3), "'sums_lo' is not the remainder of 'sums'"),
    (_swap_extremes, "minimum <= maximum"),
    (lambda s: s.pop("counts"), r"lack the key\(s\) \['counts'\]"),
    (_replace("count", -3), "count = -3; it must be an int >= 0"),
    (_replace("count", True), "count = True; it must be an int >= 0"),
    (_replace("nonfinite", 10**9), "count 1000000000 non-finite values among 144 samples"),
    (_replace("counts", torch.zeros(5, 16, dtype=torch.int64).to_sparse()), "must be a dense"),
    (_replace("gram", [[0.0] * 5] * 5), "'gram' must be a dense Tensor, got list"),
    (lambda s: s.update(gram=-s["gram"]), "'gram' has a negative diagonal entry"),
    (_replace("bins", 16.0), r"\(channels, bins, range_mode\) = \(5, 16.0, 'layer'\)"),
]


@pytest.mark.parametrize(("edit", "message"), LOAD_TAMPERING)
def test_load_state_dict_validates_everything_and_changes_nothing_when_it_refuses(edit, message):
    state = _stats(_features(50)).state_dict()
    edit(state)
    target = _stats(_features(51) * 3, nan_policy="zero", read_at="bn")
    before = target.state_dict()
    if message is None:
        target.load_state_dict(state)
        return
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    after = target.state_dict()  # atomic: the instance is exactly as it was
    for key, value in before.items():
        assert (
            torch.equal(value, after[key])
            if isinstance(value, torch.Tensor)
            else (value == after[key])
        ), key


def test_from_state_dict_names_bad_settings():
    state = _stats(_features(52)).state_dict()
    with pytest.raises(ValueError, match=r"layer 'layer.test' lack the key\(s\) \['bins'\]"):
        ChannelStats.from_state_dict({k: v for k, v in state.items() if k != "bins"})
    with pytest.raises(ValueError, match="have num_channels = 5.5; it must be an int"):
        ChannelStats.from_state_dict({**state, "num_channels": 5.5})
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        ChannelStats.from_state_dict({**state, "nan_policy": "explode"})
    with pytest.raises(ValueError, match="must be a dict"):
        ChannelStats.from_state_dict([1, 2])


@pytest.mark.parametrize("fused", [True, False], ids=["cpp-add", "torch-add"])
def test_merge_into_itself_doubles_exactly(monkeypatch, fused):
    if not fused:  # the elementwise torch path (CUDA, no extension) updates in place too
        monkeypatch.setattr(compensated, "HAVE_EXT", False)
    x = _features(53)
    twice = _stats(x)
    twice.update(x)
    s = _stats(x)
    s.merge(s)
    _assert_identical(s, twice)


def test_nan_in_weights_is_reported_as_weights_not_feature_map():
    s = ChannelStats(3, name="conv1", read_at="weights", backend="torch")
    w = torch.ones(9, 3)
    w[4, 1] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"weights of layer 'conv1' hold 1 non-finite .* output "
        r"channel\(s\) \[1\]",
    ) as info:
        s.update(w)
    assert "feature map" not in str(info.value)


def test_float64_values_whose_squares_overflow_are_refused_and_add_nothing():
    s = _stats(_features(54).double())
    before = s.state_dict()
    with pytest.raises(ValueError, match="sums of squares of the feature map overflow float64"):
        s.update(torch.full((2, 5, 3, 3), 1e200, dtype=torch.float64))
    for key, value in before.items():
        after = s.state_dict()[key]
        assert torch.equal(value, after) if isinstance(value, torch.Tensor) else value == after


def test_huge_float32_values_are_kept_finite():
    s = _stats(torch.full((2, 5, 3, 3), 3e38))  # near the float32 maximum: squares need fp64
    assert torch.isfinite(s.gram).all() and torch.isfinite(s.sums).all()
    assert torch.isfinite(s.correlation()).all() and torch.isfinite(s.distance()).all()


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.ones(2, 5, dtype=torch.int64), TypeError, "dtype torch.int64; supported are"),
        (torch.ones(2, 5, dtype=torch.bool), TypeError, "dtype torch.bool"),
        (torch.ones(2, 5, dtype=torch.complex64), TypeError, "dtype torch.complex64"),
        (torch.ones(5), ValueError, r"expected a tensor of shape \(N, 5, \*spatial\), got \(5,\)"),
        (torch.ones(2, 4, 3), ValueError, r"got \(2, 4, 3\)"),
        (torch.ones(2, 5).to_sparse(), TypeError, "sparse_coo tensor; pass a dense one"),
        ([[1.0] * 5], TypeError, "expected a torch.Tensor, got list"),
    ],
)
def test_update_refuses_bad_batches_clearly(x, error, message):
    s = ChannelStats(5, name="layer.test", backend="torch")
    with pytest.raises(error, match=message):
        s.update(x)
    assert s.count == 0


def test_bad_read_at_is_refused():
    with pytest.raises(ValueError, match="read_at must be one of"):
        ChannelStats(3, read_at="logits")


def test_update_takes_tensors_that_require_grad():
    for backend in ("torch", "cpp") if HAVE_EXT else ("torch",):
        s = ChannelStats(3, name="layer.test", backend=backend)
        s.update(torch.randn(4, 3, 2, requires_grad=True))
        assert s.count == 8 and not s.gram.requires_grad


# ------------------------------------------------------------------- parts: what is collected


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kept", [("histogram",), ("gram",), ()])
def test_parts_keep_what_is_asked_and_the_same_values(backend, kept):
    if backend == "cpp" and not HAVE_EXT:
        pytest.skip("no icprune._C")
    x, more = _features(60), _features(61)
    full = _stats(x, backend=backend)
    full.update(more)
    part = _stats(x, backend=backend, parts=kept)
    part.update(more)
    assert part.parts == kept and part.count == full.count
    assert torch.equal(part.sums, full.sums) and torch.equal(part.minimum, full.minimum)
    assert torch.equal(part.bin_exponent, full.bin_exponent)
    if "histogram" in kept:
        assert torch.equal(part.counts, full.counts)
        assert torch.equal(part.entropy(), full.entropy())
    else:
        assert not part.counts.any()
        with pytest.raises(ValueError, match="layer 'layer.test': entropy needs the 'histogram'"):
            part.entropy()
    if "gram" in kept:
        assert torch.equal(part.gram, full.gram) and torch.equal(part.distance(), full.distance())
    else:
        assert part.gram_packed.numel() == 0
        for estimator in (part.correlation, part.distance, lambda: part.gram):
            with pytest.raises(ValueError, match="needs the 'gram' statistics"):
                estimator()
    state = part.state_dict()
    assert state["parts"] == list(kept)
    restored = ChannelStats.from_state_dict(state, backend=backend)
    _assert_identical(restored, part)
    with pytest.raises(ValueError, match="saved statistics have parts"):
        ChannelStats(5, bins=16, name="layer.test").load_state_dict(state)
    with pytest.raises(ValueError, match="cannot merge"):
        full.merge(part)


@pytest.mark.parametrize("parts", ["gram", ("gram", "gram"), ("entropy",), None])
def test_bad_parts_are_refused(parts):
    with pytest.raises(ValueError, match="layer 'x': parts must be a tuple of distinct names"):
        ChannelStats(3, name="x", parts=parts)


def test_a_state_without_histograms_must_hold_zero_counts():
    state = _stats(_features(62), parts=("gram",)).state_dict()
    state["counts"] = state["counts"].clone()
    state["counts"][0, 0] = 1
    with pytest.raises(ValueError, match="'counts' must be all zero"):
        ChannelStats.from_state_dict(state)


def test_calibrate_keeps_the_parts_asked_for():
    import icprune
    from icprune import models

    torch.manual_seed(0)
    model = models.resnet20().eval()
    data = [torch.randn(2, 3, 32, 32)]
    only_gram = icprune.calibrate(model, data, parts=("gram",), progress=False)
    both = icprune.calibrate(model, data, progress=False)
    for name, s in only_gram.items():
        assert s.parts == ("gram",) and not s.counts.any()
        assert torch.equal(s.gram_packed, both[name].gram_packed)


@pytest.mark.parametrize("parts", [("histogram", "gram"), ()])
def test_new_statistics_hold_separate_tensors_of_the_empty_state(parts):
    s = ChannelStats(5, bins=8, parts=parts)
    state = s.state_dict()
    p = 15 if parts else 0
    assert torch.equal(state["sums"], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(state["minimum"], torch.full((5,), float("inf"), dtype=torch.float64))
    assert torch.equal(state["maximum"], torch.full((5,), float("-inf"), dtype=torch.float64))
    assert torch.equal(state["bin_exponent"], torch.full((5,), K_MIN))
    assert torch.equal(state["counts"], torch.zeros(5, 8, dtype=torch.int64))
    assert state["gram"].shape == state["gram_lo"].shape == (p,)
    tensors = [getattr(s, key) for key in (*RUNNING_KEYS, "gram_packed", "gram_packed_lo")]
    for t in tensors:  # each its own storage of its own size: saving one saves only it
        assert t.is_contiguous()
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    for t in tensors:  # writing one changes no other
        before = [u.clone() for u in tensors]
        t.fill_(7)
        assert all(torch.equal(u, b) for u, b in zip(tensors, before, strict=True) if u is not t)


def test_set_gram_gives_statistics_without_it_a_checked_gram_part():
    x = torch.randn(4, 3, 5, 5)
    full = ChannelStats(3)
    full.update(x)
    part = ChannelStats(3, parts=("histogram",))
    part.update(x)
    good = (full.gram_packed.clone(), full.gram_packed_lo.clone())
    bad_diagonal = good[0].clone()
    bad_diagonal[0] = -1.0
    for hi, lo, message in (
        (good[0][:-1], good[1], "must be a Tensor"),
        (good[0].float(), good[1], "must be a Tensor"),
        (good[0].clone().fill_(float("nan")), good[1], "non-finite"),
        (bad_diagonal, good[1], "negative diagonal"),
    ):
        with pytest.raises(ValueError, match=message):
            part.set_gram(hi, lo)
        assert part.parts == ("histogram",)  # refused: nothing changed
    part.set_gram(*good)
    assert part.parts == ("histogram", "gram")
    assert torch.equal(part.gram, full.gram) and torch.equal(part.correlation(), full.correlation())
    with pytest.raises(ValueError, match="already hold a Gram matrix"):
        part.set_gram(*good)
