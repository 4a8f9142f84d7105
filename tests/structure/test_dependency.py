"""dependency: channel groups from an fx trace, cross-checked against Torch-Pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icprune.models import mobilenet_v2, resnet18, resnet20, resnet50, resnet56, vgg16_bn
from icprune.structure.dependency import Dependency, dependency_groups, trace_dependencies

AXIS = {"output": "out", "depthwise": "out", "batchnorm": "out", "input": "in"}

ZOO = [
    (resnet18, (1, 3, 64, 64), "fc"),
    (resnet50, (1, 3, 64, 64), "fc"),
    (resnet56, (1, 3, 32, 32), "fc"),
    (vgg16_bn, (1, 3, 64, 64), "classifier.6"),
    (mobilenet_v2, (1, 3, 64, 64), "classifier.1"),
]


def _ours(groups) -> set[frozenset]:
    return {frozenset((d.module, AXIS[d.kind]) for d in g.dependencies) for g in groups}


def _torch_pruning(model: nn.Module, shape: tuple[int, ...], classifier: str) -> set[frozenset]:
    """Torch-Pruning's groups as sets of (module, "out"/"in").

    Mapping: TP lists a depthwise conv once, with prune_out_channels (its input follows through
    groups), which is our kind "depthwise"; its pseudo-modules (elementwise, reshape, concat
    nodes) carry no parameters and are dropped; only conv, linear and BatchNorm entries count.
    """
    tp = pytest.importorskip("torch_pruning")
    names = {m: n for n, m in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(*shape))
    modules = dict(model.named_modules())
    groups = set()
    for group in graph.get_all_groups(
        ignored_layers=[modules[classifier]], root_module_types=[nn.Conv2d, nn.Linear]
    ):
        items = set()
        for dep, _ in group:
            module = dep.target.module
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                axis = "out" if dep.handler.__name__ == "prune_out_channels" else "in"
                items.add((names[module], axis))
        groups.add(frozenset(items))
    return groups


@pytest.mark.parametrize(
    ("factory", "shape", "classifier"), ZOO, ids=lambda v: getattr(v, "__name__", None)
)
def test_groups_match_torch_pruning(factory, shape, classifier):
    torch.manual_seed(0)
    model = factory().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = dependency_groups(model, torch.randn(*shape))
    assert _ours(groups) == _torch_pruning(model, shape, classifier)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(
        d.module == classifier and d.kind == "output" for g in groups for d in g.dependencies
    )


def test_resnet50_residual_stage_is_one_group():
    torch.manual_seed(0)
    model = resnet50()
    groups = dependency_groups(model, torch.randn(1, 3, 64, 64))
    stage2 = next(g for g in groups if "layer2.0.conv3" in g.layers)
    assert stage2.channels == 512
    assert set(stage2.layers) == {"layer2.0.downsample.0"} | {f"layer2.{i}.conv3" for i in range(4)}
    consumers = {d.module for d in stage2.dependencies if d.kind == "input"}
    assert consumers == {f"layer2.{i}.conv1" for i in (1, 2, 3)} | {
        "layer3.0.conv1",
        "layer3.0.downsample.0",
    }


class CatFlatten(nn.Module):
    """Two branches concatenated along channels, a depthwise conv over the cat, flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(40, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        y = self.pool(self.dw(y))
        return self.head(torch.relu(self.fc(y.flatten(1))))


def test_cat_offsets_and_flatten_repeat():
    groups = dependency_groups(CatFlatten(), torch.randn(1, 3, 8, 8))
    by_layer = {g.layers[0]: g for g in groups}
    a, b = by_layer["a"], by_layer["b"]
    assert {(d.module, d.kind, d.offset, d.repeat) for d in a.dependencies} == {
        ("a", "output", 0, 1), ("bn", "batchnorm", 0, 1), ("dw", "depthwise", 0, 1),
        ("fc", "input", 0, 4),
    }  # fmt: skip
    assert {(d.module, d.kind, d.offset, d.repeat) for d in b.dependencies} == {
        ("b", "output", 0, 1), ("bn", "batchnorm", 4, 1), ("dw", "depthwise", 4, 1),
        ("fc", "input", 16, 4),
    }  # fmt: skip
    assert by_layer["fc"].channels == 7 and "head" not in by_layer


class Shared(nn.Module):
    """A conv applied twice, a grouped conv, and a per-channel PReLU: all opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.twice = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.prelu = nn.PReLU(8)
        self.last = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.twice(self.twice(self.stem(x)))
        return self.tail(self.last(self.prelu(self.grouped(x))))


def test_shared_grouped_and_prelu_are_opaque():
    groups = dependency_groups(Shared(), torch.randn(1, 3, 8, 8))
    assert [g.layers for g in groups] == [("last",)]  # only last -> tail is a plain pair


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x * 2
        return x


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.odd = Untraceable()
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c4(self.c3(self.c2(self.odd(self.c1(x)))))


def test_untraceable_submodule_error_names_it_and_ignoring_it_works():
    model, x = WithUntraceable(), torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"inside submodule 'odd'.*ignored_layers"):
        dependency_groups(model, x)
    groups = dependency_groups(model, x, ignored_layers=["odd"])
    assert [g.layers for g in groups] == [("c2",), ("c3",)]  # c1 feeds the opaque module


def test_ignored_layers_drop_their_whole_group():
    torch.manual_seed(0)
    model = resnet56()
    x = torch.randn(1, 3, 32, 32)
    full = trace_dependencies(model, x).groups
    fewer = trace_dependencies(model, x, ignored_layers=["layer1.3.bn2", "layer2.0.conv1"]).groups
    assert len(fewer) == len(full) - 2
    assert not any("layer1.3.conv2" in g.layers or "layer2.0.conv1" in g.layers for g in fewer)
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        trace_dependencies(model, x, ignored_layers=["nope"])


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (
            torch.randn(1, 1, 32, 32),
            r"\(1, 1, 32, 32\) torch.float32 on cpu'\] at 'conv1' "
            r"\(RuntimeError: Given groups=1",
        ),
        (torch.randn(1, 3, 32, 32).long(), r"\(1, 3, 32, 32\) torch.int64 on cpu'\] at 'conv1'"),
        (
            torch.randn(1, 3, 32, 32, device="meta"),
            r"\(1, 3, 32, 32\) torch.float32 on meta'\] at 'bn1'",
        ),
    ],
    ids=["channels", "dtype", "device"],
)
def test_example_inputs_the_model_rejects_are_named_without_a_traceback(example, message, capsys):
    with pytest.raises(ValueError, match=rf"the model fails on example_inputs \['{message}"):
        dependency_groups(resnet20(), example)
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------- gates, tokens, channels-last maps


def _deps(group) -> set[tuple[str, str, int, int]]:
    return {(d.module, d.kind, d.offset, d.repeat) for d in group.dependencies}


@pytest.mark.parametrize("gate", [nn.Sigmoid, nn.Hardsigmoid], ids=["sigmoid", "hardsigmoid"])
def test_squeeze_excitation_gate_couples_the_gated_map(gate):
    from tests.structure.nets import SENet

    groups = dependency_groups(SENet(gate), torch.randn(1, 3, 8, 8))
    by_layer = {g.layers[0]: g for g in groups}
    assert _deps(by_layer["expand"]) == {
        ("expand", "output", 0, 1), ("expand_bn", "batchnorm", 0, 1), ("dw", "depthwise", 0, 1),
        ("dw_bn", "batchnorm", 0, 1), ("se.fc1", "input", 0, 1), ("se.fc2", "output", 0, 1),
        ("project", "input", 0, 1),
    }  # fmt: skip
    assert _deps(by_layer["se.fc1"]) == {("se.fc1", "output", 0, 1), ("se.fc2", "input", 0, 1)}
    assert by_layer["stem"].layers == ("stem", "project")
    assert set(by_layer) == {"stem", "expand", "se.fc1", "head"}


class SpatialGate(nn.Module):
    """A one-channel spatial gate (CBAM-style): it broadcasts over the channels, which stay
    apart; a gate of another channel count than the map is opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.att = nn.Conv2d(8, 1, 1)
        self.other = nn.Conv2d(8, 4, 1)
        self.tail = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(self.att(y))
        return self.tail(y), self.other(y).mean((2, 3), keepdim=True) * x.mean(1, keepdim=True)


def test_a_one_channel_gate_broadcasts_and_stays_apart():
    groups = dependency_groups(SpatialGate(), torch.randn(1, 3, 4, 4))
    # att's one channel is a group of its own; other's gate (N, 4, 1, 1) times the (N, 1, 4, 4)
    # map has no operand shaped like the result: opaque
    assert [g.layers for g in groups] == [("conv",), ("att",)]
    assert _deps(groups[1]) == {("att", "output", 0, 1)}
    assert _deps(groups[0]) == {
        ("conv", "output", 0, 1), ("att", "input", 0, 1), ("other", "input", 0, 1),
        ("tail", "input", 0, 1),
    }  # fmt: skip


def test_channels_last_convnext_blocks_layernorm2d_and_layer_scale():
    from tests.structure.nets import ConvNeXtNet

    groups = dependency_groups(ConvNeXtNet(), torch.randn(1, 3, 16, 16))
    by_layer = {g.layers[0]: g for g in groups}
    block = lambda b: {  # noqa: E731
        (f"{b}.dw", "depthwise", 0, 1), (f"{b}.norm", "layernorm", 0, 1),
        (f"{b}.fc1", "input", 0, 1), (f"{b}.fc2", "output", 0, 1),
        (f"{b}.layer_scale", "parameter", 0, 1),
    }  # fmt: skip
    assert _deps(by_layer["stem"]) == {
        ("stem", "output", 0, 1), ("stem_norm", "layernorm", 0, 1),
        ("down_norm", "layernorm", 0, 1), ("down", "input", 0, 1),
    } | block("block1") | block("block2")  # fmt: skip
    assert _deps(by_layer["down"]) == {
        ("down", "output", 0, 1), ("norm", "layernorm", 0, 1), ("fc", "input", 0, 1),
    } | block("block3")  # fmt: skip
    for b, width in (("block1", 32), ("block2", 32), ("block3", 48)):
        hidden = by_layer[f"{b}.fc1"]
        assert hidden.channels == width
        assert _deps(hidden) == {(f"{b}.fc1", "output", 0, 1), (f"{b}.fc2", "input", 0, 1)}
    assert len(groups) == 5


def test_token_linears_through_flatten_reshape_and_mean():
    from tests.structure.nets import TokenMLP

    groups = dependency_groups(TokenMLP(), torch.randn(2, 5, 6))
    assert [(g.channels, _deps(g)) for g in groups] == [
        (12, {("fc1", "output", 0, 1), ("fc2", "input", 0, 1)}),
        (8, {("fc2", "output", 0, 1), ("fc3", "input", 0, 1)}),
        (10, {("fc3", "output", 0, 1), ("head", "input", 0, 1)}),
    ]


def test_channels_read_along_another_axis_are_not_pruned():
    from tests.structure.nets import ChannelsLastMisuse

    groups = dependency_groups(ChannelsLastMisuse(), torch.randn(2, 5, 6))
    # fc's features are the Conv1d's length and fc2's are max-pooled: neither is in a group
    assert [_deps(g) for g in groups] == [{("conv", "output", 0, 1), ("head", "input", 0, 8)}]


class SharedLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.cat([self.norm(self.fc1(x)), self.norm(self.fc2(x))], -1))


def test_a_layernorm_called_twice_is_opaque():
    assert dependency_groups(SharedLayerNorm(), torch.randn(2, 3, 4)) == []


class TwoScales(nn.Module):
    """One per-channel scale applied to two maps that are then added (fx reads it once), and a
    (4, 4) parameter with two wide axes over the spatial axes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))
        self.table = nn.Parameter(torch.ones(4, 4))
        self.tail = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x) * self.scale + self.conv2(x) * self.scale
        return self.tail(y * self.table)


def test_a_shared_scale_couples_its_maps_and_a_spatial_table_stays_apart():
    (group,) = dependency_groups(TwoScales(), torch.randn(1, 3, 4, 4))
    assert _deps(group) == {
        ("conv", "output", 0, 1), ("conv2", "output", 0, 1), ("scale", "parameter", 0, 1),
        ("tail", "input", 0, 1),
    }  # fmt: skip


def test_grouped_convs_are_pruned_within_their_groups():
    from tests.structure.nets import ResNeXtNet

    groups = dependency_groups(ResNeXtNet(), torch.randn(1, 3, 8, 8))
    by_layer = {g.layers[0]: g for g in groups}
    # conv1a's 24 outputs feed 4 groups of 6: 6 units, position p of every group
    assert by_layer["conv1a"].channels == 6
    assert _deps(by_layer["conv1a"]) == {
        (m, kind, 6 * g, 1) for m, kind in (("conv1a", "output"), ("bn1a", "batchnorm"),
                                            ("conv1b", "input")) for g in range(4)
    }  # fmt: skip
    assert by_layer["conv1b"].channels == 8
    assert _deps(by_layer["conv1b"]) == {
        (m, kind, 8 * g, 1) for m, kind in (("conv1b", "output"), ("bn1b", "batchnorm"),
                                            ("conv1c", "input")) for g in range(4)
    }  # fmt: skip
    # the squeeze-excitation gate of a grouped conv's output is tiled the same way
    gated = by_layer["conv2b"]
    assert {(m, o) for m, k, o, _ in _deps(gated) if m.startswith("se2")} == {
        (m, 8 * g) for m in ("se2.fc1", "se2.fc2") for g in range(4)
    }
    assert by_layer["stem"].channels == 16 and len(groups) == 6


class OddGroups(nn.Module):
    """A grouped conv reading a cat of two spaces (its groups straddle them): opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 2, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.tail = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.tail(self.grouped(torch.cat([self.a(x), self.b(x)], 1)))


def test_a_grouped_conv_whose_groups_straddle_spaces_is_opaque():
    assert dependency_groups(OddGroups(), torch.randn(1, 3, 4, 4)) == []


def test_attention_heads_are_one_group_with_out_proj_reading_them():
    from tests.structure.nets import ViTNet

    model = ViTNet().eval()
    deps = trace_dependencies(model, torch.randn(1, 3, 16, 16))
    heads = [g for g in deps.groups if g.dependencies[0].kind == "heads"]
    assert [(g.channels, g.layers) for g in heads] == [
        (4, ("block1.self_attention",)),
        (4, ("block2.self_attention",)),
    ]
    for g in heads:
        name = g.layers[0]
        assert g.dependencies[1:] == (Dependency(f"{name}.out_proj", "input", 0, 6),)
        shape = deps.shapes[name]
        # per head: q, k, v and out projections of 17 tokens of 24 features, Q K^T and A V
        assert (shape.kind, shape.out_channels) == ("attention", 4)
        assert shape.positions == 6 * (4 * 17 * 24 + 2 * 17 * 17)
        assert shape.kernel == 3 * 6 * (24 + 1)
    # the MLPs stay groups; the residual stream (class token, position embedding) is opaque
    assert sorted(g.channels for g in deps.groups) == [4, 4, 32, 32]


def test_attention_called_twice_or_ignored_is_opaque():
    from tests.structure.nets import EncoderBlock

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = EncoderBlock(8, 2, 16)

        def forward(self, x):
            y, _ = self.block.self_attention(x, x, x, need_weights=False)
            z, _ = self.block.self_attention(y, y, y, need_weights=False)
            return self.block.fc2(torch.relu(self.block.fc1(z))).mean(1)

    x = torch.randn(1, 3, 8)
    assert [g.channels for g in dependency_groups(Twice(), x)] == [16]
    block = EncoderBlock(8, 2, 16)
    assert [g.channels for g in dependency_groups(block, x)] == [2, 16]
    assert [g.channels for g in dependency_groups(block, x, ignored_layers=["self_attention"])] == [
        16
    ]


def test_window_attention_heads_and_their_cost():
    from tests.structure.nets import SwinNet

    model = SwinNet().eval()
    deps = trace_dependencies(model, torch.randn(1, 3, 24, 24))
    heads = [g for g in deps.groups if g.dependencies[0].kind == "heads"]
    assert [g.layers for g in heads] == [("block1.attn",), ("block2.attn",)]
    assert heads[0].dependencies[1:] == (Dependency("block1.attn.proj", "input", 0, 4),)
    tokens = 8 * 8  # the 6 x 6 map padded to two 4 x 4 windows a side
    v1, v2 = deps.shapes["block1.attn"], deps.shapes["block2.attn"]
    assert v1.positions == 4 * (4 * tokens * 16 + 2 * tokens * 16)
    assert v1.kernel == 3 * 4 * (16 + 1) + 7 * 7  # q, k, v rows and a bias table column
    assert v2.positions == v1.positions + 7 * 7 * 512  # and a row of the position-bias MLP
    assert v2.kernel == 3 * 4 * (16 + 1) + 512 + 1  # that row and a logit scale
