"""dependency: channel groups from the fx trace, cross-checked against Torch-Pruning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icprune.dependency import dependency_groups, trace_dependencies
from icprune.models import mobilenet_v2, resnet18, resnet50, resnet56, vgg16_bn

ZOO = {
    "resnet18": (resnet18, 64, "fc", 12),  # stem+layer1, 3 more stages, 8 inner convs
    "resnet50": (resnet50, 64, "fc", 37),  # stem, 4 stages, 16 blocks x 2 inner convs
    "resnet56": (resnet56, 32, "fc", 30),  # 3 stages, 27 inner convs
    "vgg16_bn": (vgg16_bn, 64, "classifier.6", 15),  # 13 convs, 2 hidden linears
    "mobilenet_v2": (mobilenet_v2, 64, "classifier.1", 25),  # 17 expansions+stem, 7 stages, last
}


def _ours(groups) -> set[frozenset[tuple[str, str]]]:
    """Each group as a set of (module, role): role "out" for layers whose output channels are
    the group's (conv, linear, depthwise conv), "norm" for BatchNorms, "in" for consumers."""
    role = {"output": "out", "depthwise": "out", "norm": "norm", "input": "in"}
    return {frozenset((d.module, role[d.kind]) for d in g.dependencies) for g in groups}


def _torch_pruning(model: nn.Module, x: torch.Tensor, classifier: str):
    """Torch-Pruning's groups in the same form. Mapping: TP prunes a depthwise conv with
    ``prune_out_channels`` (its input channels follow inside the handler), which is our
    "depthwise" kind; TP's elementwise/reshape pseudo-nodes are dropped (we have no such
    nodes, the operations are folded into the layouts)."""
    tp = pytest.importorskip("torch_pruning")
    names = {m: n for n, m in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    found = set()
    ignored = [dict(model.named_modules())[classifier]]
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        members = set()
        for dep, _ in group:
            module = dep.target.module
            if module not in names:
                continue
            out = dep.handler.__name__ == "prune_out_channels"
            if isinstance(module, nn.BatchNorm2d):
                members.add((names[module], "norm"))
            else:
                members.add((names[module], "out" if out else "in"))
        found.add(frozenset(members))
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Linear]):
        members = {
            (names[dep.target.module], "out" if "out" in dep.handler.__name__ else "in")
            for dep, _ in group
            if dep.target.module in names
        }
        found.add(frozenset(members))
    return found


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_groups_match_torch_pruning(name):
    factory, size, classifier, expected = ZOO[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(1, 3, size, size)
    groups = dependency_groups(model, x)
    assert len(groups) == expected
    ours = _ours(groups)
    assert len(ours) == expected  # no group twice
    assert ours == _torch_pruning(model, x, classifier)
    covered = [d.module for g in groups for d in g.dependencies if d.kind != "input"]
    assert len(covered) == len(set(covered))  # every layer's output channels in one group
    assert classifier not in covered


def test_resnet50_residual_group_and_flatten_repeat():
    torch.manual_seed(0)
    groups = dependency_groups(resnet50(), torch.randn(1, 3, 64, 64))
    stage4 = next(g for g in groups if "layer4.0.downsample.0" in g.layers)
    assert stage4.channels == 2048
    assert set(stage4.layers) == {
        "layer4.0.downsample.0", "layer4.0.conv3", "layer4.1.conv3", "layer4.2.conv3"
    }  # fmt: skip
    assert {d.module for d in stage4.dependencies if d.kind == "input"} == {
        "layer4.1.conv1", "layer4.2.conv1", "fc"
    }  # fmt: skip
    groups = dependency_groups(vgg16_bn(), torch.randn(1, 3, 64, 64))
    last = next(g for g in groups if "features.40" in g.layers)
    fc = next(d for d in last.dependencies if d.module == "classifier.0")
    assert (fc.kind, fc.offset, fc.repeat) == ("input", 0, 49)  # 7x7 adaptive pool, flattened


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.mix = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        y = self.dw(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))
        y = F.adaptive_avg_pool2d(self.mix(y), 2)
        return self.fc(y.view(y.size(0), -1))


def test_cat_offsets_depthwise_and_view_flatten():
    groups = dependency_groups(_Cat(), torch.randn(2, 3, 8, 8))
    by_layer = {g.layers[0]: g for g in groups}
    assert set(by_layer) == {"a", "b", "mix"}
    deps = {d.module: (d.kind, d.offset, d.repeat) for d in by_layer["b"].dependencies}
    assert deps == {
        "b": ("output", 0, 1),
        "bn": ("norm", 4, 1),
        "dw": ("depthwise", 4, 1),
        "mix": ("input", 4, 1),
    }
    assert by_layer["b"].layers == ("b", "dw")
    assert {d.module: d.offset for d in by_layer["a"].dependencies}["mix"] == 0
    fc = next(d for d in by_layer["mix"].dependencies if d.module == "fc")
    assert (fc.kind, fc.offset, fc.repeat) == ("input", 0, 4)


class _Opaque(nn.Module):
    """A grouped conv, a conv called twice, a per-channel PReLU and a channel slice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.shared = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.prelu = nn.PReLU(8)
        self.d = nn.Conv2d(8, 8, 1)
        self.e = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.shared(self.shared(self.grouped(self.stem(x))))
        y = self.d(self.prelu(self.c(y)))
        return self.fc(self.e(y[:, :4]).mean((2, 3)))


def test_unsupported_operations_block_their_channels():
    groups = dependency_groups(_Opaque(), torch.randn(1, 3, 6, 6))
    assert [g.layers for g in groups] == [("e",)]  # after the slice, mean -> fc is fine


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = _Gate()
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv2(self.gate(self.conv(x))).mean((2, 3)))


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow


def test_untraceable_submodule_named_and_ignorable():
    model, x = _Untraceable(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"inside submodule 'gate'.*ignored_layers"):
        dependency_groups(model, x)
    groups = dependency_groups(model, x, ignored_layers=["gate"])
    assert [g.layers for g in groups] == [("conv2",)]  # conv feeds the opaque gate: kept whole


def test_ignored_layer_removes_its_whole_group():
    torch.manual_seed(0)
    model, x = resnet18(), torch.randn(1, 3, 64, 64)
    groups = dependency_groups(model, x, ignored_layers=["layer1.1.conv2", "layer2.0.bn1"])
    layers = {layer for g in groups for layer in g.layers}
    assert len(groups) == 10
    assert "conv1" not in layers and "layer1.0.conv2" not in layers  # coupled by the residual
    assert "layer2.0.conv1" not in layers


@pytest.mark.parametrize("bad", [["nope"], "conv1"])
def test_bad_ignored_layers(bad):
    with pytest.raises((ValueError, TypeError), match="ignored_layers"):
        dependency_groups(resnet18(), torch.randn(1, 3, 32, 32), ignored_layers=bad)


def test_trace_leaves_model_untouched_and_counts_macs():
    torch.manual_seed(0)
    model = resnet56().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deps = trace_dependencies(model, torch.randn(2, 3, 32, 32))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert deps.macs == 2 * 125_747_840
    assert deps.shapes["layer3.0.conv1"].positions == 2 * 8 * 8
    assert deps.shapes["fc"].positions == 2
