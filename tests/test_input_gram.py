"""input_gram: the Gram matrix of a 1x1 conv + BatchNorm layer derived from its input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icprune.calibrate import calibrate
from icprune.config import StatsConfig
from icprune.input_gram import derivable, input_gram_layers
from icprune.structure.graph import prunable_layers, read_points

C_IN, C_OUT = 16, 64


class Expand(nn.Module):
    """A 3x3 conv, then the layer under test: a 1x1 conv (C_IN -> C_OUT) and its BatchNorm."""

    def __init__(self, stride: int = 1, bias: bool = False, affine: bool = True) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, C_IN, 3, padding=1)
        self.conv = nn.Conv2d(C_IN, C_OUT, 1, stride=stride, bias=bias)
        self.bn = nn.BatchNorm2d(C_OUT, affine=affine)
        self.head = nn.Conv2d(C_OUT, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(torch.relu(self.pre(x))))))


class InPlace(Expand):
    """The conv's input is changed in place between the conv and its BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        y = self.conv(h)
        h.mul_(2.0)
        return self.head(torch.relu(self.bn(y)) + h.mean())


def _model(cls=Expand, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = cls(**kwargs)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        if model.bn.affine:
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _batches(count: int, n: int = 2, side: int = 8, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, side, side, generator=gen) for _ in range(count)]


def _break_even(model: nn.Module) -> int:
    points = read_points(model, prunable_layers(model), "bn")
    return input_gram_layers(model, points, StatsConfig(), torch.device("cpu"))["conv"].break_even


def test_only_plain_expanding_1x1_conv_and_batchnorm_are_derivable():
    bn = nn.BatchNorm2d(8)
    assert derivable(nn.Conv2d(4, 8, 1), bn)
    assert derivable(nn.Conv2d(4, 8, 1, stride=2, bias=False), bn)
    assert not derivable(nn.Conv2d(4, 8, 3), bn)  # not 1x1
    assert not derivable(nn.Conv2d(4, 8, 1, padding=1), bn)  # zero border samples
    assert not derivable(nn.Conv2d(4, 8, 1, groups=2), bn)
    assert not derivable(nn.Conv2d(8, 8, 1), bn)  # no saving
    assert not derivable(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8, track_running_stats=False))
    assert not derivable(nn.Conv2d(4, 8, 1).half(), bn)

    class Same(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    assert not derivable(Same(4, 8, 1), bn)  # its own forward: not the assumed map


def test_only_cpp_statistics_with_the_gram_part_and_raise_policy_derive():
    model = _model()
    points = read_points(model, prunable_layers(model), "bn")
    cpu = torch.device("cpu")
    assert list(input_gram_layers(model, points, StatsConfig(), cpu)) == ["conv"]
    for config in (
        StatsConfig(parts=("histogram",)),
        StatsConfig(nan_policy="zero"),
        StatsConfig(backend="torch"),
    ):
        assert input_gram_layers(model, points, config, cpu) == {}
    assert input_gram_layers(model, read_points(model, prunable_layers(model), "output"),
                             StatsConfig(), cpu) == {}  # fmt: skip


@pytest.mark.parametrize(
    "kwargs", [{}, {"stride": 2}, {"bias": True}, {"affine": False}, {"stride": 2, "bias": True}]
)
def test_derived_gram_matches_the_float64_reference(kwargs):
    model = _model(**kwargs)
    data = _batches(3)
    derived = calibrate(model, data, progress=False)
    assert derived["conv"].count > _break_even(model)  # really derived
    direct = calibrate(model, data, progress=False, gram_from_input=False)
    reference = calibrate(model, data, progress=False, backend="torch")
    a, b, r = derived["conv"], direct["conv"], reference["conv"]
    assert a.parts == ("histogram", "gram")
    scale = float(r.gram.abs().max())
    torch.testing.assert_close(a.gram, r.gram, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(a.correlation(), r.correlation(), rtol=0, atol=1e-4)
    assert torch.equal(a.gram, a.gram.T)
    assert not torch.equal(a.gram, b.gram)  # computed another way
    for key in ("counts", "sums", "minimum", "maximum", "bin_exponent", "bin_offset"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key  # the feature map's own
    for name in ("pre",):  # other layers are untouched
        assert torch.equal(derived[name].gram, direct[name].gram)


def test_few_samples_keep_the_direct_gram_bit_for_bit():
    model = _model()
    data = _batches(1, n=1, side=4)  # 16 samples
    assert 16 <= _break_even(model)
    derived = calibrate(model, data, progress=False)
    direct = calibrate(model, data, progress=False, gram_from_input=False)
    assert torch.equal(derived["conv"].gram, direct["conv"].gram)
    assert torch.equal(derived["conv"].gram_lo, direct["conv"].gram_lo)


def test_derived_gram_is_the_same_for_any_thread_count_and_batch_container():
    model = _model(stride=2)
    data = _batches(4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = calibrate(model, data, progress=False)
        torch.set_num_threads(3)
        three = calibrate(model, iter(data), progress=False)  # no length
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one["conv"].gram, three["conv"].gram)


def _interrupted(data, after: int):
    yield from data[:after]
    raise RuntimeError("loader died")


@pytest.mark.parametrize(("count", "side"), [(4, 8), (3, 2)])  # derived / direct kept
def test_interrupted_calibration_resumes_to_the_same_bits(tmp_path, count, side):
    model = _model()
    data = _batches(count, side=side)
    whole = calibrate(model, data, progress=False)
    path = tmp_path / "calib.pt"
    with pytest.raises(RuntimeError, match="loader died"):
        calibrate(model, _interrupted(data, 2), checkpoint=path, checkpoint_every=1, progress=False)
    resumed = calibrate(model, data, checkpoint=path, progress=False)
    for name in whole:
        assert torch.equal(whole[name].gram, resumed[name].gram), name
        assert torch.equal(whole[name].counts, resumed[name].counts), name


def test_a_tampered_input_gram_entry_is_refused(tmp_path):
    model = _model()
    data = _batches(1, n=1, side=4)  # direct part kept
    path = tmp_path / "calib.pt"
    calibrate(model, data, checkpoint=path, progress=False)
    state = torch.load(path, weights_only=True)
    for edit, message in (
        (lambda s: s["inputs"].pop("conv"), "no input Gram statistics for layer 'conv'"),
        (lambda s: s["inputs"]["conv"].pop("direct"), "keys 'input' and 'direct'"),
        (lambda s: s["inputs"]["conv"].update(direct=None), "lack the direct part"),
    ):
        bad = {**state, "inputs": {k: dict(v) for k, v in state["inputs"].items()}}
        edit(bad)
        torch.save(bad, path)
        with pytest.raises(ValueError, match=message):
            calibrate(model, data, checkpoint=path, progress=False)


def test_an_input_changed_in_place_is_refused_and_the_option_turns_it_off():
    model = _model(InPlace)
    data = _batches(2)
    with pytest.raises(ValueError, match=r"layer 'conv'.*gram_from_input=False"):
        calibrate(model, data, progress=False)
    direct = calibrate(model, data, progress=False, gram_from_input=False)
    assert direct["conv"].parts == ("histogram", "gram")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
