"""integrations.torch_pruning: icprune scores as a Torch-Pruning 1.6 importance criterion."""

from __future__ import annotations

import copy
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import icprune
from icprune.calibrate import InputStats
from icprune.models import resnet20
from icprune.planning import _group_score, normalized_scores
from icprune.stats.channel_stats import ChannelStats
from icprune.structure.dependency import dependency_groups
from icprune.structure.graph import prunable_layers

tp = pytest.importorskip("torch_pruning")
from icprune.integrations.torch_pruning import InformationImportance  # noqa: E402

EXAMPLE = torch.randn(1, 3, 32, 32)
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return resnet20().eval()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(2)]


class CatNet(nn.Module):
    """Two convs joined by ``cat``, a depthwise conv over both, a 1x1 conv, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.e = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(self.e(self.bn(self.d(y)).relu()).mean((2, 3)))


def _groups(model: nn.Module, example: torch.Tensor, ignored: nn.Module):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return list(
        graph.get_all_groups(ignored_layers=[ignored], root_module_types=[nn.Conv2d, nn.Linear])
    )


def _root(group, model: nn.Module) -> str:
    return {m: n for n, m in model.named_modules()}[group[0].dep.target.module]


def _minmax(vec: torch.Tensor) -> torch.Tensor:
    return (vec - vec.min()) / (vec.max() - vec.min())


def _importance_and_scores(model, batches, case):
    """(InformationImportance, the icprune.score it must follow) for one way of scoring."""
    if case == "icii-weights":
        return InformationImportance(model, criterion="icii"), icprune.score(
            model, criterion="icii"
        )
    if case == "icii-stats":
        stats = icprune.calibrate(model, batches, progress=False)
        return InformationImportance(model, stats=stats), icprune.score(model, stats=stats)
    if case == "wbn":  # the data-free default
        importance = InformationImportance(model, example_inputs=EXAMPLE)
        return importance, icprune.score(model, example_inputs=EXAMPLE)
    if case == "greedy":  # the default with data
        importance = InformationImportance(model, batches, progress=False)
        return importance, icprune.score(model, batches, progress=False)
    assert case == "greedy-stats"
    stats = icprune.calibrate(model, batches, read_at="input", progress=False)
    return InformationImportance(model, stats=stats), icprune.score(model, stats=stats)


CRITERION_OF = {
    "icii-weights": "icii",
    "icii-stats": "icii",
    "wbn": "wbn",
    "greedy": "greedy",
    "greedy-stats": "greedy",
}


@pytest.mark.parametrize("case", list(CRITERION_OF))
def test_group_scores_are_the_plan_group_scores(model, batches, case):
    """For every Torch-Pruning group of a ResNet-20, the importance is the group score that
    icprune.plan ranks by (mean of the members' min-max normalised scores) for the scores
    icprune.score gives with the same inputs: its defaults ("wbn" data-free, "greedy" with data
    or InputStats, "icii" for per-layer statistics) and criterion="icii"."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    importance, scores = _importance_and_scores(model, batches, case)
    assert importance.criterion == CRITERION_OF[case]
    vectors = normalized_scores(scores, model)
    ours = {layer: g for g in dependency_groups(model, EXAMPLE) for layer in g.layers}
    groups = _groups(model, EXAMPLE, model.fc)
    assert len(groups) == 12  # 3 residual spaces + 9 block-internal convs
    for group in groups:
        imp = importance(group)
        expected = _group_score(ours[_root(group, model)], vectors)
        assert imp.dtype == torch.float64 and imp.shape == (len(group[0].idxs),)
        torch.testing.assert_close(imp, expected, rtol=1e-12, atol=1e-12)
        if CRITERION_OF[case] == "greedy":  # elimination ranks: distinct within a group
            assert len(set(imp.tolist())) == len(imp)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cat_group_maps_members_to_root_channels():
    """A depthwise conv over ``cat(a, b)`` roots one group of 8 channels: a covers root channels
    0-3, b covers 4-7 (Torch-Pruning's root_idxs); root channels no scored layer covers get 1."""
    torch.manual_seed(0)
    net = CatNet().eval()
    example = torch.randn(1, 3, 8, 8)
    (group,) = [g for g in _groups(net, example, net.fc) if len(g[0].idxs) == 8]
    scores = {k: _minmax(v.score) for k, v in icprune.score(net, criterion="icii").items()}
    imp = InformationImportance(net, criterion="icii")(group)
    expected = scores["d"] + torch.cat([scores["a"], scores["b"]])
    torch.testing.assert_close(imp, expected / 2, rtol=1e-12, atol=1e-12)

    only_a = InformationImportance(net, criterion="icii", layers=["a"])(group)
    torch.testing.assert_close(only_a[:4], scores["a"], rtol=1e-12, atol=1e-12)
    assert torch.equal(only_a[4:], torch.ones(4, dtype=torch.float64))

    # The data-free default: a, b and d share one group vector of icprune.score; a and b hold
    # its two halves (each min-max normalised within its layer), d all of it.
    wbn = {k: v.score for k, v in icprune.score(net, example_inputs=example).items()}
    assert torch.equal(wbn["d"], torch.cat([wbn["a"], wbn["b"]]))
    imp = InformationImportance(net, example_inputs=example)(group)
    expected = _minmax(wbn["d"]) + torch.cat([_minmax(wbn["a"]), _minmax(wbn["b"])])
    torch.testing.assert_close(imp, expected / 2, rtol=1e-12, atol=1e-12)


def test_group_without_scored_layer_is_skipped(model):
    importance = InformationImportance(model, criterion="icii", layers=["layer1.0.conv1"])
    results = {_root(g, model): importance(g) for g in _groups(model, EXAMPLE, model.fc)}
    assert results.pop("layer1.0.conv1") is not None
    assert all(v is None for v in results.values())

    pruned = copy.deepcopy(model)
    importance = InformationImportance(pruned, criterion="icii", layers=["layer1.0.conv1"])
    tp.pruner.MetaPruner(pruned, EXAMPLE, importance, ignored_layers=[pruned.fc]).step()
    assert pruned.layer1[0].conv1.out_channels == 8
    assert pruned.layer1[1].conv1.out_channels == 16 and pruned.conv1.out_channels == 16


def _prune_history(pruner) -> dict[str, list[int]]:
    return {name: sorted(idxs) for name, is_out, idxs in pruner.pruning_history() if is_out}


def _lowest(vec: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.sort(vec, stable=True).indices[:n].tolist())


@pytest.mark.parametrize(
    ("case", "global_pruning"),
    [("icii-weights", False), ("icii-features", True), ("greedy", False), ("wbn", True)],
)
def test_end_to_end_resnet20_matches_icprune_plan(model, batches, case, global_pruning):
    """Torch-Pruning's MetaPruner with this importance prunes exactly the channels icprune.plan
    prunes at the same ratio (same scores, same group scores): per group with local pruning,
    over all groups with global_pruning=True; the two pruned models compute the same logits.
    For the defaults ("greedy" with data, "wbn" data-free) and criterion="icii"."""
    tp_model = copy.deepcopy(model)
    data = batches if case in ("icii-features", "greedy") else None
    options = {"example_inputs": EXAMPLE} if case == "wbn" else {}
    if case.startswith("icii"):
        options["criterion"] = "icii"
    importance = InformationImportance(tp_model, data, progress=False, **options)
    assert importance.criterion == case.split("-")[0]
    pruner = tp.pruner.MetaPruner(
        tp_model,
        EXAMPLE,
        importance,
        pruning_ratio=0.5,
        global_pruning=global_pruning,
        ignored_layers=[tp_model.fc],
    )
    macs_before = icprune.count(tp_model, EXAMPLE)[0]
    pruner.step()
    macs_after = icprune.count(tp_model, EXAMPLE)[0]

    scores = icprune.score(model, data, progress=False, **options)
    plan = icprune.plan(
        model,
        scores,
        example_inputs=EXAMPLE,
        ratio=0.5,
        global_ranking=global_pruning,
        max_layer_ratio=1.0,
    )
    ours = icprune.apply(model, plan)
    for name, module in ours.named_modules():
        if isinstance(module, nn.Conv2d):
            assert dict(tp_model.named_modules())[name].out_channels == module.out_channels, name
    assert (macs_before, macs_after) == plan.macs
    if not global_pruning:
        assert tp_model.layer2[1].conv1.out_channels == 16 and tp_model.conv1.out_channels == 8
        assert macs_after < 0.3 * macs_before
    # The single-layer group layer1.0.conv1 lost its lowest-scored channels.
    history = _prune_history(pruner)
    removed = history["layer1.0.conv1"]
    channels = model.layer1[0].conv1.out_channels
    assert removed == _lowest(
        scores["layer1.0.conv1"].score, channels - len(plan.keep["layer1.0.conv1"])
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tp_model(x), ours(x), rtol=1e-4, atol=1e-5)


def test_iterative_steps_rescore_the_pruned_model(model, batches):
    """criterion="icii", iterative_steps=2: data-free scores come from the current (pruned)
    weights; with data the model is re-calibrated once per step."""
    _, removed, lowest = _second_step_removal(
        copy.deepcopy(model),
        lambda m: InformationImportance(m, criterion="icii"),
        lambda m: icprune.score(m, criterion="icii"),
    )
    assert removed == lowest

    pruned = copy.deepcopy(model)
    layers = iter(prunable_layers(pruned))  # a one-shot iterable of names is kept as a list
    importance = InformationImportance(
        pruned, batches, layers=layers, criterion="icii", progress=False
    )
    pruner = tp.pruner.MetaPruner(
        pruned, EXAMPLE, importance, iterative_steps=2, ignored_layers=[pruned.fc]
    )
    pruner.step()
    assert importance.calibrations == 1
    pruner.step()
    assert importance.calibrations == 2
    assert importance.stats["layer1.0.conv1"].num_channels == 12  # calibrated after step 1
    assert pruned.layer1[0].conv1.out_channels == 8
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_stats_alone_cannot_follow_a_pruned_model(model, batches):
    pruned = copy.deepcopy(model)
    stats = icprune.calibrate(pruned, batches, progress=False)
    importance = InformationImportance(pruned, stats=stats)
    pruner = tp.pruner.MetaPruner(
        pruned, EXAMPLE, importance, iterative_steps=2, ignored_layers=[pruned.fc]
    )
    pruner.step()
    with pytest.raises(ValueError, match=r"layer 'conv1' has changed .* InformationImportance\("):
        pruner.step()


def _second_step_removal(pruned, make, score_first):
    """Prune ``pruned`` in two steps with ``make(pruned)``; return (the importance, the channels
    of layer1.0.conv1 the second step removed, the lowest 4 by ``score_first`` of the model
    after the first step)."""
    importance = make(pruned)
    pruner = tp.pruner.MetaPruner(
        pruned, EXAMPLE, importance, iterative_steps=2, ignored_layers=[pruned.fc]
    )
    pruner.step()
    after_first = copy.deepcopy(pruned)
    assert pruned.layer1[0].conv1.out_channels == 12
    pruner.step()
    assert pruned.layer1[0].conv1.out_channels == 8
    second = pruner.pruning_history()[-12:]  # one entry per group and step
    removed = {n: sorted(i) for n, out, i in second if out}["layer1.0.conv1"]
    return importance, removed, _lowest(score_first(after_first)["layer1.0.conv1"].score, 4)


def test_iterative_steps_rescore_with_the_defaults(model, batches):
    """iterative_steps=2 with the defaults: data-free ("wbn") the second step ranks by the
    scores of the pruned weights; with data ("greedy") the consumers' inputs are re-calibrated
    once per step and the second step ranks by the scores of the pruned model on that data."""
    importance, removed, expected = _second_step_removal(
        copy.deepcopy(model),
        lambda m: InformationImportance(m, example_inputs=EXAMPLE),
        lambda m: icprune.score(m, example_inputs=EXAMPLE),
    )
    assert importance.criterion == "wbn" and importance.stats is None
    assert removed == expected

    importance, removed, expected = _second_step_removal(
        copy.deepcopy(model),
        lambda m: InformationImportance(m, batches, progress=False),
        lambda m: icprune.score(m, batches, progress=False),
    )
    assert importance.criterion == "greedy" and importance.calibrations == 2
    assert isinstance(importance.stats, InputStats)
    # layer1.0.conv2 reads layer1.0.conv1: 16 -> 12 -> 8 channels; calibrated after step 1.
    assert importance.stats["layer1.0.conv2"].num_channels == 12
    assert removed == expected


def test_input_stats_alone_cannot_follow_a_pruned_model(model, batches):
    pruned = copy.deepcopy(model)
    stats = icprune.calibrate(pruned, batches, read_at="input", progress=False)
    importance = InformationImportance(pruned, stats=stats)
    assert importance.criterion == "greedy" and importance.calibrations == 0
    pruner = tp.pruner.MetaPruner(
        pruned, EXAMPLE, importance, iterative_steps=2, ignored_layers=[pruned.fc]
    )
    pruner.step()
    with pytest.raises(
        ValueError, match=r"layer 'conv1' has changed .* InformationImportance\(model, data\)"
    ):
        pruner.step()


def test_criterion_and_stats_errors(model, batches):
    """Criteria and statistics that do not fit give errors naming the argument and what to
    pass."""
    per_layer = icprune.calibrate(model, batches, progress=False)
    inputs = icprune.calibrate(model, batches, read_at="input", progress=False)
    with pytest.raises(ValueError, match=r"criterion must be one of .*got 'l1'"):
        InformationImportance(model, example_inputs=EXAMPLE, criterion="l1")
    free = r"'wbn' \(data-free, the default without data\).*example_inputs=.*criterion='icii'"
    with pytest.raises(ValueError, match=free):
        InformationImportance(model)
    for data, stats in ((batches, None), (None, inputs)):
        with pytest.raises(ValueError, match="criterion='wbn' is data-free: pass neither"):
            InformationImportance(model, data, stats=stats, criterion="wbn", progress=False)
    with pytest.raises(ValueError, match=r"'greedy' needs calibration data .*read_at='input'"):
        InformationImportance(model, criterion="greedy")
    with pytest.raises(
        ValueError,
        match=r"criterion='greedy' .* per-layer .*read_at='input'\), or criterion='icii'",
    ):
        InformationImportance(model, stats=per_layer, criterion="greedy")
    with pytest.raises(
        ValueError, match=r"criterion='icii' .*InputStats.*stats=icprune.calibrate\(model, data\)"
    ):
        InformationImportance(model, stats=inputs, criterion="icii")
    with pytest.raises(TypeError, match="stats must be the InputStats"):
        InformationImportance(model, stats={"conv1": torch.zeros(16)}, criterion="greedy")
    with pytest.raises(ValueError, match="stats is empty"):
        InformationImportance(model, stats=InputStats({}, {}))
    with pytest.raises(ValueError, match=r"stats\['layer1.0.conv1'\] holds 5 channels .*16 input"):
        InformationImportance(model, stats=InputStats({"layer1.0.conv1": ChannelStats(5)}, {}))
    with pytest.raises(ValueError, match=r"stats\['layer9.conv'\] names no Conv/Linear"):
        InformationImportance(model, stats=InputStats({"layer9.conv": ChannelStats(5)}, {}))
    with pytest.raises(
        ValueError, match=r"'wbn' scores whole dependency groups and takes no layers="
    ):
        InformationImportance(model, example_inputs=EXAMPLE, layers=["conv1"])
    with pytest.raises(ValueError, match=r"'greedy' .* takes no source="):
        InformationImportance(model, batches, criterion="greedy", source="features")
    with pytest.raises(ValueError, match=r"criterion='wbn' .* does not take lam=0.5"):
        InformationImportance(model, example_inputs=EXAMPLE, lam=0.5)


def test_deterministic(model, batches):
    group = _groups(model, EXAMPLE, model.fc)[0]
    for make in (
        lambda: InformationImportance(model, criterion="icii"),
        lambda: InformationImportance(model, batches, criterion="icii", progress=False),
        lambda: InformationImportance(model, example_inputs=EXAMPLE),
        lambda: InformationImportance(model, batches, progress=False),
    ):
        assert torch.equal(make()(group), make()(group))


def test_errors(model, batches):
    with pytest.raises(TypeError, match="model must be the torch.nn.Module"):
        InformationImportance(model.state_dict())
    with pytest.raises(ValueError, match="source must be one of"):
        InformationImportance(model, source="activations")
    with pytest.raises(ValueError, match="data-free"):
        InformationImportance(model, batches, source="weights")
    with pytest.raises(ValueError, match="needs calibration data"):
        InformationImportance(model, source="features")
    stats = icprune.calibrate(model, batches, progress=False)
    with pytest.raises(ValueError, match="not both"):
        InformationImportance(model, batches, stats=stats)
    with pytest.raises(ValueError, match="yielded no batches"):
        InformationImportance(model, [], progress=False)
    with pytest.raises(TypeError, match="one-shot generator"):
        InformationImportance(model, (b for b in batches))
    with pytest.raises(TypeError, match="dict layer -> ChannelStats"):
        InformationImportance(model, stats={"conv1": torch.zeros(16)})
    with pytest.raises(ValueError, match="stats is empty"):
        InformationImportance(model, stats={})
    with pytest.raises(ValueError, match=r"stats\['layer1.0.conv1'\] holds 5 channels"):
        InformationImportance(model, stats={"layer1.0.conv1": ChannelStats(5)})
    with pytest.raises(ValueError, match=r"stats\['layer9.conv'\] names no Conv/Linear"):
        InformationImportance(model, stats={"layer9.conv": ChannelStats(5)})
    with pytest.raises(ValueError, match="lam must be"):
        InformationImportance(model, criterion="icii", lam=-1.0)
    with pytest.raises(ValueError, match=r"normalization \(norm=\) must be"):
        InformationImportance(model, batches, criterion="icii", norm="l2", progress=False)
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match="not a module of the model this importance"):
        InformationImportance(model, criterion="icii")(_groups(other, EXAMPLE, other.fc)[0])
    with pytest.raises(ValueError, match="not a module of the model this importance"):
        InformationImportance(model, example_inputs=EXAMPLE)(_groups(other, EXAMPLE, other.fc)[0])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), lam=st.floats(0, 4), norm=st.sampled_from(["minmax", "zscore"]))
def test_scores_lie_in_unit_interval(seed, lam, norm):
    """Any weights and options: one score per root channel in [0, 1]; a group of one scored
    layer spans exactly [0, 1] (min-max normalised)."""
    torch.manual_seed(seed)
    net = CatNet().eval()
    example = torch.randn(1, 3, 8, 8)
    for importance in (
        InformationImportance(net, criterion="icii", lam=lam, norm=norm),
        InformationImportance(net, example_inputs=example),
    ):
        for group in _groups(net, example, net.fc):
            imp = importance(group)
            assert imp.shape == (len(group[0].idxs),)
            assert imp.min() >= 0 and imp.max() <= 1
            if _root(group, net) == "e":
                assert imp.min() == 0 and imp.max() == 1


def test_import_errors_and_version_warning(monkeypatch):
    name = "icprune.integrations.torch_pruning"
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(tp, "__version__", "1.7.0")
    with pytest.warns(UserWarning, match="tested for Torch-Pruning 1.6.x; version 1.7.0"):
        importlib.import_module(name)
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"pip install 'icprune\[torch-pruning\]'"):
        importlib.import_module(name)


def test_import_icprune_does_not_import_torch_pruning():
    code = "import icprune, icprune.integrations, sys; assert 'torch_pruning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_snippet_runs():
    """The README's Torch-Pruning snippet, executed as written."""
    section = README.read_text().split("## Torch-Pruning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md#torch-pruning", "exec"), namespace)
    assert namespace["model"].layer1[0].conv1.out_channels < 16
