import math

import pytest
import torch

import icprune
from icprune.criteria import group_scores
from icprune.models import resnet20
from icprune.scoring import independence_of, layer_scores, normalize
from icprune.stats.channel_stats import ChannelStats


def _stats_of(rows: torch.Tensor, **kw) -> ChannelStats:
    """ChannelStats of a C x M matrix of samples (one row per channel)."""
    s = ChannelStats(rows.shape[0], name="toy", **kw)
    s.update(rows.T.contiguous())
    return s


def _toy_rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 4000, generator=gen, dtype=torch.float64)
    # 0 and 1 nearly duplicate each other; 2 and 3 are independent; 4 is constant.
    return torch.stack([a, a + 0.01 * c, b, c, torch.full_like(a, 3.0)])


def test_correlation_independence_ranks_duplicates_low_and_constant_channels_zero():
    ii = independence_of(_stats_of(_toy_rows()), "correlation")
    assert ii[4] == 0.0
    assert max(ii[0], ii[1]) < min(ii[2], ii[3])
    # Independent channels: |corr| ~ 0 with all but one near-duplicate pair -> II close to 1.
    assert ii[2] > 0.95 and ii[3] > 0.95
    # A near-duplicate has |corr| ~ 1 with its twin: II ~ 1 - 1/4.
    assert ii[0] == pytest.approx(0.75, abs=0.03)


def test_distance_independence_is_the_mean_distance_to_the_other_channels():
    rows = _toy_rows()
    ii = independence_of(_stats_of(rows), "distance")
    d = torch.cdist(rows, rows)
    torch.testing.assert_close(ii, d.sum(1) / 4, rtol=1e-9, atol=1e-9)


def test_single_channel_layer_has_zero_independence_and_a_finite_score():
    s = _stats_of(torch.randn(1, 100, dtype=torch.float64))
    for form in ("correlation", "distance"):
        assert torch.equal(independence_of(s, form), torch.zeros(1, dtype=torch.float64))
        assert torch.isfinite(layer_scores(s, independence=form).score).all()


def test_normalize():
    v = torch.tensor([2.0, 4.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        normalize(v, "minmax"), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    )
    z = normalize(v, "zscore")
    assert z.mean().abs() < 1e-12 and (z.std(unbiased=False) - 1).abs() < 1e-12
    assert torch.equal(normalize(v, "none"), v)
    for norm in ("minmax", "zscore"):
        assert torch.equal(normalize(torch.full((4,), 7.0), norm), torch.zeros(4))
        assert torch.equal(normalize(torch.tensor([7.0]), norm), torch.zeros(1))
    with pytest.raises(ValueError, match=r"normalization \(norm=\) must be one of"):
        normalize(v, "rank")


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("form", ["correlation", "distance"])
@pytest.mark.parametrize("norm", ["minmax", "zscore"])
def test_score_is_normalised_capacity_plus_lambda_times_normalised_independence(lam, form, norm):
    s = _stats_of(_toy_rows())
    out = layer_scores(s, lam=lam, independence=form, norm=norm)
    assert torch.equal(out.capacity, s.entropy())
    assert torch.equal(out.independence, independence_of(s, form))
    ic, ii = normalize(s.entropy(), norm), normalize(independence_of(s, form), norm)
    expected = ic + lam * ii
    assert torch.equal(out.score, expected)
    assert out.score.dtype == torch.float64 and out.score.shape == (5,)


@pytest.mark.parametrize("lam", [-0.1, math.inf, math.nan, "1"])
def test_bad_lambda_raises(lam):
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        layer_scores(_stats_of(_toy_rows()), lam=lam)


def _model():
    torch.manual_seed(0)
    return resnet20()


def _data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.zeros(4)) for _ in range(2)]


def test_score_from_data_equals_score_from_reused_stats_and_is_deterministic():
    model = _model()
    first = icprune.score(model, _data(), criterion="icii", progress=False)
    again = icprune.score(model, _data(), criterion="icii", progress=False)
    reused = icprune.score(model, stats=icprune.calibrate(model, _data(), progress=False))
    assert list(first) == list(reused)
    assert "fc" not in first and "conv1" in first
    for name in first:
        for field in ("capacity", "independence", "score"):
            assert torch.equal(getattr(first[name], field), getattr(again[name], field))
            assert torch.equal(getattr(first[name], field), getattr(reused[name], field))


def test_data_free_scores_come_from_the_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = icprune.score(model, source="weights", independence="distance", lam=0.5)
    expected = layer_scores(
        icprune.weight_stats(model)["layer1.0.conv1"], lam=0.5, independence="distance"
    )
    assert torch.equal(scores["layer1.0.conv1"].score, expected.score)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_icii_weights_defaults_are_the_measured_best_variant_of_the_paper_criterion():
    # docs/quality.md: data-free, layer range, 64 bins, distance, lam=1, z-score.
    model = _model()
    default = icprune.score(model, criterion="icii")
    best = icprune.score(
        model,
        source="weights",
        range_mode="layer",
        bins=64,
        independence="distance",
        lam=1.0,
        norm="zscore",
    )
    assert list(default) == list(best)
    for name in best:
        assert torch.equal(default[name].score, best[name].score)
    stats = icprune.weight_stats(model)["layer1.0.conv1"]
    assert torch.equal(layer_scores(stats).score, best["layer1.0.conv1"].score)


def test_the_defaults_are_greedy_with_data_and_wbn_without():
    # docs/quality.md: chosen on the selection split, confirmed on the confirmation split.
    model = _model()
    example = torch.zeros(1, 3, 32, 32)
    groups = icprune.dependency_groups(model, example)
    free = icprune.score(model, example_inputs=example)
    expected = group_scores(model, groups, "wbn")
    assert set(free) == set(expected)
    assert all(torch.equal(free[k].score, v) for k, v in expected.items())
    assert free["conv1"].capacity is None and free["conv1"].independence is None
    stats = icprune.calibrate(model, _data(), read_at="input", progress=False)
    with_data = icprune.score(model, _data(), progress=False)
    expected = group_scores(model, groups, "greedy", stats)
    assert all(torch.equal(with_data[k].score, v) for k, v in expected.items())
    reused = icprune.score(model, stats=stats)  # the traced shape travels with the stats
    assert all(torch.equal(reused[k].score, v) for k, v in expected.items())
    # one vector per group: the members of a residual stream share it
    assert torch.equal(with_data["conv1"].score, with_data["layer1.0.conv2"].score)


def test_a_one_shot_iterator_is_read_once_by_the_default_criterion():
    model = _model()
    once = icprune.score(model, iter(_data()), progress=False)
    twice = icprune.score(model, _data(), progress=False)
    assert all(torch.equal(once[k].score, twice[k].score) for k in twice)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({}, "pass example_inputs"),
        ({"criterion": "greedy"}, "needs calibration data"),
        ({"criterion": "wbn", "data": _data()}, "data-free: pass neither"),
        ({"criterion": "greedy", "data": _data(), "source": "features"}, "does not take source"),
        ({"criterion": "greedy", "data": _data(), "read_at": "activation"}, "does not take"),
        ({"criterion": "entropy"}, "criterion must be one of"),
    ],
)
def test_consumer_criteria_refuse_what_they_cannot_use(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        icprune.score(_model(), **kwargs)


def test_consumer_criteria_need_input_statistics():
    stats = icprune.calibrate(_model(), _data(), progress=False)
    with pytest.raises(TypeError, match="read_at='input'"):
        icprune.score(_model(), stats=stats, criterion="greedy")


def test_data_or_stats_select_feature_maps_by_default():
    model = _model()
    stats = icprune.calibrate(model, _data(), progress=False)
    for scores in (
        icprune.score(model, _data(), source="features", progress=False),
        icprune.score(model, stats=stats),
    ):
        expected = layer_scores(stats["layer1.0.conv1"], independence="distance", norm="zscore")
        assert torch.equal(scores["layer1.0.conv1"].score, expected.score)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"source": "features"}, "source='features' needs calibration data"),
        ({"data": _data(), "stats": {}, "criterion": "icii"}, "either data or precomputed stats"),
        ({"source": "weights", "data": _data()}, "data-free: pass neither"),
        ({"source": "activations"}, "source must be one of"),
        ({"source": "weights", "independence": "mutual"}, "independence must be one of"),
    ],
)
def test_inconsistent_arguments_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        icprune.score(_model(), **kwargs)


def test_score_passes_checkpoint_and_backend_through_to_calibrate(tmp_path):
    torch.manual_seed(0)
    model = resnet20().eval()
    batches = [
        torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    path = tmp_path / "calib.pt"
    icii = {"criterion": "icii", "progress": False}
    first = icprune.score(model, batches, checkpoint=path, checkpoint_every=1, **icii)
    assert path.is_file()
    again = icprune.score(model, batches, checkpoint=path, **icii)  # resumed: no forward
    with pytest.raises(ValueError, match="backend differ"):  # the backend reaches calibrate too
        icprune.score(model, batches, checkpoint=path, backend="torch", **icii)
    reference = icprune.score(model, batches, backend="torch", **icii)
    for name, layer in first.items():
        assert torch.equal(layer.score, again[name].score)
        assert torch.allclose(layer.score, reference[name].score, atol=1e-6)


def test_stats_of_the_wrong_type_are_refused():
    with pytest.raises(
        TypeError,
        match=r"stats must be the dict layer name -> ChannelStats .* "
        r"holding \['int'\]",
    ):
        icprune.score(_model(), stats={"conv1": 5})


def test_lam_must_not_be_a_bool():
    stats = icprune.weight_stats(_model())["conv1"]
    with pytest.raises(ValueError, match="lam must be a finite number >= 0, got True"):
        layer_scores(stats, lam=True)
