"""frozen(): eval + no_grad for a block, exact restoration of training flags afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icprune.modes import frozen


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.Dropout(0.5))
    )


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_eval_and_no_grad_inside():
    model = _model().train()
    with frozen(model) as inner:
        assert inner is model
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
        out = model(torch.randn(2, 3, 8, 8))
        assert not out.requires_grad
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_mixed_flags_restored_exactly():
    model = _model().train()
    model[1].eval()
    model[2][1].eval()
    before = _flags(model)
    with frozen(model):
        pass
    assert _flags(model) == before


def test_restored_on_exception():
    model = _model().train()
    model[2].eval()
    before = _flags(model)
    with pytest.raises(ValueError, match="boom"), frozen(model):
        raise ValueError("boom")
    assert _flags(model) == before
    assert torch.is_grad_enabled()


def test_bn_running_stats_untouched():
    model = _model().train()
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with frozen(model):
        model(torch.randn(4, 3, 8, 8))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nested_inside_no_grad_keeps_outer_grad_mode():
    model = _model()
    with torch.no_grad():
        with frozen(model):
            assert not torch.is_grad_enabled()
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_nested_frozen():
    model = _model().train()
    with frozen(model), frozen(model[2]):
        assert not model.training
    assert all(m.training for m in model.modules())
