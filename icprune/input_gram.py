"""The Gram matrix of a 1x1 conv + BatchNorm layer, derived from the Gram matrix of its input.

At the ``"bn"`` read point a layer's feature map is ``y = BN(conv(x))``. When the conv is 1x1
(no padding, one group) and the BatchNorm uses its running statistics (eval mode, as in
calibration), ``y`` is an affine image of the conv's input sampled at the conv's stride:

    y = A x + c,   A = diag(a) W,   c = a * (b - mu) + beta,   a = gamma / sqrt(var + eps)

(W the C_out x C_in weight, b the conv bias, mu/var/gamma/beta/eps the BatchNorm's). So the
Gram matrix of the M output samples is exactly

    G_y = A G_x A^T + (A s_x) c^T + c (A s_x)^T + M c c^T

from the Gram matrix ``G_x`` and sums ``s_x`` of the input samples. Accumulating ``G_x`` costs
``C_in^2`` per sample instead of ``C_out^2``: for ResNet's expanding 1x1 convs (C_out = 4 C_in,
and the downsample convs, C_out = 2 C_in) 16x and 4x less, most of the Gram work of a
calibration. The input statistics are ordinary :class:`icprune.ChannelStats` (exact,
split-independent totals that checkpoint, merge and all-reduce like any other); the output Gram
is computed from them once, in float64, after the last batch (:meth:`InputGram.derive`) - when
the calibration saw more samples than that fixed cost's break-even; below it, the layer's
direct Gram matrix, also kept up to then, is used.

It differs from the Gram of the feature map computed directly only by rounding: the float32
conv and BatchNorm outputs round, the derivation does not (tests: within the fast backends'
documented 1e-5 of the largest entry of the float64 reference). Used where the saving is real
and the algebra is safe (:func:`input_gram_layers`): CPU statistics with the C++ backend,
``nan_policy="raise"``, ``C_in < C_out``, plain ``nn.Conv2d``/``nn.BatchNorm2d`` forwards,
float32/float64 weights. Off with ``calibrate(..., gram_from_input=False)``.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from icprune.config import StatsConfig
from icprune.stats import packed
from icprune.stats.backends import resolve_backend
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.gram import OneBlasThread, block_edges, run_parallel
from icprune.structure.graph import ReadPoint


def _plain(module: nn.Module, kind: type) -> bool:
    """True when ``module`` is a ``kind`` whose forward is torch's own (a subclass that changes
    the computation, e.g. a same-padding conv, is not the affine map assumed here)."""
    return isinstance(module, kind) and type(module).forward is kind.forward


def derivable(conv: nn.Module, bn: nn.Module) -> bool:
    """True when ``bn(conv(x))`` is an affine map of ``x`` sampled at the conv's stride whose
    Gram matrix is cheaper to derive than to compute: a plain 1x1 ``nn.Conv2d`` (no padding,
    one group, fewer input than output channels, float32/float64 weight) followed by a plain
    ``nn.BatchNorm2d`` that keeps running statistics (used in eval mode)."""
    if not (_plain(conv, nn.Conv2d) and _plain(bn, nn.BatchNorm2d)):
        return False
    shape_ok = conv.kernel_size == (1, 1) and conv.groups == 1
    padding_ok = conv.padding in ((0, 0), "valid")
    dtype_ok = conv.weight.dtype in (torch.float32, torch.float64)
    stats_ok = bn.track_running_stats and bn.running_mean is not None
    return bool(
        shape_ok
        and padding_ok
        and dtype_ok
        and stats_ok
        and conv.in_channels < conv.out_channels
        and bn.num_features == conv.out_channels
    )


def input_gram_layers(
    model: nn.Module,
    points: dict[str, ReadPoint],
    stats_config: StatsConfig,
    device: torch.device,
) -> dict[str, InputGram]:
    """The layers of ``points`` whose Gram matrix calibration may derive from their input.

    Args:
        model: the network.
        points: dict layer name -> :class:`ReadPoint` (from
            :func:`icprune.structure.graph.read_points`).
        stats_config: the statistics settings; nothing is derived unless they keep the Gram
            matrix, use ``nan_policy="raise"`` (zeroed NaN/Inf in an output would not be the
            image of the input) and run the C++ backend on ``device``.
        device: where the statistics are kept.

    Returns:
        dict layer name -> a fresh :class:`InputGram`, in the order of ``points``, for every
        layer read at ``"bn"`` whose conv and BatchNorm pass :func:`derivable`.
    """
    if "gram" not in stats_config.parts or stats_config.nan_policy != "raise":
        return {}
    if resolve_backend(stats_config.backend, device) != "cpp":
        return {}
    modules = dict(model.named_modules())
    return {
        name: InputGram(name, modules[name], modules[point.module], stats_config, device)
        for name, point in points.items()
        if point.read_at == "bn" and derivable(modules[name], modules[point.module])
    }


class InputGram:
    """The Gram matrix of one derivable layer, from its input where that costs less, and the
    hooks that collect it.

    Deriving costs a fixed ``C_out C_in (C_in + C_out / 2)`` multiply-adds after the last batch
    (:meth:`cost`) and saves ``(C_out^2 - C_in^2) / 2`` per sample, so it pays above
    :attr:`break_even` samples. The input statistics are always collected (they are cheap);
    the feature map's own Gram matrix is collected too while the samples seen are at most
    :attr:`break_even` (a small late layer over one or two batches) and dropped after. At the
    end (:meth:`derive`) a calibration of more than :attr:`break_even` samples derives, a
    smaller one keeps the direct matrix. The choice depends on the total number of samples
    only, so several processes (whose totals are summed first) choose as one does.

    Args:
        name: the layer's qualified name.
        conv: the 1x1 ``nn.Conv2d`` (see :func:`derivable`).
        bn: the ``nn.BatchNorm2d`` that reads its output.
        stats_config: the statistics settings (only sums and the Gram matrix are collected).
        device: where the statistics are kept.

    Attributes:
        stats: :class:`ChannelStats` (``parts=("gram",)``) of the C_in channels of the conv's
            input at its stride (``read_at="input"``).
        direct: :class:`ChannelStats` (``parts=("gram",)``) of the C_out channels of the
            feature map, or None once more than :attr:`break_even` samples were seen.
        break_even: samples above which deriving costs less than the direct Gram matrix.
    """

    def __init__(
        self,
        name: str,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        stats_config: StatsConfig,
        device: torch.device,
    ) -> None:
        self.name, self.conv, self.bn = name, conv, bn
        options = dataclasses.asdict(stats_config) | {"parts": ("gram",), "device": device}
        c_in, c_out = conv.in_channels, conv.out_channels
        self.stats = ChannelStats(c_in, **options, name=f"{name} (input)", read_at="input")
        self.direct: ChannelStats | None = ChannelStats(c_out, **options, name=name, read_at="bn")
        self.break_even = self.cost() // ((c_out * c_out - c_in * c_in) // 2)
        self._input: torch.Tensor | None = None
        self._version = 0
        self._output: torch.Tensor | None = None

    def cost(self) -> int:
        """Multiply-adds of the derivation (:meth:`derived_gram`)."""
        c_in, c_out = self.conv.in_channels + 1, self.conv.out_channels
        return c_out * c_in * c_in + c_out * c_out * c_in // 2

    def attach(self, add_output) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the hooks: the conv's input and output are noted, and the BatchNorm's
        forward hook checks that it read that output and that the input was not changed in
        place since, calls ``add_output(bn, inputs, output)`` (the layer's own feature-map
        hook), adds the conv's input at its stride to :attr:`stats` and, while
        :attr:`direct` is kept, the feature map to it.

        Returns:
            the hook handles (remove them when calibration ends).

        Raises (from the BatchNorm's hook, during the forward):
            ValueError: the BatchNorm did not read the conv's output of this forward, the
                conv's input was modified in place before the BatchNorm ran, or the output's
                dtype is not the weight's (autocast): the Gram matrix could not be derived.
        """

        def before_conv(_module, inputs):
            self._input, self._version = inputs[0], inputs[0]._version

        def after_conv(_module, _inputs, output):
            self._output = output

        def after_bn(module, inputs, output):
            x, conv_out = self._input, self._output
            self._input = self._output = None
            if x is None or inputs[0] is not conv_out or x._version != self._version:
                self._refuse("its BatchNorm did not read the conv's output of this forward")
            if output.dtype != self.conv.weight.dtype:
                self._refuse(f"its output is {output.dtype}, its weight {self.conv.weight.dtype}")
            add_output(module, inputs, output)
            sh, sw = self.conv.stride
            self.stats.update(x[:, :, ::sh, ::sw].detach())
            if self.stats.count > self.break_even:
                self.direct = None  # the derivation will be used
            elif self.direct is not None:
                self.direct.update(output.detach())

        return [
            self.conv.register_forward_pre_hook(before_conv),
            self.conv.register_forward_hook(after_conv),
            self.bn.register_forward_hook(after_bn),
        ]

    def _refuse(self, why: str) -> None:
        """Raise the ValueError of :meth:`attach`."""
        raise ValueError(
            f"layer '{self.name}': {why}, so its Gram matrix cannot be derived from its input; "
            f"calibrate with gram_from_input=False"
        )

    def state_dict(self) -> dict[str, object]:
        """``{"input": stats.state_dict(), "direct": direct.state_dict() or None}``."""
        direct = None if self.direct is None else self.direct.state_dict()
        return {"input": self.stats.state_dict(), "direct": direct}

    def load_state_dict(self, state: object) -> None:
        """Restore what :meth:`state_dict` saved (a checkpoint's), all checked first.

        Raises:
            ValueError: not such a state, statistics failing
                :meth:`ChannelStats.load_state_dict`, direct statistics missing below
                :attr:`break_even` samples or over other samples than the input's.
        """
        if not isinstance(state, dict) or set(state) != {"input", "direct"}:
            raise ValueError(
                f"layer '{self.name}': saved Gram statistics must be a dict with the keys "
                f"'input' and 'direct'"
            )
        stats = copy.deepcopy(self.stats)
        stats.load_state_dict(state["input"])
        direct = None
        if state["direct"] is not None:
            if self.direct is None:
                raise ValueError(f"layer '{self.name}': direct Gram statistics are not kept now")
            direct = copy.deepcopy(self.direct)
            direct.load_state_dict(state["direct"])
            if direct.count != stats.count:
                raise ValueError(
                    f"layer '{self.name}': saved direct Gram statistics hold {direct.count} "
                    f"samples, the input's {stats.count}"
                )
        elif stats.count <= self.break_even:
            raise ValueError(
                f"layer '{self.name}': saved Gram statistics of {stats.count} samples lack the "
                f"direct part (kept up to {self.break_even})"
            )
        self.stats, self.direct = stats, direct

    def derive(self, output: ChannelStats) -> None:
        """Give the layer's feature-map statistics their Gram matrix, in place: derived from
        :attr:`stats` (:meth:`derived_gram`; packed, zero remainder) above :attr:`break_even`
        samples, else :attr:`direct`'s (handed over: :attr:`direct` is None after);
        ``output.parts`` then includes ``"gram"``. Call inside
        :class:`icprune.stats.gram.OneBlasThread` (as :func:`derive_all` does) for bits that do
        not depend on the BLAS's thread setting.

        Args:
            output: the layer's feature-map statistics, collected without the ``"gram"`` part
                over the same batches (same ``count``).

        Raises:
            ValueError: the statistics hold different numbers of samples.
        """
        self.stats.sync()
        if self.stats.count != output.count:
            raise ValueError(
                f"layer '{self.name}': its input statistics hold {self.stats.count} samples, "
                f"the feature map's {output.count}; they must come from the same batches"
            )
        if self.stats.count <= self.break_even:  # hand the direct totals over (no copy)
            direct, self.direct = self.direct, None
            output.set_gram(direct.gram_packed, direct.gram_packed_lo)
            return
        size = packed.packed_size(output.num_channels)
        hi, lo = packed.zeros(size), packed.zeros(size)
        packed.add_upper_(hi, lo, self.derived_gram())
        output.set_gram(hi.to(output.device), lo.to(output.device))

    def derived_gram(self) -> np.ndarray:
        """ndarray[C_out, C_out] float64 whose upper triangle is the Gram matrix ``G_y`` of the
        module docstring from :attr:`stats` (the strict lower triangle is unspecified): the
        product ``A~ G~ A~^T`` of the augmented ``A~ = [A, c]`` and
        ``G~ = [[G_x, s_x], [s_x^T, M]]``, as ``F = A~ G~`` and then the upper blocks
        ``F_i A~_j^T`` of :func:`icprune.stats.gram.block_edges` (each entry computed once).
        Diagonal entries below 0 by rounding are set to 0."""
        conv, bn, stats = self.conv, self.bn, self.stats
        f64 = {"dtype": torch.float64, "device": "cpu"}
        w = conv.weight.detach().to(**f64).reshape(conv.out_channels, conv.in_channels)
        scale = (bn.running_var.detach().to(**f64) + bn.eps).rsqrt()
        shift = -bn.running_mean.detach().to(**f64)
        if conv.bias is not None:
            shift = shift + conv.bias.detach().to(**f64)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(**f64)
        shift = scale * shift
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(**f64)
        c = conv.in_channels
        a = torch.cat([scale[:, None] * w, shift[:, None]], 1).numpy()
        g = np.empty((c + 1, c + 1))
        g[:c, :c] = (stats.gram + stats.gram_lo).cpu().numpy()
        g[:c, c] = g[c, :c] = (stats.sums + stats.sums_lo).cpu().numpy()
        g[c, c] = stats.count
        f = a @ g
        out = np.empty((conv.out_channels,) * 2)
        edges = block_edges(conv.out_channels)
        for j in range(len(edges) - 1):
            columns = slice(edges[j], edges[j + 1])
            out[: edges[j + 1], columns] = f[: edges[j + 1]] @ a[columns].T
        np.fill_diagonal(out, np.maximum(out.diagonal(), 0.0))
        return out


def derive_all(inputs: dict[str, InputGram], stats: dict[str, ChannelStats]) -> None:
    """:meth:`InputGram.derive` for every layer of ``inputs`` into ``stats[layer]`` (in
    place), the layers spread over ``torch.get_num_threads()`` threads (largest first), each
    computed on one thread with one BLAS thread: the bits do not depend on the thread count.

    Raises:
        ValueError: see :meth:`InputGram.derive`.
    """
    order = sorted(inputs, key=lambda name: -inputs[name].cost())
    with OneBlasThread():
        run_parallel(order, lambda name: inputs[name].derive(stats[name]), torch.get_num_threads())
