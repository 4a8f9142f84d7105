"""icprune.consumers: moments, weight taps, the BatchNorm after a layer, tap coverage."""

import torch
from torch import nn

from icprune.consumers import followers, moments, ridged, tap_coverage, taps, weight_energy
from icprune.stats import ChannelStats


def test_moments_are_population_mean_second_moment_and_covariance():
    x = torch.randn(50, 3, dtype=torch.float64)
    stats = ChannelStats(3, backend="torch")
    stats.update(x)
    mean, second, cov = moments(stats)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(second, x.T @ x / 50)
    torch.testing.assert_close(cov, torch.cov(x.T, correction=0))


def test_ridged_adds_a_relative_ridge_and_keeps_zero_invertible():
    cov = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(ridged(cov, 0.5), cov + torch.eye(2, dtype=torch.float64))
    assert torch.linalg.matrix_rank(ridged(torch.zeros(2, 2, dtype=torch.float64), 1e-2)) == 2


def test_taps_and_weight_energy_use_the_following_batchnorm():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 0.0]))
        model[1].running_var.copy_(torch.tensor([1.0, 4.0, 1.0]) - model[1].eps)
    assert taps(model[0].weight).shape == (9, 3, 2)
    assert followers(model, ["0", "2"]) == {"0": "1"}
    w = model[0].weight.detach().double()
    d = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    expected = (w**2 * d[:, None, None, None]).sum((0, 2, 3))
    torch.testing.assert_close(weight_energy(model, "0", {"0": "1"}), expected)
    assert weight_energy(model, "2", {}).shape == (3,)  # no BatchNorm after it: d = 1


def test_tap_coverage_counts_the_positions_inside_the_zero_padding():
    conv = nn.Conv2d(1, 1, 3, padding=1)
    cover = tap_coverage(conv, (4, 4)).reshape(3, 3)
    assert cover[1, 1] == 1.0  # the centre tap always reads inside
    assert cover[0, 1] == 0.75 and cover[0, 0] == 0.75**2
    assert torch.equal(tap_coverage(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"),
                                    (4, 4)), torch.ones(9, dtype=torch.float64))  # fmt: skip
    assert torch.equal(tap_coverage(nn.Linear(2, 2), ()), torch.ones(1, dtype=torch.float64))
