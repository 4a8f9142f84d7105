"""Repair from the consumers' input statistics (icprune.recovery.repair)."""

import copy

import pytest
import torch
from torch import nn

import icprune
from icprune import models
from icprune.calibrate import calibrate_inputs
from icprune.criteria import group_scores
from icprune.recovery.repair import repair
from tests.test_calibrate_inputs import chain


def plan_dropping(model, layer, channel, example):
    c = dict(model.named_modules())[layer].out_channels
    scores = {layer: torch.arange(c, 0, -1, dtype=torch.float64)}
    scores[layer][channel] = -1.0
    return icprune.plan(model, scores, example_inputs=example, ratio=1 / c, global_ranking=False)


def test_least_squares_repair_is_exact_for_a_1x1_consumer_of_a_redundant_channel():
    torch.manual_seed(0)
    model = chain()
    with torch.no_grad():  # channel 5 = channel 0 + 2 * channel 1 (BN is the identity)
        bn = model[1]
        bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0), bn.bias.zero_()
        model[0].weight[5] = model[0].weight[0] + 2 * model[0].weight[1]
    x = torch.randn(64, 3, 5, 5)
    stats = calibrate_inputs(model, [x], backend="torch", progress=False)
    plan = plan_dropping(model, "0", 5, x[:1])
    pruned = icprune.apply(model, plan)
    assert pruned[2].in_channels == 5
    assert not torch.allclose(pruned(x), model(x), atol=1e-3)
    before = copy.deepcopy(model.state_dict())
    assert repair(model, pruned, plan, stats, ridge=1e-12) is pruned
    torch.testing.assert_close(pruned(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_bias_compensation_keeps_the_mean_output_under_zero_padding():
    torch.manual_seed(0)
    model = chain(k=3, relu=True)
    x = torch.randn(256, 3, 1, 1).expand(-1, -1, 5, 5).contiguous()  # constant maps
    stats = calibrate_inputs(model, [x], backend="torch", progress=False)
    plan = plan_dropping(model, "0", 2, x[:1])
    pruned = repair(model, icprune.apply(model, plan), plan, stats, lstsq=False)
    with torch.no_grad():
        before = model[3](model[2](model[1](model[0](x)))).mean((0, 2, 3))
        after = pruned[3](pruned[2](pruned[1](pruned[0](x)))).mean((0, 2, 3))
        unrepaired = icprune.apply(model, plan)
        off = unrepaired[3](unrepaired[2](unrepaired[1](unrepaired[0](x)))).mean((0, 2, 3))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(off, before, atol=1e-3)  # the compensation did something


def test_a_consumer_without_bias_shifts_the_batchnorm_after_it():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2),
    ).eval()  # fmt: skip
    x = torch.randn(128, 3, 4, 4)
    stats = calibrate_inputs(model, [x], backend="torch", progress=False)
    plan = plan_dropping(model, "0", 1, x[:1])
    pruned = repair(model, icprune.apply(model, plan), plan, stats, lstsq=False)
    assert pruned[3].bias is None
    with torch.no_grad():
        want = model[3](model[2](model[1](model[0](x)))).mean((0, 2, 3))
        got = pruned[3](pruned[2](pruned[1](pruned[0](x)))).mean((0, 2, 3))
    shift = model[4].running_mean - pruned[4].running_mean
    torch.testing.assert_close(got + shift, want, atol=1e-5, rtol=1e-5)


def test_repair_brings_a_pruned_resnet_closer_to_the_unpruned_one():
    torch.manual_seed(0)
    model = models.resnet20().eval()
    x = torch.randn(16, 3, 32, 32)
    stats = calibrate_inputs(model, [x], progress=False)
    scores = group_scores(model, icprune.dependency_groups(model, x[:1]), "wbn")
    plan = icprune.plan(model, scores, example_inputs=x[:1], ratio=0.3)
    plain = icprune.apply(model, plan)
    fixed = repair(model, icprune.apply(model, plan), plan, stats)
    with torch.no_grad():
        want = model(x)
        assert (fixed(x) - want).pow(2).mean() < (plain(x) - want).pow(2).mean()


def test_bad_arguments_are_clear_errors():
    model = chain()
    x = torch.randn(4, 3, 5, 5)
    plan = plan_dropping(model, "0", 1, x[:1])
    stats = calibrate_inputs(model, [x], progress=False)
    with pytest.raises(TypeError, match="InputStats"):
        repair(model, icprune.apply(model, plan), plan, dict(stats))
    with pytest.raises(ValueError, match="ridge"):
        repair(model, icprune.apply(model, plan), plan, stats, ridge=-1.0)
    with pytest.raises(ValueError, match="plan does not match"):
        repair(chain(c_mid=7), icprune.apply(model, plan), plan, stats)
