"""integrations.torch_prune: a pruning plan as torch.nn.utils.prune masks, and back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import icprune
from icprune.integrations.masks import apply_masks, remove_masks
from icprune.models import cifar_vgg16_bn, mobilenet_v2, resnet20

EXAMPLE = torch.randn(1, 3, 32, 32)


class SmallNet(nn.Module):
    """conv-bn-relu, conv-bn-relu, flatten -> linear-relu -> linear: every kind of axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 10, 3, stride=2), nn.BatchNorm2d(10)
        self.fc1, self.fc2 = nn.Linear(10 * 3 * 3, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        return self.fc2(self.fc1(x.flatten(1)).relu())


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen))
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _plan(model: nn.Module, example: torch.Tensor, **target) -> icprune.PruningPlan:
    return icprune.plan(
        model, icprune.score(model, criterion="icii"), example_inputs=example, **target
    )


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules, seen = dict(model.named_modules()), {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out))
        for n in names
    ]
    with torch.no_grad():
        seen["logits"] = model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(
    ("factory", "bns"),
    [
        (resnet20, ["bn1", "layer1.0.bn1", "layer2.2.bn2", "layer3.0.downsample.1"]),
        (lambda: mobilenet_v2(num_classes=10), ["features.0.1", "features.2.conv.1.1"]),
        (lambda: cifar_vgg16_bn(), ["features.1", "features.41"]),
    ],
    ids=["resnet20", "mobilenet_v2", "cifar_vgg16_bn"],
)
def test_masked_model_computes_what_apply_computes(factory, bns):
    """Kept channels carry the physically pruned model's values, pruned channels are exactly 0
    after every affine BatchNorm of the plan, and the logits agree."""
    torch.manual_seed(0)
    model = factory().eval()
    _randomize_bn(model, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _plan(model, EXAMPLE, flops_reduction=0.5)
    masked = apply_masks(model, plan)
    pruned = icprune.apply(model, plan)
    x = torch.randn(4, 3, 32, 32)
    soft, hard = _outputs(masked, bns, x), _outputs(pruned, bns, x)
    torch.testing.assert_close(soft["logits"], hard["logits"], rtol=1e-4, atol=1e-5)
    for name in bns:
        kept = plan.indices(name, "out")
        cut = torch.ones(soft[name].shape[1], dtype=torch.bool)
        cut[kept] = False
        assert cut.any(), name
        torch.testing.assert_close(soft[name][:, kept], hard[name], rtol=1e-4, atol=1e-5)
        assert torch.equal(soft[name][:, cut], torch.zeros_like(soft[name][:, cut])), name
    # The user's model is untouched: same tensors, no masks.
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(prune.is_pruned(m) for m in [model])


def test_masks_are_on_the_right_axes():
    torch.manual_seed(0)
    model = SmallNet().eval()
    plan = _plan(model, torch.randn(1, 3, 8, 8), ratio=0.5, global_ranking=False)
    masked = apply_masks(model, plan)
    keep1, keep2 = plan.indices("conv1", "out"), plan.indices("conv2", "out")
    keep_fc1 = plan.indices("fc1", "out")
    assert len(keep1) == 6 and len(keep2) == 5 and len(keep_fc1) == 8
    w = masked.conv1.weight
    assert torch.equal(w[keep1], model.conv1.weight[keep1])
    assert w.abs().sum((1, 2, 3)).count_nonzero() == 6
    assert masked.conv1.bias.count_nonzero() == 6 and masked.bn1.bias.count_nonzero() <= 6
    # conv2: pruned output rows and pruned input columns.
    w2 = masked.conv2.weight
    assert torch.equal(w2[keep2][:, keep1], model.conv2.weight[keep2][:, keep1])
    assert w2.abs().sum((0, 2, 3)).count_nonzero() == 6
    # fc1: 9 input features per kept conv2 channel (flatten), pruned rows.
    cols = (keep2[:, None] * 9 + torch.arange(9)).flatten()
    assert masked.fc1.weight.abs().sum(0).nonzero().flatten().tolist() == cols.tolist()
    assert masked.fc1.weight.abs().sum(1).nonzero().flatten().tolist() == keep_fc1.tolist()
    # fc2 input columns follow fc1; its output (the logits) is never pruned.
    assert masked.fc2.weight.abs().sum(0).nonzero().flatten().tolist() == keep_fc1.tolist()
    assert hasattr(masked.fc2, "weight_mask") and not hasattr(masked.fc2, "bias_mask")
    assert set(dict(masked.named_buffers())) >= {"conv1.weight_mask", "bn1.bias_mask"}


def test_remove_masks_makes_zeros_permanent():
    torch.manual_seed(0)
    model = resnet20().eval()
    _randomize_bn(model, 1)
    plan = _plan(model, EXAMPLE, flops_reduction=0.4)
    masked = apply_masks(model, plan)
    snapshot = {k: v.clone() for k, v in masked.state_dict().items()}
    plain = remove_masks(masked)
    # remove_masks copies by default: the masked model still has its masks.
    assert masked.state_dict().keys() == snapshot.keys()
    assert all(torch.equal(snapshot[k], v) for k, v in masked.state_dict().items())
    assert plain.state_dict().keys() == model.state_dict().keys()
    assert not any(prune.is_pruned(m) for m in plain.modules())
    assert all(type(p) is nn.Parameter for p in plain.parameters())
    kept = plan.indices("layer1.0.conv1", "out")
    rows = plain.layer1[0].conv1.weight.abs().sum((1, 2, 3)).nonzero().flatten()
    assert rows.tolist() == kept.tolist()
    x = torch.randn(2, 3, 32, 32)
    again = apply_masks(masked, plan)  # masks on a masked copy: torch combines them
    with torch.no_grad():
        assert torch.equal(plain(x), masked(x))
        assert torch.equal(again(x), masked(x))
        # The zeros select the same channels that apply removes.
        torch.testing.assert_close(
            icprune.apply(plain, plan)(x), icprune.apply(model, plan)(x), rtol=1e-4, atol=1e-5
        )


def test_inplace():
    torch.manual_seed(0)
    model = resnet20().eval()
    plan = _plan(model, EXAMPLE, ratio=0.3)
    assert apply_masks(model, plan, inplace=True) is model
    assert prune.is_pruned(model)
    assert remove_masks(model, inplace=True) is model
    assert not prune.is_pruned(model)
    assert model.layer1[0].conv1.weight.abs().sum((1, 2, 3)).count_nonzero() < 16


def test_plan_of_another_model_raises():
    torch.manual_seed(0)
    plan = _plan(resnet20().eval(), EXAMPLE, ratio=0.3)
    shrunk = icprune.apply(resnet20(), plan)
    with pytest.raises(
        ValueError, match=r"apply_masks: the plan does not match this model .*'conv1'"
    ):
        apply_masks(shrunk, plan)
    with pytest.raises(TypeError, match="plan must be a PruningPlan"):
        apply_masks(shrunk, plan.to_json())
    with pytest.raises(ValueError, match="the model has no such module"):
        apply_masks(nn.Sequential(nn.Conv2d(3, 16, 3)), plan)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), ratio=st.floats(0.05, 0.85))
def test_masked_equals_applied_for_any_plan(seed, ratio):
    torch.manual_seed(seed)
    model = SmallNet().eval()
    _randomize_bn(model, seed)
    example = torch.randn(1, 3, 8, 8)
    plan = _plan(model, example, ratio=ratio)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        soft = apply_masks(model, plan)(x)
        hard = icprune.apply(model, plan)(x)
    torch.testing.assert_close(soft, hard, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["SENet", "ResNeXtNet"])
def test_masks_of_gates_and_grouped_convs_compute_what_apply_computes(name):
    from tests.structure import nets

    torch.manual_seed(0)
    model = getattr(nets, name)().eval()
    _randomize_bn(model, 0)
    x = torch.randn(3, 3, 8, 8)
    plan = _plan(model, x[:1], ratio=0.4)
    with torch.no_grad():
        soft, hard = apply_masks(model, plan)(x), icprune.apply(model, plan)(x)
    torch.testing.assert_close(soft, hard, rtol=1e-4, atol=1e-5)


def test_masks_of_attention_heads_compute_what_apply_computes():
    from tests.structure.nets import ViTNet

    torch.manual_seed(0)
    model = ViTNet().eval()
    x = torch.randn(3, 3, 16, 16)
    plan = icprune.prune(model, example_inputs=x[:1], flops_reduction=0.3).plan
    assert min(len(plan.keep[f"block{i}.self_attention"]) for i in (1, 2)) < 4
    masked = apply_masks(model, plan)
    assert isinstance(masked.block1.self_attention, nn.MultiheadAttention)  # shapes kept
    with torch.no_grad():
        soft, hard = masked(x), icprune.apply(model, plan)(x)
    torch.testing.assert_close(soft, hard, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(remove_masks(masked)(x), soft)


def test_masks_of_window_attention_heads_compute_what_apply_computes():
    from tests.structure.nets import SwinNet

    torch.manual_seed(0)
    model = SwinNet().eval()
    x = torch.randn(3, 3, 24, 24)
    plan = icprune.prune(model, example_inputs=x[:1], ratio=0.4).plan
    assert min(len(plan.keep[f"block{i}.attn"]) for i in (1, 2)) < 4
    with torch.no_grad():
        soft, hard = apply_masks(model, plan)(x), icprune.apply(model, plan)(x)
    torch.testing.assert_close(soft, hard, rtol=1e-4, atol=1e-5)
