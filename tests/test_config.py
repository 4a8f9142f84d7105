"""icprune.config: the settings objects, and every keyword argument of before still working."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch
from torch import nn

import icprune
from icprune.config import (
    CalibrationConfig,
    PlanConfig,
    ScoringConfig,
    StatsConfig,
    with_options,
)
from icprune.models import resnet20
from icprune.planning import plan
from icprune.scoring import layer_scores, score
from icprune.stats.weights import weight_stats

#: ``icprune.__all__`` before the configs were added (every name must stay importable).
PUBLIC_BEFORE = [
    "HAVE_EXT", "ChannelStats", "Dependency", "Group", "LayerScores", "ModelSummary",
    "PruneResult", "PruningPlan", "__version__", "accuracy", "all_reduce_stats", "apply",
    "build_info", "calibrate", "count", "dependency_groups", "finetune", "latency",
    "layer_scores", "load", "plan", "prune", "recalibrate_bn", "save", "score", "weight_stats",
    "write_report",
]  # fmt: skip
#: The keyword arguments each function took before the configs (they must all still work).
KEYWORDS_BEFORE = {
    icprune.calibrate: "layers bins range_mode read_at nan_policy max_batches device progress "
    "backend checkpoint checkpoint_every distributed",
    score: "source lam independence norm stats layers bins range_mode read_at nan_policy "
    "max_batches device progress backend checkpoint checkpoint_every distributed",
    plan: "example_inputs ratio flops_reduction params_reduction global_ranking max_layer_ratio "
    "min_channels round_to ignored_layers",
    icprune.prune: "example_inputs ratio flops_reduction params_reduction global_ranking "
    "max_layer_ratio min_channels round_to ignored_layers inplace source lam independence norm "
    "layers bins range_mode read_at nan_policy max_batches device progress backend",
    layer_scores: "lam independence norm",
    weight_stats: "layers bins range_mode nan_policy",
}
ACCEPTED = re.compile(r"its settings are (.*) \(or the configs (.*)\)")


def _accepted(function, *args, **kwargs) -> set[str]:
    """The keyword arguments ``function`` takes: its parameters, and the settings and configs
    its TypeError for an unknown keyword lists."""
    names = set(inspect.signature(function).parameters)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'") as info:
        function(*args, **kwargs, no_such_option=1)
    settings, configs = ACCEPTED.search(str(info.value)).groups()
    return names | set(settings.split(", ")) | set(configs.split(", "))


#: Arguments each function needs before it looks at its keyword options.
ARGUMENTS = {
    icprune.calibrate: ((None, None), {}),
    plan: ((None, None), {"example_inputs": None}),
    score: ((None,), {}),
    icprune.prune: ((None,), {}),
    layer_scores: ((None,), {}),
    weight_stats: ((None,), {}),
}


def test_every_public_name_of_before_is_still_importable():
    for name in PUBLIC_BEFORE:
        assert hasattr(icprune, name), name
        assert name in icprune.__all__
    for cls in (StatsConfig, CalibrationConfig, ScoringConfig, PlanConfig):
        assert getattr(icprune, cls.__name__) is cls


@pytest.mark.parametrize("function", list(KEYWORDS_BEFORE), ids=lambda f: f.__name__)
def test_every_keyword_of_before_is_still_accepted(function):
    args, kwargs = ARGUMENTS[function]
    missing = set(KEYWORDS_BEFORE[function].split()) - _accepted(function, *args, **kwargs)
    assert not missing, f"{function.__name__} lost the keyword(s) {sorted(missing)}"


def test_information_importance_keeps_its_keywords():
    tp_module = pytest.importorskip("icprune.integrations.torch_pruning")
    before = "stats source lam independence norm layers bins range_mode read_at nan_policy "
    before += "max_batches device progress"
    missing = set(before.split()) - _accepted(tp_module.InformationImportance, nn.Linear(2, 2))
    assert not missing


def test_config_fields_are_disjoint_so_a_keyword_names_one_setting():
    seen: dict[str, str] = {}
    for cls in (StatsConfig, CalibrationConfig, ScoringConfig, PlanConfig):
        for f in dataclasses.fields(cls):
            assert f.name not in seen, (f.name, seen.get(f.name), cls.__name__)
            seen[f.name] = cls.__name__


def test_configs_are_frozen_and_keywords_override_them():
    config = ScoringConfig(lam=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lam = 3.0  # type: ignore[misc]
    options = {"norm": "minmax", "bins": 16, "scoring_config": config}
    scoring, stats = with_options("f", options, ScoringConfig, StatsConfig)
    assert scoring == ScoringConfig(lam=2.0, normalization="minmax")
    assert stats == StatsConfig(bins=16)
    assert config == ScoringConfig(lam=2.0)  # the given config is not changed


def test_unknown_keywords_wrong_configs_and_doubled_aliases_are_refused():
    with pytest.raises(TypeError, match=r"score\(\) got an unexpected keyword argument 'bin'"):
        score(nn.Conv2d(3, 4, 3), bin=32)
    with pytest.raises(TypeError, match="stats_config must be an icprune.StatsConfig"):
        score(nn.Conv2d(3, 4, 3), stats_config=ScoringConfig())
    with pytest.raises(TypeError, match="plan_config must be an icprune.PlanConfig"):
        icprune.prune(nn.Conv2d(3, 4, 3), plan_config={"ratio": 0.5})
    with pytest.raises(ValueError, match="normalization= or its short form norm=, not both"):
        layer_scores(None, norm="zscore", normalization="minmax")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return resnet20().eval()


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(getattr(a[k], f), getattr(b[k], f))
        for k in a
        for f in ("capacity", "independence", "score")
    )


def test_keywords_and_configs_give_the_same_scores_bit_for_bit():
    model, data = _model(), _data()
    by_keyword = score(
        model,
        data,
        criterion="icii",
        lam=0.5,
        independence="correlation",
        norm="minmax",
        bins=16,
        range_mode="channel",
        read_at="output",
        max_batches=2,
        progress=False,
        backend="torch",
    )
    by_config = score(
        model,
        data,
        scoring_config=ScoringConfig(
            criterion="icii", lam=0.5, independence="correlation", normalization="minmax"
        ),
        stats_config=StatsConfig(bins=16, range_mode="channel", backend="torch"),
        calibration_config=CalibrationConfig(read_at="output", max_batches=2, progress=False),
    )
    assert _equal(by_keyword, by_config)
    # The settings took effect: they differ from the defaults' scores.
    assert not _equal(by_keyword, score(model, data, criterion="icii", progress=False))
    stats = icprune.calibrate(model, data, bins=16, read_at="output", progress=False)
    assert all(s.bins == 16 and s.read_at == "output" for s in stats.values())
    weights = weight_stats(model, stats_config=StatsConfig(bins=8, range_mode="channel"))
    assert all(s.bins == 8 and s.range_mode == "channel" for s in weights.values())


def test_prune_and_plan_take_a_plan_config():
    model, x = _model(), torch.randn(1, 3, 32, 32)
    by_keyword = icprune.prune(model, example_inputs=x, ratio=0.25, round_to=2)
    by_config = icprune.prune(
        model, example_inputs=x, plan_config=PlanConfig(ratio=0.25, round_to=2)
    )
    assert by_keyword.plan.keep.keys() == by_config.plan.keep.keys()
    assert all(
        torch.equal(by_keyword.plan.keep[k], by_config.plan.keep[k]) for k in by_keyword.plan.keep
    )
    assert by_config.plan.settings["round_to"] == 2
    scores = score(model, example_inputs=x)
    direct = plan(model, scores, example_inputs=x, plan_config=PlanConfig(ratio=0.25), round_to=2)
    assert all(torch.equal(direct.keep[k], by_config.plan.keep[k]) for k in direct.keep)


def test_information_importance_takes_configs_and_refuses_a_checkpoint(tmp_path):
    tp_module = pytest.importorskip("icprune.integrations.torch_pruning")
    model, data = _model(), _data()
    a = tp_module.InformationImportance(
        model, data, criterion="icii", lam=0.5, bins=16, progress=False
    )
    b = tp_module.InformationImportance(
        model,
        data,
        scoring_config=ScoringConfig(criterion="icii", lam=0.5),
        stats_config=StatsConfig(bins=16),
        calibration_config=CalibrationConfig(progress=False),
    )
    assert all(s.bins == 16 for s in b.stats.values())
    assert a._vectors.keys() == b._vectors.keys()
    assert all(torch.equal(a._vectors[k], b._vectors[k]) for k in a._vectors)
    with pytest.raises(ValueError, match="checkpoint= cannot be used"):
        tp_module.InformationImportance(model, data, checkpoint=tmp_path / "c.pt")
