"""planning: targets met within 1 pp (measured on the applied model), limits, determinism, JSON."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import icprune
from icprune.applying import apply
from icprune.models import mobilenet_v2, resnet18, resnet50, resnet56, vgg16_bn
from icprune.planning import PruningPlan, plan


def l1(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().flatten(1).abs().sum(1)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


@pytest.mark.parametrize(
    ("factory", "size", "target", "round_to"),
    [
        (resnet18, 64, {"flops_reduction": 0.6}, 1),
        (resnet50, 64, {"flops_reduction": 0.77}, 8),
        (resnet50, 64, {"params_reduction": 0.5}, 1),
        (resnet56, 32, {"flops_reduction": 0.5}, 1),
        (vgg16_bn, 32, {"flops_reduction": 0.5}, 8),
        (mobilenet_v2, 64, {"flops_reduction": 0.3}, 8),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_target_met_within_one_point_on_the_applied_model(factory, size, target, round_to):
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(1, 3, size, size)
    chosen = plan(model, l1(model), example_inputs=x, round_to=round_to, **target)
    macs0, params0 = icprune.count(model, x)
    macs1, params1 = icprune.count(apply(model, chosen), x)
    measured = 1 - macs1 / macs0 if "flops_reduction" in target else 1 - params1 / params0
    assert abs(measured - next(iter(target.values()))) <= 0.01
    for group, kept in zip(chosen.groups, chosen.kept, strict=True):
        assert len(kept) == group.channels or len(kept) % round_to == 0


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 40, 3, padding=1)
        self.c3 = nn.Conv2d(40, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(self.c3(x).mean((2, 3)))


@settings(max_examples=30, deadline=None)
@given(
    ratio=st.floats(0.0, 0.85),
    max_layer_ratio=st.floats(0.1, 1.0),
    min_channels=st.integers(1, 12),
    round_to=st.sampled_from([1, 2, 4, 8]),
    global_ranking=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_limits_are_honoured(ratio, max_layer_ratio, min_channels, round_to, global_ranking, seed):
    model = Tiny()
    g = torch.Generator().manual_seed(seed)
    scores = {
        n: torch.rand(getattr(model, n).out_channels, generator=g) for n in ("c1", "c2", "c3")
    }
    try:
        chosen = plan(
            model, scores, example_inputs=torch.randn(1, 3, 4, 4), ratio=ratio,
            max_layer_ratio=max_layer_ratio, min_channels=min_channels, round_to=round_to,
            global_ranking=global_ranking,
        )  # fmt: skip
    except ValueError as exc:  # the limits leave too little to prune: they are named
        assert "max_layer_ratio" in str(exc) or "round_to rounds every group" in str(exc)
        return
    for group, kept in zip(chosen.groups, chosen.kept, strict=True):
        c, k = group.channels, len(kept)
        assert k == c or k % round_to == 0
        assert k >= min(c, min_channels)
        assert c - k <= int(max_layer_ratio * c)  # rounding up only keeps more
        assert torch.equal(kept, kept.sort().values) and len(set(kept.tolist())) == k
        # lowest scores pruned first, ties by channel index
        s = scores[group.layers[0]]
        pruned = sorted(set(range(c)) - set(kept.tolist()))
        if pruned and k:
            assert max(s[pruned]) <= min(s[kept])


def test_ties_break_by_channel_index_and_plans_are_deterministic():
    model = Tiny()
    x = torch.randn(1, 3, 4, 4)
    scores = {n: torch.zeros(getattr(model, n).out_channels) for n in ("c1", "c2", "c3")}
    chosen = plan(model, scores, example_inputs=x, ratio=0.25, global_ranking=False)
    assert chosen.keep["c1"].tolist() == list(range(6, 24))  # the lowest indices go first
    again = plan(model, scores, example_inputs=x, ratio=0.25, global_ranking=False)
    assert again.to_json() == chosen.to_json()


def test_layer_scores_and_plain_tensors_plan_alike():
    torch.manual_seed(0)
    model = resnet56()
    x = torch.randn(1, 3, 32, 32)
    scores = icprune.score(model, source="weights", progress=False)
    a = plan(model, scores, example_inputs=x, flops_reduction=0.4)
    b = plan(model, {n: s.score for n, s in scores.items()}, example_inputs=x, flops_reduction=0.4)
    assert a.to_json() == b.to_json()


def test_json_round_trip_and_table():
    torch.manual_seed(0)
    model = mobilenet_v2()
    chosen = plan(model, l1(model), example_inputs=torch.randn(1, 3, 32, 32), ratio=0.3)
    text = chosen.to_json()
    back = PruningPlan.from_json(text)
    assert back.groups == chosen.groups and back.sizes == chosen.sizes
    assert all(torch.equal(a, b) for a, b in zip(back.kept, chosen.kept, strict=True))
    assert back.keep.keys() == chosen.keep.keys() and back.settings == chosen.settings
    assert json.loads(text)["settings"]["ratio"] == 0.3
    table = str(chosen)
    assert table.splitlines()[1].startswith("features.0.0") and "MACs" in table.splitlines()[-1]
    assert len(table.splitlines()) == len(chosen.groups) + 2
    with pytest.raises(ValueError, match="not an icprune pruning plan"):
        PruningPlan.from_json("{}")


def test_bad_arguments_raise_clearly():
    model, x = Tiny(), torch.randn(1, 3, 4, 4)
    scores = {"c1": torch.rand(24), "c2": torch.rand(40)}
    with pytest.raises(ValueError, match="exactly one of"):
        plan(model, scores, example_inputs=x)
    with pytest.raises(ValueError, match="exactly one of"):
        plan(model, scores, example_inputs=x, ratio=0.1, flops_reduction=0.1)
    with pytest.raises(ValueError, match="flops_reduction must be"):
        plan(model, scores, example_inputs=x, flops_reduction=1.2)
    with pytest.raises(ValueError, match="round_to must be"):
        plan(model, scores, example_inputs=x, ratio=0.1, round_to=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        plan(model, {"c1": torch.full((24,), float("nan"))}, example_inputs=x, ratio=0.1)
    with pytest.raises(ValueError, match="has 3 values"):
        plan(model, {"c1": torch.rand(3)}, example_inputs=x, ratio=0.1)
    with pytest.raises(ValueError, match="no layer named 'c9'"):
        plan(model, {"c9": torch.rand(3)}, example_inputs=x, ratio=0.1)
    with pytest.raises(TypeError, match="1-D floating-point"):
        plan(model, {"c1": torch.arange(24)}, example_inputs=x, ratio=0.1)
    with pytest.raises(ValueError, match="cannot be reached"):
        plan(model, scores, example_inputs=x, flops_reduction=0.9, max_layer_ratio=0.3)
    with pytest.raises(ValueError, match="above max_layer_ratio"):
        plan(model, scores, example_inputs=x, ratio=0.5, max_layer_ratio=0.3, global_ranking=False)


def test_unscored_groups_stay_whole():
    model, x = Tiny(), torch.randn(1, 3, 4, 4)
    chosen = plan(model, {"c2": torch.rand(40)}, example_inputs=x, ratio=0.5)
    assert len(chosen.keep["c1"]) == 24 and len(chosen.keep["c2"]) == 20


def _tampered(edit) -> str:
    """The JSON of a Tiny plan after ``edit(data)`` changed it in place."""
    model = Tiny()
    scores = {n: torch.arange(getattr(model, n).out_channels, dtype=torch.float64) for n in ("c1",)}
    data = json.loads(
        plan(model, scores, example_inputs=torch.randn(1, 3, 4, 4), ratio=0.2).to_json()
    )
    edit(data)
    return json.dumps(data)


def _set_kept(kept):
    def edit(data):
        data["groups"][0]["kept"] = kept

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set_kept([-1, 5, 6]),
            r"group 0 \(first layer 'c1'\) keeps channel index -1, outside "
            r"\[0, 24\) \(negative indices are refused, not wrapped\)",
        ),
        (_set_kept([5, 999]), r"keeps channel index 999, outside \[0, 24\)"),
        (_set_kept([5, 5, 6]), "strictly increasing"),
        (_set_kept([7, 6]), "strictly increasing"),
        (_set_kept([]), "keeps no channel"),
        (_set_kept([1.0, 2.0]), "'kept' must be a list of channel indices"),
        (_set_kept([2**70]), "'kept' must be a list of channel indices"),
        (lambda d: d.pop("sizes"), r"lacks the key\(s\) \['sizes'\]"),
        (lambda d: d.pop("structure"), r"lacks the key\(s\) \['structure'\]"),
        (lambda d: d["groups"][0].pop("kept"), r"groups\[0\] must hold 'channels', 'kept'"),
        (lambda d: d["groups"][0].update(channels=0), "has 0 channels; it needs >= 1"),
        (
            lambda d: d["groups"][0]["dependencies"][0].__setitem__(1, "explode"),
            "dependency kind 'explode' is not one of",
        ),
        (
            lambda d: d["groups"][0]["dependencies"][0].__setitem__(2, 5),
            r"reaches channel 28 of 'c1' \(out axis\), which has 24",
        ),
        (lambda d: d["sizes"].update(c1=[24, -3]), "'sizes' must map module names to 2 ints"),
        (lambda d: d["sizes"].update(c1=[30, 3]), r"sizes\['c1'\] = \(30, 3\) but the recorded"),
        (lambda d: d.update(macs=[1.5, 2]), r"'macs' must be \[before, after\] ints"),
        (lambda d: d.update(version=7), "plan version 7 is not supported"),
    ],
)
def test_from_json_refuses_tampered_plans_clearly(edit, message):
    with pytest.raises(ValueError, match=message):
        PruningPlan.from_json(_tampered(edit))


def test_from_json_refuses_text_that_is_not_json():
    with pytest.raises(ValueError, match="from_json: the text is not JSON"):
        PruningPlan.from_json("{'format': ")


def _plain_scores(model):
    return {n: torch.rand(m.out_channels) for n, m in model.named_children() if n != "fc"}


@pytest.mark.parametrize(
    ("options", "scores", "message"),
    [
        (
            {"ignored_layers": ["c1", "c2", "c3"]},
            None,
            r"the dependency trace found no prunable group: ignored_layers="
            r"\['c1', 'c2', 'c3'\] excludes those layers",
        ),
        (
            {},
            {"fc": torch.rand(5)},
            r"no group has scores: the scores name \['fc'\] but the "
            r"prunable groups' layers are \['c1', 'c2', 'c3'\]",
        ),
        (
            {"min_channels": 40},
            None,
            r"every scored group is at its limit: max_layer_ratio=0.9 "
            r"and min_channels=40 leave no channel to prune \(the largest scored group has 40",
        ),
        ({"round_to": 64}, None, "round_to rounds every group's kept channel count back up"),
    ],
    ids=["all-ignored", "no-scores", "min-channels", "round-to"],
)
@pytest.mark.parametrize("target", ["ratio", "flops_reduction"])
def test_nothing_prunable_says_so_and_why(options, scores, message, target):
    model = Tiny()
    scores = _plain_scores(model) if scores is None else scores
    with pytest.raises(
        ValueError,
        match=rf"{target}=0.3 cannot be met: no channel of Tiny can "
        rf"be pruned: .*{message}",
    ) as info:
        plan(model, scores, example_inputs=torch.randn(1, 3, 4, 4), **{target: 0.3}, **options)
    assert "removes 0.000" not in str(info.value)


def test_a_model_without_groups_says_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))  # its only conv is the output layer
    with pytest.raises(
        ValueError,
        match="no prunable group: the channels of every conv/linear layer reach the model's output",
    ):
        plan(model, {}, example_inputs=torch.randn(1, 3, 8, 8), ratio=0.2)
    assert plan(model, {}, example_inputs=torch.randn(1, 3, 8, 8), ratio=0.0).groups == ()


def test_indices_refuses_an_unknown_axis():
    model = Tiny()
    chosen = plan(model, _plain_scores(model), example_inputs=torch.randn(1, 3, 4, 4), ratio=0.2)
    with pytest.raises(ValueError, match="axis must be 'out' or 'in', got 'sideways'"):
        chosen.indices("c1", "sideways")
