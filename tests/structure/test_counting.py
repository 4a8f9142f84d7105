"""count(): MACs via FlopCounterMode, parameter counts, no mutation of the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icprune.models import resnet20, resnet50, resnet56
from icprune.structure.counting import count

# Conv/linear MACs of CIFAR ResNet-56 at 32x32, derived by hand:
#   stem 16*3*9*32*32 + stage1 18*(16*16*9)*32*32
#   + stage2 (32*16*9 + 17*32*32*9 + 32*16)*16*16 + stage3 (64*32*9 + 17*64*64*9 + 64*32)*8*8
#   + fc 64*10  = 125,747,840 (chenyaofo/pytorch-cifar-models lists 125.75 M).
RESNET56_MACS = 125_747_840


def test_resnet50_meta_macs_and_params():
    with torch.device("meta"):
        model = resnet50()
        x = torch.empty(1, 3, 224, 224)
    macs, params = count(model, x)
    assert 4.08e9 < macs < 4.13e9  # torchvision publishes 4.09 G
    assert params == 25_557_032
    assert isinstance(macs, int) and isinstance(params, int)


def test_resnet56_meta_macs():
    with torch.device("meta"):
        model = resnet56()
        x = torch.empty(1, 3, 32, 32)
    macs, params = count(model, x)
    assert 125e6 <= macs <= 127e6
    assert macs == RESNET56_MACS
    assert params == 855_770


def test_tiny_model_exact_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    macs, params = count(model, torch.randn(2, 3, 10, 10))
    conv = 8 * 3 * 3 * 3 * 8 * 8  # out_ch * in_ch * k * k * H_out * W_out
    linear = 512 * 5
    assert macs == 2 * (conv + linear)  # batch of 2
    assert params == (8 * 3 * 9 + 8) + (512 * 5 + 5)


def test_meta_and_real_agree_and_batch_scales():
    real = count(resnet20(), torch.randn(1, 3, 32, 32))
    with torch.device("meta"):
        meta = count(resnet20(), torch.empty(1, 3, 32, 32))
        batch4 = count(resnet20(), torch.empty(4, 3, 32, 32))
    assert real == meta
    assert batch4 == (4 * meta[0], meta[1])


def test_tuple_and_list_inputs():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, a, b):
            return self.fc(a) + self.fc(b)

    expected = (2 * 4 * 3, 15)
    assert count(Pair(), (torch.randn(1, 4), torch.randn(1, 4))) == expected
    assert count(Pair(), [torch.randn(1, 4), torch.randn(1, 4)]) == expected


def test_shared_parameters_counted_once():
    fc = nn.Linear(4, 4)
    model = nn.Sequential(fc, fc)
    assert count(model, torch.randn(1, 4))[1] == 20


@pytest.mark.parametrize("bad", [None, 3, [[1.0, 2.0]], (torch.zeros(1), "x"), {"x": 1}])
def test_bad_inputs_raise_type_error(bad):
    with pytest.raises(TypeError, match="example_inputs"):
        count(nn.Linear(1, 1), bad)


def test_does_not_mutate_model():
    torch.manual_seed(0)
    model = resnet20().train()
    model.layer2.eval()  # mixed flags must survive
    before_flags = {name: m.training for name, m in model.named_modules()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    count(model, torch.randn(2, 3, 32, 32))
    after_state = model.state_dict()
    for key, value in before_state.items():
        assert torch.equal(value, after_state[key]), key
    assert {name: m.training for name, m in model.named_modules()} == before_flags
    assert all(p.grad is None for p in model.parameters())


def test_flags_restored_when_forward_raises():
    model = resnet20().train()
    with pytest.raises(RuntimeError):
        count(model, torch.randn(1, 5, 32, 32))  # wrong channel count
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_matmuls_are_counted(grad, batch_first):
    # nn.MultiheadAttention's inference fast path and the CPU kernel of scaled dot-product
    # attention would hide MACs from FlopCounterMode: all of them count, with or without grad
    n, length, e, heads = 2, 5, 32, 4
    model = nn.MultiheadAttention(e, heads, batch_first=batch_first).eval()
    x = torch.randn(n, length, e) if batch_first else torch.randn(length, n, e)

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = model

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    with torch.set_grad_enabled(grad):
        macs, _ = count(Self(), x)
    projections = 4 * n * length * e * e  # q, k, v and out_proj
    attention = 2 * n * length * length * e  # Q K^T and A V over all heads
    assert macs == projections + attention
    assert torch.backends.mha.get_fastpath_enabled()  # restored
