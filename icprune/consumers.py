"""What a consumer layer sees: the quantities the consumer-side criteria and repair share.

A *consumer* of a dependency group is a conv or linear layer whose input channels follow the
group (``Dependency.kind == "input"``); pruning a channel removes it from what the consumer reads.
For one consumer with input statistics (:class:`icprune.calibrate.InputStats`: n samples, sums
s, Gram G over its ``C_in`` input channels):

- mean ``m = s / n``, second moment ``E[x x^T] = G / n``, covariance ``S = G / n - m m^T``
  (population normalisation), :func:`moments`;
- the ridged covariance ``S + r * mean(diag S) * I``, :func:`ridged`;
- its weight per kernel tap ``W[t, o, i]``, :func:`taps`;
- its output scale ``d_o = gamma_o^2 / (running_var_o + eps)`` when a BatchNorm directly follows
  it (1 otherwise): a change ``dy_o`` of its output moves the BatchNorm's output by
  ``sqrt(d_o) dy_o``, in the units every layer's normalised activations share,
  :func:`output_scale`;
- its weight energy ``M_i = sum_{o,t} d_o W[t, o, i]^2`` per input channel,
  :func:`weight_energy`;
- for a conv, the fraction of output positions at which each tap reads inside the zero-padded
  input, :func:`tap_coverage`.

The BatchNorm after a layer comes from the model's fx graph (:func:`followers`). Definitions and
the evidence behind them: docs/quality.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from icprune.stats.channel_stats import ChannelStats
from icprune.structure.graph import read_points


def moments(stats: ChannelStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean Tensor[C], second moment Tensor[C, C] and covariance Tensor[C, C] of ``stats``,
    float64 on the CPU, population normalisation (divided by ``stats.count``).

    Raises:
        ValueError: ``stats`` holds no sample.
    """
    if stats.count == 0:
        raise ValueError(f"layer '{stats.name}': its input statistics hold no sample")
    n = stats.count
    mean = (stats.sums + stats.sums_lo).to("cpu", torch.float64) / n
    second = (stats.gram + stats.gram_lo).to("cpu", torch.float64) / n
    cov = second - torch.outer(mean, mean)
    return mean, (second + second.T) / 2, (cov + cov.T) / 2


def ridged(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """``cov + ridge * mean(diag cov) * I`` (Tensor[C, C] float64); an absolute floor of 1e-12
    on the mean diagonal keeps an all-zero matrix invertible."""
    scale = cov.diagonal().mean().clamp(min=1e-12)
    return cov + (ridge * scale) * torch.eye(len(cov), dtype=cov.dtype)


def taps(weight: torch.Tensor) -> torch.Tensor:
    """A conv or linear weight ``[O, C_in, *kernel]`` as Tensor[T, O, C_in] float64 on the CPU
    (T kernel taps; 1 for a linear layer or a 1x1 conv)."""
    w = weight.detach().to("cpu", torch.float64)
    return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)


def followers(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The BatchNorm that directly consumes each named conv/linear layer's output.

    Args:
        model: the network (fx-traceable).
        names: conv/linear module names.

    Returns:
        dict layer name -> BatchNorm module name, only for the layers that have one (the sole
        user of their output in the fx graph).
    """
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in names}
    if not layers:
        return {}
    points = read_points(model, layers, "bn")
    return {name: p.module for name, p in points.items() if p.read_at == "bn"}


def output_scale(model: nn.Module, name: str, follower: Mapping[str, str]) -> torch.Tensor:
    """``d_o`` of layer ``name``: ``gamma^2 / (running_var + eps)`` of the BatchNorm that
    follows it (``follower``, from :func:`followers`), else ones (Tensor[O] float64)."""
    modules = dict(model.named_modules())
    outputs = modules[name].weight.shape[0]
    bn = modules[follower[name]] if name in follower else None
    if bn is None or bn.running_var is None:
        return torch.ones(outputs, dtype=torch.float64)
    var = bn.running_var.detach().to("cpu", torch.float64)
    gamma = bn.weight.detach().to("cpu", torch.float64) if bn.weight is not None else 1.0
    return gamma**2 / (var + bn.eps)


def weight_energy(model: nn.Module, name: str, follower: Mapping[str, str]) -> torch.Tensor:
    """``M_i = sum_{o,t} d_o W[t, o, i]^2`` of layer ``name`` per input channel (Tensor[C_in]
    float64): how strongly its normalised output depends on input i. A grouped conv's input i
    of group g is read by that group's outputs only."""
    module = dict(model.named_modules())[name]
    d = output_scale(model, name, follower)
    energy = (taps(module.weight) ** 2 * d[None, :, None]).sum(0)  # O x C_in/groups
    g = getattr(module, "groups", 1)
    return energy.reshape(g, energy.shape[0] // g, energy.shape[1]).sum(1).flatten()


def tap_coverage(module: nn.Module, spatial: tuple[int, ...]) -> torch.Tensor:
    """Tensor[T] float64: for each kernel tap of a conv, the fraction of its output positions at
    which the tap reads inside the zero-padded input of spatial shape ``spatial`` (ones of
    length 1 for a linear layer; all ones for reflect/replicate/circular padding, which reads
    copies of real values)."""
    if isinstance(module, nn.Linear):
        return torch.ones(1, dtype=torch.float64)
    kernel = tuple(module.kernel_size)
    t = int(torch.tensor(kernel).prod())
    eye = torch.eye(t, dtype=torch.float64).reshape(t, 1, *kernel)
    ones = torch.ones(1, 1, *spatial, dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    if module.padding_mode != "zeros":  # the padding repeats real values: every tap reads them
        return torch.ones(t, dtype=torch.float64)
    stride = 1 if isinstance(module.padding, str) else module.stride  # "same" needs stride 1
    hits = conv(ones, eye, stride=stride, padding=module.padding, dilation=module.dilation)
    return hits.reshape(t, -1).mean(1)
