"""serialization: save/load round trip is bit-identical; pruned zoo models export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import icprune
from icprune.models import mobilenet_v2, resnet20, resnet56


def _pruned(factory, size: int, **target) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, size, size)
    scores = {
        n: m.weight.detach().flatten(1).abs().sum(1)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    chosen = icprune.plan(model, scores, example_inputs=x[:1], **target)
    return icprune.apply(model, chosen), x


@pytest.mark.parametrize(
    ("factory", "size"), [(resnet56, 32), (mobilenet_v2, 32)], ids=["resnet56", "mobilenet_v2"]
)
def test_round_trip_is_bit_identical(tmp_path, factory, size):
    pruned, x = _pruned(factory, size, flops_reduction=0.5, round_to=4)
    path = tmp_path / "pruned.pt"
    icprune.save(pruned, path)
    loaded = icprune.load(path, factory).eval()
    for (k, a), (k2, b) in zip(
        pruned.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))
    assert icprune.count(loaded, x) == icprune.count(pruned, x)


def test_load_refuses_other_files_and_architectures(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a model saved by icprune.save"):
        icprune.load(path, resnet20)
    pruned, _ = _pruned(resnet20, 32, ratio=0.3)
    icprune.save(pruned, path)
    with pytest.raises(ValueError, match="model_fn"):
        icprune.load(path, mobilenet_v2)


@pytest.mark.parametrize(
    ("factory", "size"), [(resnet20, 32), (mobilenet_v2, 32)], ids=["resnet20", "mobilenet_v2"]
)
def test_torch_export_of_pruned_models(factory, size):
    pruned, x = _pruned(factory, size, flops_reduction=0.4, round_to=8)
    exported = torch.export.export(pruned.eval(), (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), pruned(x))
