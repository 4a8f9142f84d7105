"""Repair a pruned model from the statistics of what its consumer layers read.

For every consumer (conv or linear layer, see :mod:`icprune.consumers`) whose input channels P
were pruned and K kept, with the unpruned model's input covariance S and mean m of that consumer
(:func:`icprune.calibrate.calibrate_inputs`):

- **least squares**: ``T = S_PK (S_KK + r I)^{-1}`` (|P| x |K|, ridge r relative to the mean
  variance) and kept weights ``W_K' = W_K + W_P T`` per kernel tap: the kept channels take over
  the part of the removed ones they predict linearly (ThiNet and CP, He et al. 2017);
- **bias compensation**: ``b' = b + sum_t f_t W_P,t (m_P - T m_K)``, where ``f_t`` is the
  fraction of output positions at which tap t reads inside the zero-padded input
  (:func:`icprune.consumers.tap_coverage`): the constant that keeps the consumer's mean output
  for a stationary input mean under zero padding (FLAP's compensation). Without least squares
  (``lstsq=False``) ``b' = b + sum_t f_t W_P,t m_P``.

A consumer without a bias but followed by a BatchNorm gets the correction folded into that
BatchNorm's running mean (``mu' = mu - db``); one with neither gets a bias. Exact for 1x1 convs
and linear layers given the unpruned model's statistics; for k x k convs the same-position
covariance is used for every tap (cross-tap correlations are ignored), an approximation.
Consumers without statistics (see :func:`icprune.calibrate.input_layers`) are left as pruned.
Evidence (selection and confirmation splits, EfficientNet-Lite0): docs/quality.md.
"""

from __future__ import annotations

import torch
from torch import nn

from icprune.calibrate import InputStats
from icprune.consumers import followers, moments, ridged, tap_coverage, taps
from icprune.planning import PruningPlan
from icprune.structure.layers import in_channels, sizes

#: One consumer's repair: (name, new weight in the pruned shape, output shift Tensor[O] or None).
Fit = tuple[str, torch.Tensor, torch.Tensor | None]


def fits(
    original: nn.Module,
    plan: PruningPlan,
    stats: InputStats,
    *,
    ridge: float = 1e-2,
    lstsq: bool = True,
    bias: bool = True,
) -> list[Fit]:
    """The repaired weight and output shift of every consumer of pruned channels, computed from
    ``original`` alone (so that :func:`icprune.apply` can prune in place and repair after).

    Args: as :func:`repair`.

    Returns:
        list of :data:`Fit` (weights float64 on the CPU, in the pruned layer's shape).

    Raises:
        TypeError, ValueError: as :func:`repair`.
    """
    if not isinstance(stats, InputStats):
        raise TypeError(
            "repair: stats must be the InputStats of icprune.calibrate(model, data, "
            f"read_at='input'), got {type(stats).__name__}"
        )
    ok = isinstance(ridge, (int, float)) and not isinstance(ridge, bool)
    if not ok or not ridge > 0 or ridge == float("inf"):
        raise ValueError(f"repair: ridge must be a finite number > 0, got {ridge!r}")
    orig = dict(original.named_modules())
    consumers = [d.module for g in plan.groups for d in g.dependencies if d.kind == "input"]
    out = []
    for name in dict.fromkeys(consumers):
        module = orig.get(name)
        if module is None or tuple(plan.sizes[name]) != sizes(module):
            raise ValueError(
                f"repair: the plan does not match the original model at {name!r}; pass the "
                f"unpruned model the plan and the statistics were made on"
            )
        kept = plan.indices(name, "in")
        c_in = in_channels(module)
        if name not in stats or kept is None or len(kept) == c_in:
            continue
        if stats[name].num_channels != c_in:
            raise ValueError(
                f"repair: stats['{name}'] has {stats[name].num_channels} channels but the layer "
                f"reads {c_in}; pass the input statistics of the unpruned model"
            )
        dropped = torch.ones(c_in, dtype=torch.bool)
        dropped[kept] = False
        gone = dropped.nonzero().flatten()
        w = taps(module.weight)  # T, O, C_in
        out_kept = plan.indices(name, "out")
        if out_kept is not None:
            w = w[:, out_kept]
        mean, _, cov = moments(stats[name])
        w_k, w_p = w[:, :, kept], w[:, :, gone]
        if lstsq:
            a = ridged(cov, ridge)[kept][:, kept]
            t = torch.linalg.solve(a, cov[kept][:, gone]).T  # |P| x |K|
            w_k = w_k + w_p @ t
            residual = mean[gone] - t @ mean[kept]
        else:
            residual = mean[gone]
        shape = (w_k.shape[1], w_k.shape[2], *module.weight.shape[2:])
        weight = w_k.permute(1, 2, 0).reshape(shape)
        shift = None
        if bias:
            cover = tap_coverage(module, stats.spatial[name])
            shift = torch.einsum("t,top,p->o", cover, w_p, residual)
        out.append((name, weight, shift))
    return out


def write(pruned: nn.Module, repaired: list[Fit]) -> nn.Module:
    """Write :func:`fits` into ``pruned`` (in place; the shifts into the biases, the BatchNorm
    after a layer without bias, or a new bias) and return it."""
    modules = dict(pruned.named_modules())
    shifted = [name for name, _, shift in repaired if shift is not None]
    follower = followers(pruned, shifted) if shifted else {}
    with torch.no_grad():
        for name, weight, shift in repaired:
            target = modules[name]
            if tuple(target.weight.shape) != tuple(weight.shape):
                raise ValueError(
                    f"repair: {name!r} has weight shape {tuple(target.weight.shape)} in the "
                    f"pruned model, the plan gives {tuple(weight.shape)}; pass the model "
                    f"icprune.apply(original, plan) made"
                )
            target.weight.copy_(weight.to(target.weight.device, target.weight.dtype))
            if shift is not None:
                _shift_bias(modules, name, shift, follower)
    return pruned


def repair(
    original: nn.Module,
    pruned: nn.Module,
    plan: PruningPlan,
    stats: InputStats,
    *,
    ridge: float = 1e-2,
    lstsq: bool = True,
    bias: bool = True,
) -> nn.Module:
    """Repair ``pruned`` (``icprune.apply(original, plan)``) in place (see the module docstring;
    ``icprune.apply(original, plan, stats=stats)`` does both in one call).

    Args:
        original: the unpruned network the plan and the statistics were made on; not modified.
        pruned: the pruned network; the weights and biases of its consumers of pruned channels
            (or the running means of the BatchNorms after them) are changed in place.
        plan: the plan that made ``pruned``.
        stats: :class:`icprune.calibrate.InputStats` of ``original``
            (``icprune.calibrate(original, data, read_at="input")``).
        ridge: relative ridge r (> 0) of the least-squares fit.
        lstsq: re-fit the kept weights; False = mean compensation only.
        bias: compensate the mean of what was removed (and of what the fit adds).

    Returns:
        ``pruned``.

    Raises:
        TypeError: ``stats`` is not :class:`InputStats`.
        ValueError: ``plan`` was not made for ``original`` (or ``pruned`` not by it), a bad
            ``ridge``, or statistics whose channel count is not the consumer's.
    """
    return write(pruned, fits(original, plan, stats, ridge=ridge, lstsq=lstsq, bias=bias))


def _shift_bias(modules: dict[str, nn.Module], name: str, shift: torch.Tensor, follower) -> None:
    """Add ``shift`` (Tensor[O]) to the output of ``modules[name]``: to its bias, else to the
    BatchNorm after it (as ``running_mean -= shift``), else as a new bias."""
    module = modules[name]
    device = module.weight.device
    if module.bias is not None:
        module.bias.add_(shift.to(device, module.bias.dtype))
        return
    bn = modules[follower[name]] if name in follower else None
    if bn is not None and bn.running_mean is not None:
        bn.running_mean.sub_(shift.to(bn.running_mean.device, bn.running_mean.dtype))
        return
    module.bias = nn.Parameter(
        shift.to(device, module.weight.dtype), requires_grad=module.weight.requires_grad
    )
