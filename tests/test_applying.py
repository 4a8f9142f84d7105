"""applying: the pruned model equals the masked original; the original is left untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import icprune
from icprune.applying import apply
from icprune.models import mobilenet_v2, resnet18, resnet20, resnet50, resnet56, vgg16_bn
from icprune.planning import PruningPlan, plan
from icprune.structure.layers import embed_dim, head_dim, is_attention, projection

ZOO = [
    (resnet18, (2, 3, 64, 64)),
    (resnet50, (2, 3, 64, 64)),
    (resnet56, (2, 3, 32, 32)),
    (vgg16_bn, (2, 3, 64, 64)),
    (mobilenet_v2, (2, 3, 64, 64)),
]


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so a zeroed channel's BN output is
    not zero by accident."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
    return model.eval()


def l1_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """L1 norm of every prunable layer's filters: a cheap criterion (plan takes any scores)."""
    return {
        name: m.weight.detach().flatten(1).abs().sum(1)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def masked_output(model: nn.Module, chosen: PruningPlan, x: torch.Tensor) -> torch.Tensor:
    """The original model's output with the pruned channels zeroed at the output of every module
    of their group (the conv/linear producers, their BatchNorms, depthwise convs)."""
    modules = dict(model.named_modules())
    hooks = []
    for name in dict.fromkeys(
        d.module for g in chosen.groups for d in g.dependencies if d.kind != "input"
    ):
        mask = torch.zeros(chosen.sizes[name][0])
        mask[chosen.indices(name, "out")] = 1.0

        def hook(module, args, out, mask=mask):
            return out * mask.view(1, -1, *([1] * (out.dim() - 2)))

        hooks.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(("factory", "shape"), ZOO, ids=lambda v: getattr(v, "__name__", None))
def test_pruned_equals_masked_original(factory, shape):
    torch.manual_seed(0)
    model = randomize_norms(factory())
    x = torch.randn(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = plan(model, l1_scores(model), example_inputs=x[:1], flops_reduction=0.5)
    pruned = apply(model, chosen)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    with torch.no_grad():
        got = pruned(x)
    want = masked_output(model, chosen, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    macs, params = icprune.count(pruned, x[:1])
    assert (macs, params) == (chosen.macs[1], chosen.params[1])  # analytic cost is exact
    assert abs(chosen.flops_reduction - 0.5) <= 0.01
    for name, kept in chosen.keep.items():
        assert dict(pruned.named_modules())[name].weight.shape[0] == len(kept)


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = nn.functional.adaptive_avg_pool2d(self.dw_bn(self.dw(y)), 2)
        return self.head(torch.relu(self.fc(torch.flatten(y, 1))))


def test_cat_depthwise_flatten_equivalence():
    torch.manual_seed(0)
    model = randomize_norms(CatNet())
    x = torch.randn(3, 3, 8, 8)
    scores = {n: torch.randn(getattr(model, n).weight.shape[0]) for n in ("a", "b", "fc")}
    chosen = plan(model, scores, example_inputs=x, ratio=0.5, global_ranking=False)
    pruned = apply(model, chosen)
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == 8
    assert pruned.fc.in_features == 8 * 4 and pruned.fc.out_features == 6
    torch.testing.assert_close(pruned(x).detach(), masked_output(model, chosen, x))


def test_inplace_and_flags():
    torch.manual_seed(0)
    model = resnet56().train()
    model.conv1.weight.requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    chosen = plan(model, icprune.score(model, source="weights"), example_inputs=x, ratio=0.3)
    copy = apply(model, chosen)
    assert copy is not model and copy.training and not copy.conv1.weight.requires_grad
    assert copy.layer1[0].bn1.num_batches_tracked is not model.layer1[0].bn1.num_batches_tracked
    same = apply(model, chosen, inplace=True)
    assert same is model and model.conv1.out_channels == len(chosen.keep["conv1"])
    with pytest.raises(ValueError, match="does not match this model"):
        apply(model, chosen)  # already pruned: channel counts differ


# --------------------------------------------------------- the whole model against the plan


def _resnet20_plan():
    from icprune.models import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()
    chosen = plan(model, l1_scores(model), example_inputs=torch.randn(1, 3, 32, 32), ratio=0.3)
    return model, chosen


def test_a_plan_for_another_model_is_refused_naming_what_differs():
    _, chosen = _resnet20_plan()
    deeper = resnet56().eval()  # resnet20's modules are all there, with the same channels
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"apply: the plan does not match this model .*72 module\(s\) the plan does not "
        r"know, first 'layer1\.3\.conv1' \(Conv2d\(out=16, in=16\)\)",
    ):
        apply(deeper, chosen, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())


def test_a_model_changed_between_plan_and_apply_is_refused():
    model, chosen = _resnet20_plan()
    model.extra = nn.Conv2d(3, 8, 1)  # a module added after planning
    with pytest.raises(ValueError, match=r"does not know, first 'extra'"):
        apply(model, chosen)
    del model.extra
    model.layer1[0].bn1 = nn.BatchNorm2d(16, affine=False)  # same channels, still the same type
    apply(model, chosen)
    model.layer1[0].bn1 = nn.GroupNorm(4, 16)  # another type
    with pytest.raises(ValueError, match=r"missing, first 'layer1\.0\.bn1'"):
        apply(model, chosen)


def test_a_version_1_plan_without_structure_still_applies():
    model, chosen = _resnet20_plan()
    data = json.loads(chosen.to_json())
    data["version"] = 1
    del data["structure"]
    old = PruningPlan.from_json(json.dumps(data))
    assert old.structure is None
    pruned = apply(model, old)
    assert pruned.conv1.out_channels == len(chosen.keep["conv1"])


def test_a_plan_pruning_a_module_as_the_wrong_kind_is_refused():
    model, chosen = _resnet20_plan()
    data = json.loads(chosen.to_json())
    deps = data["groups"][0]["dependencies"]
    conv = next(d for d in deps if d[1] == "output")
    conv[1] = "depthwise"
    with pytest.raises(ValueError, match=rf"prunes '{conv[0]}' as 'depthwise', but it is a Conv2d"):
        apply(model, PruningPlan.from_json(json.dumps(data)))


# ------------------------------------------------------------- gates, tokens, channels-last maps


def _masked_last_axis(model: nn.Module, chosen: PruningPlan, x: torch.Tensor) -> torch.Tensor:
    """:func:`masked_output` for linear layers over tokens: their channels are the last axis."""
    modules = dict(model.named_modules())
    hooks = []
    for name in dict.fromkeys(
        d.module for g in chosen.groups for d in g.dependencies if d.kind != "input"
    ):
        mask = torch.zeros(chosen.sizes[name][0])
        mask[chosen.indices(name, "out")] = 1.0
        hooks.append(modules[name].register_forward_hook(lambda m, a, out, mask=mask: out * mask))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("gate", [nn.Sigmoid, nn.Hardsigmoid], ids=["sigmoid", "hardsigmoid"])
def test_squeeze_excitation_pruned_equals_masked(gate):
    from tests.structure.nets import SENet

    torch.manual_seed(0)
    model = randomize_norms(SENet(gate))
    x = torch.randn(2, 3, 8, 8)
    chosen = plan(model, l1_scores(model), example_inputs=x[:1], ratio=0.4)
    pruned = apply(model, chosen)
    kept = len(chosen.indices("expand", "out"))
    assert kept < 24 and pruned.se.fc2.out_channels == pruned.se.fc1.in_channels == kept
    assert pruned.dw.groups == pruned.project.in_channels == kept
    want = masked_output(model, chosen, x)
    torch.testing.assert_close(pruned(x).detach(), want, rtol=1e-5, atol=1e-6)
    assert icprune.count(pruned, x[:1]) == (chosen.macs[1], chosen.params[1])


def test_token_mlp_pruned_equals_masked():
    from tests.structure.nets import TokenMLP

    torch.manual_seed(0)
    model = TokenMLP().eval()
    x = torch.randn(3, 5, 6)
    chosen = plan(model, l1_scores(model), example_inputs=x[:1], ratio=0.5, global_ranking=False)
    pruned = apply(model, chosen)
    assert (pruned.fc1.out_features, pruned.fc2.out_features, pruned.fc3.out_features) == (6, 4, 5)
    torch.testing.assert_close(pruned(x).detach(), _masked_last_axis(model, chosen, x))
    assert icprune.count(pruned, x[:1]) == (chosen.macs[1], chosen.params[1])


def test_convnext_blocks_prune_with_their_layernorms():
    from tests.structure.nets import ConvNeXtNet

    torch.manual_seed(0)
    model = ConvNeXtNet().eval()
    x = torch.randn(2, 3, 16, 16)
    chosen = plan(model, l1_scores(model), example_inputs=x[:1], flops_reduction=0.4)
    pruned = apply(model, chosen)
    stream = len(chosen.indices("stem", "out"))
    assert stream < 8
    for norm in (pruned.stem_norm, pruned.block1.norm, pruned.block2.norm, pruned.down_norm):
        assert norm.normalized_shape == (stream,) and norm.weight.shape == norm.bias.shape
        assert norm.weight.shape == (stream,)
    assert pruned.block1.dw.groups == pruned.down.in_channels == stream
    assert pruned.block1.layer_scale.shape == pruned.block2.layer_scale.shape == (stream, 1, 1)
    assert torch.equal(
        pruned.block2.layer_scale, model.block2.layer_scale[chosen.indices("stem", "out")]
    )
    assert pruned(x).shape == (2, 5) and torch.isfinite(pruned(x)).all()
    assert icprune.count(pruned, x[:1]) == (chosen.macs[1], chosen.params[1])
    assert abs(chosen.flops_reduction - 0.4) <= 0.01
    # a LayerNorm keeps the kept channels' weights; what it normalises over changes
    keep = chosen.indices("stem", "out")
    assert torch.equal(pruned.block1.norm.weight, model.block1.norm.weight[keep])
    again = PruningPlan.from_json(chosen.to_json())
    assert again.to_json() == chosen.to_json()
    again_state, state = apply(model, again).state_dict(), pruned.state_dict()
    assert list(again_state) == list(state)
    assert all(torch.equal(again_state[k], state[k]) for k in state)


def test_a_plan_whose_per_channel_parameter_differs_is_refused():
    from tests.structure.nets import ConvNeXtNet

    torch.manual_seed(0)
    model = ConvNeXtNet().eval()
    chosen = plan(model, l1_scores(model), example_inputs=torch.randn(1, 3, 16, 16), ratio=0.3)
    model.block2.layer_scale = nn.Parameter(torch.ones(8, 2, 1))
    with pytest.raises(ValueError, match=r"apply: .* at 'block2.layer_scale': it expects a per"):
        apply(model, chosen)


def test_grouped_convs_pruned_within_groups_equal_masked():
    from tests.structure.nets import ResNeXtNet

    torch.manual_seed(0)
    model = randomize_norms(ResNeXtNet())
    x = torch.randn(2, 3, 8, 8)
    chosen = plan(model, l1_scores(model), example_inputs=x[:1], flops_reduction=0.4)
    pruned = apply(model, chosen)
    for conv in (pruned.conv1b, pruned.conv2b):
        assert conv.groups == 4 and conv.in_channels < 24 and conv.out_channels % 4 == 0
    kept = chosen.indices("conv1a", "out").view(4, -1) - torch.arange(4).view(-1, 1) * 6
    assert bool((kept == kept[0]).all())  # the same positions in every group
    torch.testing.assert_close(pruned(x).detach(), masked_output(model, chosen, x))
    assert icprune.count(pruned, x[:1]) == (chosen.macs[1], chosen.params[1])


def test_a_plan_keeping_other_positions_per_group_is_refused():
    from tests.structure.nets import ResNeXtNet

    model = ResNeXtNet().eval()
    chosen = plan(model, l1_scores(model), example_inputs=torch.randn(1, 3, 8, 8), ratio=0.3)
    data = json.loads(chosen.to_json())
    group = next(g for g in data["groups"] if g["dependencies"][0][0] == "conv1a")
    first = next(d for d in group["dependencies"] if d[0] == "conv1b" and d[2] == 0)
    first[2] = 1  # conv1b's first tile shifted by one channel
    edited = PruningPlan.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="apply: the plan keeps input channels .* 'conv1b'"):
        apply(model, edited)


def test_apply_with_stats_repairs_in_place_or_on_a_copy():
    from icprune.calibrate import calibrate_inputs
    from icprune.recovery.repair import repair

    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(8, 3, 32, 32)
    stats = calibrate_inputs(model, [x], progress=False)
    chosen = plan(model, icprune.score(model, example_inputs=x[:1]), example_inputs=x, ratio=0.3)
    expected = repair(model, apply(model, chosen), chosen, stats)
    copied = apply(model, chosen, stats=stats)
    inplace = apply(copy.deepcopy(model), chosen, stats=stats, inplace=True)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), expected(x))
        torch.testing.assert_close(inplace(x), expected(x))


def _heads_and_channels_zeroed(model: nn.Module, chosen: PruningPlan) -> nn.Module:
    """The reference for a ViT or Swin plan: a copy of ``model`` with the pruned heads' value
    rows and the pruned MLP channels' fc1 rows zeroed (their outputs are then exactly 0)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for group, kept in zip(chosen.groups, chosen.kept, strict=True):
            gone = torch.ones(group.channels, dtype=torch.bool)
            gone[kept] = False
            layer = modules[group.layers[0]]
            if is_attention(layer):
                owner, weight, bias = projection(layer)
                d, e = head_dim(layer), embed_dim(layer)
                for h in gone.nonzero().flatten().tolist():
                    getattr(owner, weight)[2 * e + h * d : 2 * e + (h + 1) * d] = 0
                    getattr(owner, bias)[2 * e + h * d : 2 * e + (h + 1) * d] = 0
            else:
                layer.weight[gone] = 0
                layer.bias[gone] = 0
    return ref


@pytest.mark.parametrize("target", [{"flops_reduction": 0.3}, {"params_reduction": 0.25}])
def test_vit_heads_prune_to_the_head_masked_model_with_exact_macs(target):
    from icprune.attention import PrunedMultiheadAttention
    from tests.structure.nets import ViTNet

    torch.manual_seed(0)
    model = ViTNet().eval()
    x = torch.randn(3, 3, 16, 16)
    result = icprune.prune(model, example_inputs=x[:1], **target)  # data-free: wbn
    chosen, pruned = result.plan, result.model
    kept = {
        name: len(chosen.keep[name]) for name in ("block1.self_attention", "block2.self_attention")
    }
    assert min(kept.values()) < 4  # heads are pruned
    for name, count in kept.items():
        attention = pruned.get_submodule(name)
        if count < 4:
            assert isinstance(attention, PrunedMultiheadAttention)
        assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (count, 6, 24)
        assert attention.out_proj.in_features == 6 * count
        assert attention.in_proj_weight.shape == (18 * count, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(x), _heads_and_channels_zeroed(model, chosen)(x), rtol=1e-4, atol=1e-5
        )
    assert icprune.count(pruned, x[:1]) == (chosen.macs[1], chosen.params[1])
    assert icprune.count(model, x[:1]) == (chosen.macs[0], chosen.params[0])
    again = PruningPlan.from_json(chosen.to_json())
    assert again.to_json() == chosen.to_json()
    state, again_state = pruned.state_dict(), apply(model, again).state_dict()
    assert list(state) == list(again_state)
    assert all(torch.equal(state[k], again_state[k]) for k in state)
    # a pruned model prunes again: its attention blocks are known blocks too
    twice = icprune.prune(pruned, example_inputs=x[:1], ratio=0.2)
    assert icprune.count(twice.model, x[:1]) == (twice.plan.macs[1], twice.plan.params[1])


def test_head_scores_are_the_out_proj_column_energy():
    from tests.structure.nets import ViTNet

    torch.manual_seed(0)
    model = ViTNet().eval()
    scores = icprune.score(model, example_inputs=torch.randn(1, 3, 16, 16))
    weight = model.block1.self_attention.out_proj.weight.detach().double()
    want = (weight**2).reshape(24, 4, 6).sum((0, 2))
    torch.testing.assert_close(scores["block1.self_attention"].score, want)
    with pytest.raises(ValueError, match=r"has 3 values but the layer has 4 output channels"):
        plan(
            model,
            {"block1.self_attention": torch.rand(3)},
            example_inputs=torch.randn(1, 3, 16, 16),
            ratio=0.2,
        )


def test_swin_window_attention_heads_prune_to_the_head_masked_model():
    from icprune.attention import PrunedWindowAttention
    from tests.structure.nets import SwinNet

    torch.manual_seed(0)
    model = SwinNet().eval()
    x = torch.randn(3, 3, 24, 24)  # a 6 x 6 map: padded to whole windows
    chosen = icprune.prune(model, example_inputs=x[:1], ratio=0.4).plan
    pruned = apply(model, chosen)
    for block in ("block1", "block2"):
        kept = chosen.keep[f"{block}.attn"]
        attention = pruned.get_submodule(f"{block}.attn")
        assert isinstance(attention, PrunedWindowAttention) and len(kept) < 4
        assert (attention.num_heads, attention.head_dim) == (len(kept), 4)
        assert attention.qkv.weight.shape == (12 * len(kept), 16)
        assert attention.proj.weight.shape == (16, 4 * len(kept))
        original = model.get_submodule(f"{block}.attn")
        if attention.cosine:  # V2: the kept heads' logit scales and position-bias MLP rows
            assert torch.equal(attention.logit_scale, original.logit_scale[kept])
            assert torch.equal(attention.cpb_mlp[2].weight, original.cpb_mlp[2].weight[kept])
        else:
            table = original.relative_position_bias_table
            assert torch.equal(attention.relative_position_bias_table, table[:, kept])
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(x), _heads_and_channels_zeroed(model, chosen)(x), rtol=1e-4, atol=1e-5
        )
    assert icprune.count(pruned, x[:1]) == (chosen.macs[1], chosen.params[1])
    assert icprune.count(model, x[:1]) == (chosen.macs[0], chosen.params[0])
    twice = icprune.prune(pruned, example_inputs=x[:1], ratio=0.2)
    assert icprune.count(twice.model, x[:1]) == (twice.plan.macs[1], twice.plan.params[1])


@pytest.mark.parametrize("name", ["ViTNet", "SwinNet"])
def test_with_data_heads_are_pruned_and_their_output_projection_repaired(name):
    from tests.structure import nets

    torch.manual_seed(0)
    model = getattr(nets, name)().eval()
    side = 16 if name == "ViTNet" else 24
    data = [torch.randn(4, 3, side, side) for _ in range(2)]
    repaired = icprune.prune(model, data, ratio=0.4)
    plain = icprune.prune(model, data, ratio=0.4, repair=False)
    assert repaired.plan.to_json() == plain.plan.to_json()
    heads = [n for n in repaired.plan.keep if n.endswith(("self_attention", "attn"))]
    assert min(len(repaired.plan.keep[n]) for n in heads) < 4
    x = data[0][:1]
    assert icprune.count(repaired.model, x) == (repaired.plan.macs[1], repaired.plan.params[1])
    with torch.no_grad():
        want = torch.cat([model(batch) for batch in data])
        errors = [
            (torch.cat([m(batch) for batch in data]) - want).pow(2).mean()
            for m in (repaired.model, plain.model)
        ]
    assert errors[0] < errors[1]  # the least-squares re-fit of the consumers on the same data
    for n in heads:  # an output projection whose heads were pruned is re-fitted too
        if len(repaired.plan.keep[n]) < 4:
            block = repaired.model.get_submodule(n)
            attr = "out_proj" if name == "ViTNet" else "proj"
            refit = getattr(block, attr).weight
            sliced = getattr(plain.model.get_submodule(n), attr).weight
            assert refit.shape == sliced.shape and not torch.equal(refit, sliced)
