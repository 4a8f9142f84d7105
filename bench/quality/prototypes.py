"""Prototypes of the consumer-side criteria and of repair from statistics (issue 13).

Everything here uses icprune's public API only (``icprune.ChannelStats``,
``icprune.dependency_groups``, ``icprune.plan``/``apply``); it is written to move into the
package as it stands (criteria into the scoring module, :func:`repair` into the recovery
subpackage). Definitions (exact formulas in docs/quality.md, "Criteria and repair"):

**Where statistics are read.** A pruned channel is removed from what its *consumers* read: the
convs and linear layers whose input channels follow its dependency group (``Dependency.kind ==
"input"``). :func:`input_stats` reads every consumer's *input* (after the activation, after
pooling, after the residual add and ReLU) into one :class:`icprune.ChannelStats` over the
consumer's ``C_in`` input channels. One calibration pass serves scoring and repair.

For one consumer with input statistics (n samples, sums s, Gram G) over its input channels:
mean ``m = s/n``, second moment ``E[x x^T] = G/n``, covariance ``S = G/n - m m^T`` (population).
The consumer's weight ``W[o, i, t]`` (t: kernel tap; one tap for linear/1x1) and its output
scale ``d_o = gamma_o^2 / (running_var_o + eps)`` when a BatchNorm follows it (1 otherwise): a
change ``dy_o`` of its output moves the BatchNorm's output by ``sqrt(d_o) dy_o``, in the units
every layer's normalised activations share. The *consumer weight energy* of input channel i is
``M_i = sum_{o,t} d_o W[o, i, t]^2``.

Group scores (Tensor[C] per group, higher = keep), each summed over the group's consumers k
(channel c of the group is input ``offset_k + c`` of consumer k):

- ``"E2"``: ``E[x_c^2]``; ``"var"``: ``S_cc``;
- ``"condvar"``: ``1 / (S + r I)^{-1}_cc`` with ridge ``r = ridge * mean(diag S)``: the variance of
  x_c that the consumer's other input channels cannot predict linearly;
- ``"wE2"``, ``"wvar"``, ``"wcondvar"``: the same times ``M_c``: the expected squared change of
  the consumer's normalised output when channel c alone is removed without compensation
  (``wE2``), with mean (bias) compensation (``wvar``), and with least-squares compensation by
  the other channels (``wcondvar``; exact for 1x1 convs and linear layers);
- ``"greedy"``: backward elimination with the least-squares downdate: starting from all channels,
  repeatedly remove the channel whose removal (with optimal re-fitting of the consumers' kept
  weights) adds the least normalised output error; score = removal step (later = keep). This is
  ThiNet/CP's channel selection in closed form from the Gram matrix.
- data-free ``"wbn"``: ``M_c * sum_n (gamma_nc^2 + beta_nc^2)`` over the group's BatchNorms that
  feed consumer k since the last depthwise conv (a BatchNorm output's second moment is
  ``gamma^2 + beta^2`` when its input matches the running statistics).

**Repair** (:func:`repair`), for every consumer whose input channels P were pruned (K kept):
``T = S_PK (S_KK + r I)^{-1}`` (|P| x |K|), kept weights ``W_K' = W_K + W_P T`` (per tap), and
bias ``b' = b + sum_t f_t W_P,t (m_P - T m_K)`` where ``f_t`` is the fraction of output
positions at which tap t reads inside the (zero-padded) input: the least-squares constant
correction for a stationary mean under zero padding. Without least squares (``lstsq=False``):
``b' = b + sum_t f_t W_P,t m_P``. A consumer without bias but followed by a BatchNorm gets the
correction folded into that BatchNorm's running mean (``mu' = mu - db``); one with neither gets a
bias. Exact for 1x1 convs and linear layers given the statistics of the unpruned model; for kxk
convs the per-tap use of the same-position covariance ignores cross-tap correlations.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import icprune
from icprune.structure import layers

CONSUMER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
DATA_CRITERIA = ("E2", "var", "condvar", "wE2", "wvar", "wcondvar", "greedy")
DATA_FREE_CRITERIA = ("wbn",)


@dataclass
class InputStats:
    """Statistics of every consumer's input, from one calibration pass.

    Attributes:
        stats: consumer name -> :class:`icprune.ChannelStats` over its C_in input channels.
        spatial: consumer name -> spatial shape of its input (``()`` for a linear layer).
        follower: conv/linear name -> name of the BatchNorm that directly consumes its output
            (only for those that have one).
    """

    stats: dict[str, icprune.ChannelStats]
    spatial: dict[str, tuple[int, ...]]
    follower: dict[str, str]


def consumers_of(groups: Sequence[icprune.Group]) -> list[str]:
    """Names of the modules that consume some group's channels on their input side, in the
    order first met."""
    return list(
        dict.fromkeys(d.module for g in groups for d in g.dependencies if d.kind == "input")
    )


def input_stats(
    model: nn.Module,
    data: Iterable[torch.Tensor],
    consumers: Iterable[str],
    *,
    bins: int = 64,
    backend: str = "torch",
) -> InputStats:
    """Stream the input of every consumer into :class:`icprune.ChannelStats` (one pass, eval
    mode, no gradients; the model's flags are restored).

    Args:
        model: the unpruned network.
        data: batches of model inputs (Tensor[N, ...]).
        consumers: conv/linear module names whose inputs are read.
        bins, backend: passed to :class:`icprune.ChannelStats` (``"torch"``: float64 Gram).

    Returns:
        :class:`InputStats`.
    """
    modules = dict(model.named_modules())
    names = list(consumers)
    stats, spatial, follower = {}, {}, {}
    for name in names:
        module = modules[name]
        if not isinstance(module, CONSUMER_TYPES):
            raise TypeError(f"input_stats: '{name}' is a {type(module).__name__}, not conv/linear")
        c_in = layers.in_channels(module)
        stats[name] = icprune.ChannelStats(
            c_in, bins=bins, name=name, read_at="input", backend=backend
        )
    last_output: dict[int, str] = {}
    handles = []

    def pre_hook(name):
        def read(_module, inputs):
            x = inputs[0].detach()
            stats[name].update(x)
            spatial[name] = tuple(x.shape[2:])

        return read

    def out_hook(name):
        def record(_module, _inputs, output):
            last_output[id(output)] = name

        return record

    def bn_hook(name):
        def check(_module, inputs):
            producer = last_output.get(id(inputs[0]))
            if producer is not None:
                follower.setdefault(producer, name)

        return check

    for name, module in modules.items():
        if name in stats:
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
        if isinstance(module, CONSUMER_TYPES):
            handles.append(module.register_forward_hook(out_hook(name)))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in data:
                last_output.clear()
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    return InputStats(stats, spatial, follower)


def moments(stats: icprune.ChannelStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean Tensor[C], second moment Tensor[C, C], covariance Tensor[C, C]), float64,
    population normalisation (divided by n)."""
    n = stats.count
    mean = stats.sums / n
    second = stats.gram / n
    cov = second - torch.outer(mean, mean)
    return mean, second, (cov + cov.T) / 2


def ridged(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """``cov + ridge * mean(diag cov) * I`` (Tensor[C, C] float64); a small absolute floor keeps
    an all-zero matrix invertible."""
    scale = cov.diagonal().mean().clamp(min=1e-12)
    return cov + (ridge * scale) * torch.eye(len(cov), dtype=cov.dtype)


def output_scale(model: nn.Module, name: str, follower: Mapping[str, str]) -> torch.Tensor:
    """``d_o`` of consumer ``name``: ``gamma^2 / (running_var + eps)`` of the BatchNorm that
    follows it, else ones (Tensor[O] float64)."""
    modules = dict(model.named_modules())
    weight = modules[name].weight
    bn = modules[follower[name]] if name in follower else None
    if bn is None or bn.running_var is None:
        return torch.ones(weight.shape[0], dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else 1.0
    return gamma**2 / (bn.running_var.double() + bn.eps)


def taps(weight: torch.Tensor) -> torch.Tensor:
    """A conv/linear weight ``[O, C_in, *kernel]`` as Tensor[T, O, C_in] float64 (T taps)."""
    w = weight.detach().double()
    return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)


def weight_energy(model: nn.Module, name: str, follower: Mapping[str, str]) -> torch.Tensor:
    """Consumer weight energy ``M_i = sum_{o,t} d_o W[o, i, t]^2`` per input channel
    (Tensor[C_in] float64)."""
    module = dict(model.named_modules())[name]
    if layers.groups(module) != 1:
        raise ValueError(f"'{name}': grouped/depthwise convs are not consumers of a group")
    d = output_scale(model, name, follower)
    return (taps(module.weight) ** 2 * d[None, :, None]).sum((0, 1))


def _consumer_reads(group: icprune.Group) -> list[tuple[str, int]]:
    reads = []
    for dep in group.dependencies:
        if dep.kind == "input":
            if dep.repeat != 1:
                raise NotImplementedError(
                    f"'{dep.module}' reads the group flattened ({dep.repeat} features per "
                    f"channel); consumer statistics per feature are not prototyped"
                )
            reads.append((dep.module, dep.offset))
    return reads


def greedy_order(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Backward elimination over the C channels of a group, shared by several consumers.

    Args:
        parts: per consumer ``(A, B, idx)``: A = ridged input covariance Tensor[C_in, C_in],
            B = Tensor[C_in, R] = ``S @ V`` where ``V`` stacks the consumer's per-tap,
            output-scaled weights as columns (so the explained output energy of a kept set K is
            ``tr(B_K^T A_KK^{-1} B_K)``), idx = LongTensor[C] input index of each group channel.

    Returns:
        Tensor[C] float64: the step at which each channel is removed (0 = first); the last one
        left gets C - 1. Ties: lower channel index first.
    """
    c = len(parts[0][2])
    state = []
    for a, b, idx in parts:
        inv = torch.linalg.inv(a)
        state.append((inv, inv @ b, idx))  # updated in place; removed rows/columns become 0
    alive = torch.ones(c, dtype=torch.bool)
    score = torch.zeros(c, dtype=torch.float64)
    for step in range(c):
        loss = torch.zeros(c, dtype=torch.float64)
        for inv, beta, idx in state:
            diag = inv.diagonal()[idx].clamp(min=1e-300)
            loss += (beta[idx] ** 2).sum(1) / diag
        loss[~alive] = float("inf")
        ch = int(torch.argmin(loss))  # first minimum: ties go to the lower channel index
        alive[ch] = False
        score[ch] = step
        for inv, beta, idx in state:
            p = int(idx[ch])
            col = inv[:, p].clone()
            pivot = col[p].clamp(min=1e-300)
            beta -= torch.outer(col, beta[p]) / pivot
            inv -= torch.outer(col, col) / pivot
            inv[p, :] = 0.0
            inv[:, p] = 0.0
            beta[p] = 0.0
    return score


def group_scores(
    model: nn.Module,
    groups: Sequence[icprune.Group],
    criterion: str,
    stats: InputStats | None = None,
    *,
    ridge: float = 1e-2,
    example: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of every group's channels by a consumer-side criterion (see the module docstring),
    given to every output layer of the group (so :func:`icprune.plan` uses them as they are).

    Args:
        model: the unpruned network.
        groups: from :func:`icprune.dependency_groups`.
        criterion: one of :data:`DATA_CRITERIA` (needs ``stats``) or :data:`DATA_FREE_CRITERIA`.
        stats: from :func:`input_stats` on the same model.
        ridge: relative ridge r of the conditional variance and of the greedy fit.
        example: a model input (Tensor[1, ...]) for the one shape-only pass that finds the
            BatchNorm after each consumer, needed by data-free criteria without ``stats``.

    Returns:
        dict layer name -> Tensor[C] float64 (higher = keep).
    """
    if criterion not in DATA_CRITERIA + DATA_FREE_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}")
    if criterion in DATA_CRITERIA and stats is None:
        raise ValueError(f"criterion {criterion!r} needs input statistics")
    modules = dict(model.named_modules())
    follower = stats.follower if stats is not None else _followers(model, example)
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        reads = _consumer_reads(group)
        idx = torch.arange(group.channels)
        if criterion == "wbn":
            score = _bn_energy(model, group, follower)
        elif criterion == "greedy":
            parts = []
            for name, offset in reads:
                _, _, cov = moments(stats.stats[name])
                w = taps(modules[name].weight)  # T, O, C_in
                d = output_scale(model, name, follower).sqrt()
                v = (w * d[None, :, None]).reshape(-1, w.shape[2]).T  # C_in x (T*O)
                parts.append((ridged(cov, ridge), cov @ v, idx + offset))
            score = greedy_order(parts)
        else:
            score = torch.zeros(group.channels, dtype=torch.float64)
            for name, offset in reads:
                _, second, cov = moments(stats.stats[name])
                base = criterion.removeprefix("w")
                if base == "E2":
                    value = second.diagonal()
                elif base == "var":
                    value = cov.diagonal()
                else:
                    value = 1.0 / torch.linalg.inv(ridged(cov, ridge)).diagonal()
                if criterion.startswith("w"):
                    value = value * weight_energy(model, name, follower)
                score += value[idx + offset]
        for layer in group.layers:
            out[layer] = score
    return out


def _followers(model: nn.Module, example: torch.Tensor | None) -> dict[str, str]:
    """conv/linear -> the BatchNorm directly after it, from one pass of ``example`` (zeros of
    its shape: data-free)."""
    if example is None:
        raise ValueError("data-free consumer criteria need example=<a model input>")
    return input_stats(model, [torch.zeros_like(example)], [], bins=2).follower


def _bn_energy(model: nn.Module, group: icprune.Group, follower: Mapping[str, str]):
    modules = dict(model.named_modules())
    acc = torch.zeros(group.channels, dtype=torch.float64)
    score = torch.zeros(group.channels, dtype=torch.float64)
    for dep in group.dependencies:
        m = modules[dep.module]
        sl = slice(dep.offset, dep.offset + group.channels)
        if dep.kind == "depthwise":
            acc = torch.zeros(group.channels, dtype=torch.float64)
        elif dep.kind == "batchnorm":
            acc = acc + m.weight.detach().double()[sl] ** 2 + m.bias.detach().double()[sl] ** 2
        elif dep.kind == "input":
            score += acc * weight_energy(model, dep.module, follower)[sl]
    return score


def tap_coverage(module: nn.Module, spatial: tuple[int, ...]) -> torch.Tensor:
    """Tensor[T] float64: for each kernel tap of a conv, the fraction of output positions at
    which it reads inside the zero-padded input of shape ``spatial`` (1 for a linear layer)."""
    if isinstance(module, nn.Linear):
        return torch.ones(1, dtype=torch.float64)
    kernel = module.kernel_size
    t = int(torch.tensor(kernel).prod())
    eye = torch.eye(t, dtype=torch.float64).reshape(t, 1, *kernel)
    ones = torch.ones(1, 1, *spatial, dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    hits = conv(ones, eye, stride=module.stride, padding=module.padding, dilation=module.dilation)
    return hits.reshape(t, -1).mean(1)


def repair(
    original: nn.Module,
    pruned: nn.Module,
    plan: icprune.PruningPlan,
    stats: InputStats,
    *,
    ridge: float = 1e-2,
    lstsq: bool = True,
    bias: bool = True,
) -> nn.Module:
    """Repair ``pruned`` (= ``icprune.apply(original, plan)``) in place from the unpruned
    model's consumer input statistics (see the module docstring).

    Args:
        original: the unpruned network the plan and the statistics were made on.
        pruned: the pruned network; its consumers' weights and biases (or the running mean of
            the BatchNorm after them) are changed in place.
        plan: the plan that made ``pruned``.
        stats: from :func:`input_stats` on ``original``.
        ridge: relative ridge r of the least-squares fit.
        lstsq: re-fit the kept weights (W_K' = W_K + W_P T); False = mean compensation only.
        bias: compensate the mean of what was removed (and of what the fit adds).

    Returns:
        ``pruned``.
    """
    orig = dict(original.named_modules())
    new = dict(pruned.named_modules())
    for name in consumers_of(plan.groups):
        kept = plan.indices(name, "in")
        module = orig[name]
        c_in = layers.in_channels(module)
        if kept is None or len(kept) == c_in:
            continue
        dropped = torch.ones(c_in, dtype=torch.bool)
        dropped[kept] = False
        gone = dropped.nonzero().flatten()
        out_kept = plan.indices(name, "out")
        w = taps(module.weight)  # T, O, C_in
        if out_kept is not None:
            w = w[:, out_kept]
        mean, _, cov = moments(stats.stats[name])
        w_k, w_p = w[:, :, kept], w[:, :, gone]
        if lstsq:
            a = ridged(cov, ridge)[kept][:, kept]
            t = torch.linalg.solve(a, cov[kept][:, gone]).T  # |P| x |K|
            w_k = w_k + w_p @ t
            residual_mean = mean[gone] - t @ mean[kept]
        else:
            residual_mean = mean[gone]
        target = new[name]
        with torch.no_grad():
            shape = target.weight.shape
            fitted = w_k.permute(1, 2, 0).reshape(shape)
            target.weight.copy_(fitted.to(target.weight.dtype))
            if bias:
                cover = tap_coverage(module, stats.spatial[name])
                shift = torch.einsum("t,top,p->o", cover, w_p, residual_mean)
                _add_bias(pruned, name, shift, stats.follower)
    return pruned


def _add_bias(model: nn.Module, name: str, shift: torch.Tensor, follower: Mapping[str, str]):
    modules = dict(model.named_modules())
    module = modules[name]
    if module.bias is not None:
        module.bias.add_(shift.to(module.bias.dtype))
        return
    bn = modules[follower[name]] if name in follower else None
    if bn is not None and bn.running_mean is not None:
        bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
        return
    module.bias = nn.Parameter(shift.to(module.weight.dtype))


def pruned_copy(model: nn.Module, plan: icprune.PruningPlan) -> nn.Module:
    """``icprune.apply(model, plan)`` on a deep copy (the model is untouched)."""
    return icprune.apply(copy.deepcopy(model), plan, inplace=True)
