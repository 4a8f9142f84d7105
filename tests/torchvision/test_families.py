"""torchvision families the structural rules of issue 14 open up, pruned at 30 % fewer MACs.

Squeeze-excitation gates with stochastic depth (EfficientNet, MobileNetV3, RegNetY), grouped convs
pruned within their groups (ResNeXt, RegNetX/Y) and linear layers over channels-last maps with
LayerNorms and layer scale (ConvNeXt), and ViT's token MLPs and attention heads, each pruned data-
free and with two batches by :func:`icprune.prune` on small inputs (random weights; the structure,
not the accuracy, is under test). Checked: the MACs reduction within 1 point of the target, the
plan's analytic MACs equal to ``icprune.count`` of the pruned model, the output shape, how many
layers land in groups (so a rule that stops applying fails here), and the pruned model saved and
loaded bit-identical.
"""

import pytest
import torch

import icprune
from icprune.attention import PrunedMultiheadAttention, PrunedWindowAttention

models = pytest.importorskip("torchvision.models", reason="needs torchvision (.venv-tv)")

#: name -> (input side, the least number of prunable layers in groups). The counts are what the
#: rules reach (efficientnet_b0: all 81; before them 19 of 81, and 30 % could not be reached).
FAMILIES = {
    "efficientnet_b0": (64, 81),
    "mobilenet_v3_small": (64, 53),
    "regnet_y_400mf": (64, 85),  # all 85: grouped convs with SE (before: 37)
    "regnet_x_400mf": (64, 71),  # all 71 (before: 27 in 5 groups)
    "resnext50_32x4d": (64, 53),  # all 53 (before: 21 in 5 groups)
    "vit_b_16": (64, 24),  # the 12 MLP hidden dims and the 12 attention blocks' heads (the
    # residual stream stays whole; before heads: 12)
    "swin_t": (224, 24),  # the 12 MLP hidden dims and the 12 window attentions' heads
    "convnext_tiny": (64, 58),  # all 58: LayerNorms, layer_scale (before: 0, "removes 0.000")
}


#: The costliest rows (about a minute each on a loaded 2-core machine).
SLOW = ("convnext_tiny", "resnext50_32x4d", "vit_b_16", "swin_t")


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"image_size": FAMILIES[name][0]} if name.startswith("vit_") else {}
    return models.get_model(name, weights=None, **extra).eval()


@pytest.mark.parametrize("with_data", [False, True], ids=["data-free", "two-batches"])
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in FAMILIES],
)
def test_prunes_at_thirty_percent(name, with_data, tmp_path):
    side, least = FAMILIES[name]
    model = _build(name)
    x = torch.randn(1, 3, side, side)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 3, side, side, generator=gen) for _ in range(2)] if with_data else None
    before = icprune.count(model, x)[0]
    result = icprune.prune(model, data, flops_reduction=0.3, example_inputs=x, progress=False)
    pruned, chosen = result.model, result.plan
    in_groups = {n for g in chosen.groups for n in g.layers}
    assert len(in_groups) >= least
    assert abs(chosen.flops_reduction - 0.3) <= 0.01
    macs, params = icprune.count(pruned, x)
    assert (macs, params) == (chosen.macs[1], chosen.params[1]) and chosen.macs[0] == before
    grouped = {  # grouped convs keep their groups, and some are pruned inside them
        n: m.groups
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels
    }
    after = dict(pruned.named_modules())
    assert all(after[n].groups == g for n, g in grouped.items())
    if grouped:
        assert any(
            after[n].in_channels < dict(model.named_modules())[n].in_channels for n in grouped
        )
    if name.startswith(("vit_", "swin_")):  # heads are pruned: fewer heads of the same width
        kind = PrunedMultiheadAttention if name.startswith("vit_") else PrunedWindowAttention
        attention = [m for m in pruned.modules() if isinstance(m, kind)]
        assert attention and all(
            m.head_dim == 64 if kind is PrunedMultiheadAttention else 32 for m in attention
        )
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    path = tmp_path / "pruned.pt"
    icprune.save(pruned, path)
    loaded = icprune.load(path, lambda: _build(name)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_efficientnet_squeeze_excitation_joins_the_expanded_channels():
    model = _build("efficientnet_b0")
    groups = icprune.dependency_groups(model, torch.randn(1, 3, 64, 64))
    expanded = next(g for g in groups if "features.2.0.block.0.0" in g.layers)
    members = {(d.module, d.kind) for d in expanded.dependencies}
    assert {
        ("features.2.0.block.1.0", "depthwise"),
        ("features.2.0.block.2.fc1", "input"),
        ("features.2.0.block.2.fc2", "output"),
        ("features.2.0.block.3.0", "input"),
    } <= members
    # the residual stream of stage 2 passes stochastic_depth: both blocks' projections in one
    stream = next(g for g in groups if "features.2.0.block.3.0" in g.layers)
    assert "features.2.1.block.3.0" in stream.layers
