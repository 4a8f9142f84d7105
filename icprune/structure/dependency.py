"""Dependency groups: which layers' channels must be pruned together.

A ``torch.fx`` trace of the model (see :func:`icprune.structure.graph.trace`) is walked in graph
order with the shape of every value (one forward pass on ``example_inputs``). Every tensor value
with channels carries a *layout*: the list of channel *spaces* its channels come from, and the
*channel axis* they run along (dim 1 of a conv map ``[N, C, *S]``; the last dim of a linear
layer's tokens ``[N, L, C]`` or of a channels-last map ``[N, H, W, C]``). A prunable layer
(``Conv1d/2d/3d`` with ``groups=1`` over dim 1, ``Linear`` over the last dim) starts a new space
(and grouped convs, below) with its output channels. Operations propagate or couple spaces:

- BatchNorm (over dim 1), LayerNorm over the channels (the last dim; a ``nn.LayerNorm``, or
  ``F.layer_norm`` called with a LayerNorm module's weight and bias as torchvision's
  ``LayerNorm2d`` does), elementwise activations, dropout, torchvision's ``stochastic_depth``,
  ``Identity``, pooling (over dim-1 channels) and ``mean``/``sum``/``amax``/``amin`` over
  dimensions other than the batch and the channels keep the layout; a LayerNorm's weight and
  bias follow the channels. Pruning a LayerNorm's channels also changes the mean and variance it
  normalises the kept ones with (pruning is then no longer exact zeroing, as with every
  normalisation over channels);
- a depthwise conv (:func:`icprune.structure.layers.is_depthwise`) keeps the layout: its output
  channel c is its input channel c, so it is pruned with the group of its input;
- any other grouped conv, of G groups, is pruned *within* its groups (Torch-Pruning's rule): the
  spaces it reads and writes are made of G equal tiles, and position p of every tile is one
  unit (a group's channels are its dependencies at offsets ``g * C / G``). Every conv group then
  keeps the same positions and ``groups`` stays G; a BatchNorm, a residual or a
  squeeze-excitation gate of such a space is tiled alike. This takes a second walk of the graph
  (the first finds which spaces meet grouped convs). A grouped conv whose input is not G equal
  tiles of the same spaces (its groups straddle a concatenation) stays opaque;
- ``permute``/``transpose``/``swapaxes`` move the channel axis with its dimension;
- elementwise ``add``/``sub``/``mul``/``div``, broadcasting judged per axis: operands of the
  output's shape (residual connections) are unified into one space; so is an operand with the
  output's channel count on the channel axis and size 1 elsewhere, such as a
  squeeze-excitation gate ``x * sigmoid(fc2(...))`` of shape ``[N, C, 1, 1]`` (the gate's
  producing layer is then pruned with the map it gates); an operand of one channel broadcasts
  and stays apart;
- ``cat`` along the channel axis concatenates layouts (a consumer takes each part at its
  channel offset); along any other axis it unifies them;
- ``flatten``/``view``/``reshape`` that regroup only the axes before the channel axis (tokens
  ``[N, L, C] -> [N*L, C]``) keep the layout; one that merges the channel axis with all the
  axes after it (``[N, C, *S] -> [N, C*prod(S)]``) maps channel c to the ``prod(S)`` features
  ``c*prod(S) ... (c+1)*prod(S) - 1`` (flatten -> linear).

- an attention block (:func:`icprune.structure.layers.is_attention`: ``nn.MultiheadAttention``
  with packed projections, torchvision's Swin ``ShiftedWindowAttention(V2)``, icprune's
  ``PrunedMultiheadAttention`` and ``PrunedWindowAttention``) called once is a *known block*:
  it is not traced into, and its ``num_heads`` heads become a space of their own (a group of H
  channels, kind ``"heads"``), with its output projection (``out_proj``, Swin's ``proj``)
  reading them (kind ``"input"``, ``head_dim`` consecutive input features per head). The
  embedding dimension it reads and writes (the residual stream) is not pruned through it: its
  inputs and outputs are opaque.

Everything else is *opaque*: the channels entering and leaving it are never pruned. This covers
per-channel PReLU, convs/linears/BatchNorms/LayerNorms called more
than once (shared weights), parameters used as values (``get_attr``) other than per-channel
scales read once (ConvNeXt's ``layer_scale``, which follows the map it scales), unknown
functions, the
model's inputs and outputs (so the classifier is never pruned), and any module listed in
``ignored_layers`` that is not a conv, linear, BatchNorm or LayerNorm (it is also traced as a
leaf, which is how an untraceable submodule is dealt with).

A space becomes a :class:`Group` unless it is opaque or one of its output-channel layers (conv,
linear, depthwise conv, BatchNorm, LayerNorm) is listed in ``ignored_layers``. Layers that only
*consume* a group (their input channels follow it) are pruned on their input side even when
ignored.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from icprune.modes import frozen
from icprune.structure.counting import as_inputs, count_params, counting
from icprune.structure.graph import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    trace,
)
from icprune.structure.layers import (
    PRUNABLE_TYPES,
    SLICEABLE_TYPES,
    embed_dim,
    groups,
    head_dim,
    in_channels,
    is_attention,
    is_batchnorm,
    is_conv,
    is_depthwise,
    is_layernorm,
    is_window_attention,
    out_channels,
    output_projection,
    owned_parameter,
    parameter_axis,
)

#: Kinds of :class:`Dependency`: how a module's channels follow a group.
KINDS = ("output", "depthwise", "batchnorm", "layernorm", "parameter", "heads", "input")

#: The kinds of the layers a group's scores are for (:attr:`Group.layers`).
SCORED_KINDS = ("output", "depthwise", "heads")

#: Pooling keeps the channels of a conv map, dim 1 (over a channels-last map it would pool them).
_POOL_MODULES = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_PASS_MODULES = (nn.modules.dropout._DropoutNd, nn.Identity)
_POOL_FUNCTIONS = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.max_pool2d, torch.avg_pool1d,
})  # fmt: skip
_PASS_FUNCTIONS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
}) | ACTIVATION_FUNCTIONS  # fmt: skip
_PASS_METHODS = frozenset({"contiguous", "clone", "detach"}) | ACTIVATION_METHODS
_ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
})  # fmt: skip
_ELEMENTWISE_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"})
_REDUCE_FUNCTIONS = frozenset({torch.mean, torch.sum, torch.amax, torch.amin})
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin"})
_CAT_FUNCTIONS = frozenset({torch.cat, torch.concat, torch.concatenate})
_FLATTEN_FUNCTIONS = frozenset({torch.flatten, torch.reshape})
_FLATTEN_METHODS = frozenset({"flatten", "view", "reshape"})
_PERMUTE_FUNCTIONS = frozenset({torch.permute, torch.transpose, torch.swapaxes, torch.swapdims})
_PERMUTE_METHODS = frozenset({"permute", "transpose", "swapaxes", "swapdims"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "type"})

_TRACE_HINT = (
    "List that submodule in ignored_layers=[...]: it is then traced as a single call and the "
    "channels entering and leaving it are not pruned."
)


@dataclass(frozen=True)
class Dependency:
    """One module's part in a :class:`Group`.

    Attributes:
        module: qualified name of the module (``model.named_modules()`` key).
        kind: ``"output"`` (a conv or linear layer whose output channels are the group's),
            ``"depthwise"`` (a depthwise conv: output channels, and input channels with them),
            ``"batchnorm"`` (a BatchNorm over the group's channels), ``"layernorm"`` (a LayerNorm
            over them: its weight and bias), ``"parameter"`` (a per-channel parameter scaling
            them, e.g. ConvNeXt's ``layer_scale``; ``module`` is then the parameter's qualified
            name), ``"heads"`` (an attention block whose heads are the group's channels; see
            :func:`icprune.attention.head_rows`) or ``"input"`` (a conv or linear layer whose
            input channels follow the group).
        offset: index of the group's first channel (or feature) along that axis of the module.
        repeat: consecutive input features per channel (``prod(S)`` after flattening a
            ``[N, C, *S]`` map into a linear layer, else 1).

    Channel c of the group is channels ``offset + c*repeat ... offset + (c+1)*repeat - 1`` of
    the module's output axis (kinds output, depthwise, batchnorm, heads) or input axis (kind
    input).
    """

    module: str
    kind: str
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class Group:
    """Channels that must be pruned together, and every module they touch.

    Attributes:
        channels: number C of coupled channels.
        dependencies: the modules whose output or input channels follow the group, in graph
            order (see :class:`Dependency`).
    """

    channels: int
    dependencies: tuple[Dependency, ...]

    @property
    def layers(self) -> tuple[str, ...]:
        """The prunable layers (conv, linear, depthwise conv, attention block) whose output
        channels (an attention's heads) are the group's channels: the keys a plan keeps
        channels for."""
        kinds = SCORED_KINDS
        return tuple(dict.fromkeys(d.module for d in self.dependencies if d.kind in kinds))


@dataclass(frozen=True)
class LayerShape:
    """What the cost of a conv, linear, BatchNorm or LayerNorm module depends on, recorded by
    the trace.

    Attributes:
        module: qualified name.
        kind: ``"conv"``, ``"depthwise"``, ``"linear"``, ``"batchnorm"``, ``"layernorm"``,
            ``"parameter"`` (a per-channel parameter; ``module`` is its qualified name) or
            ``"attention"`` (an attention block, whose channels are its heads).
        in_channels, out_channels: full channel (feature) counts (an attention's heads).
        groups: conv groups (1 for linear and the norms).
        positions: output positions over all calls for ``example_inputs``: ``N * prod(output
            spatial)`` for a conv, ``N * prod(leading dims)`` for a linear layer (``N`` on 2-D
            inputs, ``N * L`` over tokens); 0 for the norms, or when not called. For an
            attention block: its MACs per head over all calls (multi-head attention:
            ``head_dim * (N*L*E + 2*N*S*E + 2*N*L*S + N*L*E)`` each, the query, key and value
            projections, ``Q K^T``, ``A V`` and ``out_proj``, for L queries over S keys of
            embedding E; window attention: ``head_dim * (4*T*C + 2*T*n)`` over T padded tokens
            in windows of n, plus V2's ``cpb_mlp`` output row).
        kernel: ``prod(kernel_size)`` (1 for linear and the norms; for a parameter its elements
            per channel; for an attention block its parameters per head: q, k and v rows,
            ``3 * head_dim * (E + bias)``, and Swin's bias table column or V2's ``cpb_mlp`` row
            and ``logit_scale``).
        bias: the module has a bias (for a BatchNorm: affine weight and bias).
        weight: a LayerNorm has a weight (True for every other kind, whose weight is counted by
            ``bias`` for a BatchNorm and always present for convs and linears).
    """

    module: str
    kind: str
    in_channels: int
    out_channels: int
    groups: int
    positions: int
    kernel: int
    bias: bool
    weight: bool = True


@dataclass(frozen=True)
class Dependencies:
    """The dependency groups of a model and the shapes its cost depends on.

    Attributes:
        groups: prunable groups, in graph order.
        shapes: :class:`LayerShape` of every conv, linear and norm module of the model, of every
            per-channel parameter and of every attention block called once.
        macs: multiply-accumulates of one forward on ``example_inputs`` (FlopCounterMode).
        params: number of parameters.
    """

    groups: tuple[Group, ...]
    shapes: dict[str, LayerShape]
    macs: int
    params: int


# A layout: one (space, channels, repeat) segment per run of channels, in channel order.
Segment = tuple[int, int, int]


class _Spaces:
    """Union-find over channel spaces, with each space's size, opaque flag and dependencies."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.opaque: list[bool] = []
        self.deps: list[list[tuple[int, Dependency]]] = []

    def new(self, size: int, opaque: bool = False) -> tuple[Segment, ...]:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.opaque.append(opaque)
        self.deps.append([])
        return ((len(self.parent) - 1, size, 1),)

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def block(self, *layouts: tuple[Segment, ...] | None) -> None:
        for layout in layouts:
            for space, _, _ in layout or ():
                self.opaque[self.find(space)] = True

    def unify(self, a: tuple[Segment, ...], b: tuple[Segment, ...]) -> None:
        if [s[1:] for s in a] != [s[1:] for s in b]:
            self.block(a, b)  # channel runs that do not line up cannot be pruned together
            return
        for (x, _, _), (y, _, _) in zip(a, b, strict=True):
            x, y = self.find(x), self.find(y)
            if x != y:
                self.parent[y] = x
                self.opaque[x] = self.opaque[x] or self.opaque[y]

    def add(self, layout: tuple[Segment, ...], module: str, kind: str, order: int) -> None:
        offset = 0
        for space, size, repeat in layout:
            dep = Dependency(module, kind, offset, repeat)
            self.deps[space].append((order, dep))
            offset += size * repeat


def _meta(node: object) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def _reads_metadata(node: fx.Node) -> bool:
    """True for ``x.size()``, ``x.dim()``, ``x.numel()``, ``x.shape`` and the like."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and node.args[1:2] in (("shape",), ("dtype",), ("device",), ("ndim",))
    )


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Walker:
    """Walks a shape-propagated graph once, building the channel layout of every value.

    Every value with a layout also has a *channel axis* (``axes``; 1 unless set): the dimension
    its channels run along, 1 for conv maps ``(N, C, *S)`` and the last one for linear layers
    over tokens or channels-last maps ``(N, *S, C)``.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        ignored: frozenset[str],
        model: nn.Module,
        tiles: dict[fx.Node, int] | None = None,
    ) -> None:
        self.modules = modules
        self.ignored = ignored
        self.model = model
        # Grouped convs take two walks. The first (tiles None) notes in ``needs`` which spaces
        # a grouped conv with G groups reads or writes (each must come in G equal tiles) and
        # in ``created`` the space each node creates; the second creates every space in the
        # tiles its union needs (see :func:`_tiles`), so channel p of every tile is one unit.
        self.tiles = tiles
        self.needs: list[tuple[int, int]] = []
        self.created: dict[fx.Node, int] = {}
        self.spaces = _Spaces()
        self.layouts: dict[fx.Node, tuple[Segment, ...] | None] = {}
        self.axes: dict[fx.Node, int] = {}
        self.calls: dict[str, int] = {}
        self.shapes: dict[str, LayerShape] = {}

    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
            elif node.op == "get_attr":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
            elif (owner := _layer_norm_owner(node, self.modules)) is not None:
                self.calls[owner] = self.calls.get(owner, 0) + 1
        for order, node in enumerate(graph.nodes):
            self.layouts[node] = self.visit(node, order)

    def layout(self, node: object) -> tuple[Segment, ...] | None:
        return self.layouts.get(node) if isinstance(node, fx.Node) else None

    def axis(self, node: object) -> int:
        """The channel axis of a value (a non-negative dimension index)."""
        return self.axes.get(node, 1) if isinstance(node, fx.Node) else 1

    def at(
        self, node: fx.Node, layout: tuple[Segment, ...] | None, axis: int
    ) -> tuple[Segment, ...] | None:
        """``layout`` as the layout of ``node``, whose channels run along ``axis``."""
        if axis != 1:
            self.axes[node] = axis
        return layout

    def fresh(self, node: fx.Node, size: int) -> tuple[Segment, ...]:
        """A new space for the ``size`` channels ``node`` creates: one segment, or T equal
        segments of one space of ``size / T`` channels when the second walk tiles it T times
        (channel p of that space is channel p of every tile)."""
        tiles = self.tiles.get(node, 1) if self.tiles is not None else 1
        if tiles > 1 and size % tiles == 0:
            layout = self.spaces.new(size // tiles) * tiles
        else:
            layout = self.spaces.new(size)
        self.created[node] = layout[0][0]
        return layout

    def inputs(self, node: fx.Node) -> list[tuple[Segment, ...]]:
        return [lay for n in node.all_input_nodes if (lay := self.layout(n)) is not None]

    def opaque(self, node: fx.Node) -> tuple[Segment, ...] | None:
        """Block every input and give the output (if it has channels) a fresh opaque space."""
        self.spaces.block(*self.inputs(node))
        meta = _meta(node)
        if meta is None or len(meta.shape) < 2:
            return None
        return self.spaces.new(meta.shape[1], opaque=True)

    def visit(self, node: fx.Node, order: int) -> tuple[Segment, ...] | None:
        if node.op == "output":
            self.spaces.block(*self.inputs(node))
            return None
        if node.op == "get_attr":
            return self.parameter(node, order)
        if node.op == "placeholder":
            return self.opaque(node)
        if node.op == "call_module" and is_attention(self.modules[node.target]):
            return self.attention(node, order)
        meta = _meta(node)
        if _reads_metadata(node):
            return None  # x.size(0), x.shape: the channels are not touched
        if meta is None or len(meta.shape) < 2:
            return self.opaque(node)
        if node.op == "call_module":
            return self.visit_module(node, meta, order)
        target = node.target
        function = node.op == "call_function"
        if function and target in _POOL_FUNCTIONS:
            return self.passthrough(node, meta, channels_first=True)
        if (function and (target in _PASS_FUNCTIONS or _is_stochastic_depth(target))) or (
            not function and target in _PASS_METHODS
        ):
            return self.passthrough(node, meta)
        if (function and target in _ELEMENTWISE_FUNCTIONS) or (
            not function and target in _ELEMENTWISE_METHODS
        ):
            return self.elementwise(node, meta)
        if (function and target in _REDUCE_FUNCTIONS) or (
            not function and target in _REDUCE_METHODS
        ):
            return self.reduce(node, meta)
        if function and target in _CAT_FUNCTIONS:
            return self.cat(node, meta)
        if (function and target in _FLATTEN_FUNCTIONS) or (
            not function and target in _FLATTEN_METHODS
        ):
            return self.flatten(node, meta)
        if (function and target in _PERMUTE_FUNCTIONS) or (
            not function and target in _PERMUTE_METHODS
        ):
            return self.permute(node, meta)
        if function and target is F.layer_norm:
            return self.layer_norm_function(node, meta, order)
        return self.opaque(node)

    def attention(self, node: fx.Node, order: int) -> None:
        """A known attention block (see the module docstring): its heads become a new space,
        read by its ``out_proj`` (``head_dim`` input features per head); its inputs are
        opaque and its output (a tuple) has no layout. Called more than once, listed in
        ``ignored_layers``, or with inputs of unknown shape, it is wholly opaque."""
        name = node.target
        module = self.modules[name]
        self.spaces.block(*self.inputs(node))
        if name in self.ignored or self.calls[name] != 1:
            return None
        per_head = _per_head_cost(node, module)
        if per_head is None:
            return None
        count, dim = module.num_heads, head_dim(module)
        self.shapes[name] = LayerShape(name, "attention", count, count, 1, *per_head, True)
        fresh = self.fresh(node, count)
        self.spaces.add(fresh, name, "heads", order)
        self.spaces.add(
            tuple((space, size, dim) for space, size, _ in fresh),
            f"{name}.{output_projection(module)}" if name else output_projection(module),
            "input",
            order,
        )
        return None

    def parameter(self, node: fx.Node, order: int) -> tuple[Segment, ...] | None:
        """A per-channel parameter used as a value (ConvNeXt's ``layer_scale``, ``(C, 1, 1)``;
        see :func:`icprune.structure.layers.parameter_axis`), read once, of a module without
        channels of its own: a space of its C channels along that axis, which the elementwise
        rules couple with the map it scales. Any other ``get_attr`` is opaque."""
        name = node.target
        owned = owned_parameter(self.model, name) if self.calls.get(name) == 1 else None
        axis = parameter_axis(getattr(*owned)) if owned is not None else None
        if axis is None or name.rpartition(".")[0] in self.ignored:
            return self.opaque(node)
        tensor = getattr(*owned)
        fresh = self.fresh(node, tensor.shape[axis])
        self.spaces.add(fresh, name, "parameter", order)
        channels = tensor.shape[axis]
        self.shapes[name] = LayerShape(
            name, "parameter", channels, channels, 1, 0, tensor.numel() // channels, False
        )
        return self.at(node, fresh, axis)

    def passthrough(
        self, node: fx.Node, meta: TensorMetadata, channels_first: bool = False
    ) -> tuple[Segment, ...] | None:
        """Same layout and channel axis as the first argument, if the output has as many
        channels along that axis (pooling, ``channels_first``, only with channels on dim 1)."""
        first = node.args[0] if node.args else None
        lay, first_meta, axis = self.layout(first), _meta(first), self.axis(first)
        others = [n for n in node.all_input_nodes if n is not first]
        if (
            lay is None
            or first_meta is None
            or (channels_first and axis != 1)
            or (axis != 1 and len(first_meta.shape) != len(meta.shape))
            or axis >= len(meta.shape)
            or first_meta.shape[axis] != meta.shape[axis]
            or any(self.layout(n) is not None for n in others)
        ):
            return self.opaque(node)
        return self.at(node, lay, axis)

    def elementwise(self, node: fx.Node, meta: TensorMetadata) -> tuple[Segment, ...] | None:
        """``add``/``sub``/``mul``/``div``, broadcasting judged per axis against the channel
        axis of the operands shaped like the output (batch aside): those are unified; an
        operand with the output's channel extent on that axis and size 1 elsewhere (a
        squeeze-excitation gate ``(N, C, 1, 1)``, a per-channel scale) is unified with them
        too; one of channel extent 1 broadcasts over the channels and stays apart; anything
        else is opaque."""
        out = tuple(meta.shape)
        n = len(out)
        operands = []
        for arg in node.all_input_nodes:
            lay, arg_meta = self.layout(arg), _meta(arg)
            if lay is None or arg_meta is None:
                return self.opaque(node)
            operands.append((lay, tuple(arg_meta.shape), self.axis(arg)))
        full = [op for op in operands if len(op[1]) == n and op[1][1:] == out[1:]]
        if not full or len({axis for _, _, axis in full}) != 1:
            return self.opaque(node)
        axis = full[0][2]
        result = full[0][0]
        for lay, shape, own in operands:
            shift = n - len(shape)
            extent = shape[axis - shift] if axis >= shift else 1
            if extent == out[axis] and own + shift == axis:
                self.spaces.unify(result, lay)
            elif extent == 1 and (shape[own] == 1 or own + shift != axis):
                if shape[own] > 1:  # its channels run along another axis of the result
                    self.spaces.block(lay)
            else:
                return self.opaque(node)
        return self.at(node, result, axis)

    def reduce(self, node: fx.Node, meta: TensorMetadata) -> tuple[Segment, ...] | None:
        """``mean``/``sum``/``amax``/``amin`` over dimensions other than the batch and the
        channels keep the layout (the channel axis shifts when dimensions before it go); any
        other reduction is opaque."""
        source = node.args[0] if node.args else None
        src, lay, axis = _meta(source), self.layout(source), self.axis(source)
        dim = _arg(node, 1, "dim")
        dims = (dim,) if isinstance(dim, int) else dim
        keepdim = _arg(node, 2, "keepdim", False)
        if (
            src is None
            or lay is None
            or not isinstance(dims, (tuple, list))
            or not dims
            or not all(isinstance(d, int) for d in dims)
            or not isinstance(keepdim, bool)
        ):
            return self.opaque(node)
        reduced = {d % len(src.shape) for d in dims}
        if 0 in reduced or axis in reduced:
            return self.opaque(node)
        new = axis if keepdim else axis - sum(d < axis for d in reduced)
        if new >= len(meta.shape) or meta.shape[new] != src.shape[axis]:
            return self.opaque(node)
        if len(node.all_input_nodes) != 1:
            return self.opaque(node)
        return self.at(node, lay, new)

    def cat(self, node: fx.Node, meta: TensorMetadata) -> tuple[Segment, ...] | None:
        parts = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
            return self.opaque(node)
        layouts = [self.layout(p) for p in parts]
        axes = {self.axis(p) for p in parts}
        if any(lay is None for lay in layouts) or len(axes) != 1:
            return self.opaque(node)
        axis = axes.pop()
        if dim % len(meta.shape) == axis:  # channels side by side
            return self.at(node, tuple(seg for lay in layouts for seg in lay), axis)
        for lay in layouts[1:]:  # batch or spatial cat: the same channels in every part
            self.spaces.unify(layouts[0], lay)
        return self.at(node, layouts[0], axis)

    def flatten(self, node: fx.Node, meta: TensorMetadata) -> tuple[Segment, ...] | None:
        """``flatten``/``view``/``reshape`` (see :meth:`flattened`)."""
        source = node.args[0] if node.args else None
        lay, src = self.layout(source), _meta(source)
        if lay is None or src is None:
            return self.opaque(node)
        return self.flattened(node, lay, tuple(src.shape), tuple(meta.shape), self.axis(source))

    def flattened(
        self,
        node: fx.Node,
        lay: tuple[Segment, ...],
        src: tuple[int, ...],
        out: tuple[int, ...],
        axis: int,
    ) -> tuple[Segment, ...] | None:
        """A reshape from ``src`` to ``out`` of a value with channels along ``axis``:

        - the channel axis and every axis after it kept as they are, the axes before it
          regrouped (tokens ``(N, L, C) -> (N*L, C)``, ``(N, H, W, C) -> (N, H*W, C)``): the
          layout is kept, the channel axis moves with the regrouping (not onto the batch axis);
        - the channel axis merged with every axis after it (``[N, C, *S] -> [N, C*prod(S)]``):
          each channel becomes ``prod(S)`` consecutive features.

        Anything else is opaque."""
        if src == out:
            return self.at(node, lay, axis)
        kept = len(src) - axis  # the channel axis and the axes after it
        new = len(out) - kept
        if new >= 1 and out[new:] == src[axis:]:
            return self.at(node, lay, new)
        if len(out) == axis + 1 and out[:axis] == src[:axis] and out[axis] == math.prod(src[axis:]):
            spatial = math.prod(src[axis + 1 :])
            return self.at(
                node, tuple((space, size, repeat * spatial) for space, size, repeat in lay), axis
            )
        return self.opaque(node)

    def permute(self, node: fx.Node, meta: TensorMetadata) -> tuple[Segment, ...] | None:
        """``permute``/``transpose``/``swapaxes``: the channels move with their axis (not onto
        the batch axis)."""
        source = node.args[0] if node.args else None
        lay, src, axis = self.layout(source), _meta(source), self.axis(source)
        if lay is None or src is None or len(node.all_input_nodes) != 1:
            return self.opaque(node)
        n = len(src.shape)
        rest = [*node.args[1:], *node.kwargs.values()]
        if node.target in ("permute", torch.permute):
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            if sorted(d % n for d in dims if isinstance(d, int)) != list(range(n)):
                return self.opaque(node)
            new = [d % n for d in dims].index(axis)
        else:
            if len(rest) != 2 or not all(isinstance(d, int) for d in rest):
                return self.opaque(node)
            a, b = (d % n for d in rest)
            new = b if axis == a else a if axis == b else axis
        if new == 0:
            return self.opaque(node)
        return self.at(node, lay, new)

    def layer_norm_function(
        self, node: fx.Node, meta: TensorMetadata, order: int
    ) -> tuple[Segment, ...] | None:
        """``F.layer_norm`` with the weight (and bias) of a LayerNorm module, as a LayerNorm
        subclass such as torchvision's ``LayerNorm2d`` calls it: that module's LayerNorm."""
        owner = _layer_norm_owner(node, self.modules)
        if owner is None:
            return self.opaque(node)
        return self.layer_norm(node, owner, meta, order)

    def layer_norm(
        self, node: fx.Node, name: str, meta: TensorMetadata, order: int
    ) -> tuple[Segment, ...] | None:
        """A LayerNorm over the channels (the last axis), called once: it keeps the layout and
        its weight and bias follow the channels."""
        source = node.args[0] if node.args else None
        lay, src, axis = self.layout(source), _meta(source), self.axis(source)
        module = self.modules[name]
        if (
            lay is None
            or src is None
            or self.calls.get(name, 0) != 1
            or axis != len(src.shape) - 1
            or src.shape[axis] != module.normalized_shape[0]
            or tuple(meta.shape) != tuple(src.shape)
            or any(r != 1 for _, _, r in lay)
        ):
            return self.opaque(node)
        self.spaces.add(lay, name, "layernorm", order)
        return self.at(node, lay, axis)

    def visit_module(
        self, node: fx.Node, meta: TensorMetadata, order: int
    ) -> tuple[Segment, ...] | None:
        name = node.target
        module = self.modules[name]
        source = node.args[0] if node.args else None
        lay, src, axis = self.layout(source), _meta(source), self.axis(source)
        if isinstance(module, SLICEABLE_TYPES):
            self.record(name, module, meta)
        # A module with per-channel state called more than once would need the same channels
        # kept at every call; such modules are opaque. Stateless ones (a shared ReLU) are fine.
        stateful = isinstance(module, (*SLICEABLE_TYPES, nn.LayerNorm, nn.PReLU))
        single = len(node.all_input_nodes) == 1 and not (stateful and self.calls[name] > 1)
        if lay is None or src is None or not single:
            return self.opaque(node)
        if isinstance(module, nn.Flatten):
            return self.flattened(node, lay, tuple(src.shape), tuple(meta.shape), axis)
        if isinstance(module, PRUNABLE_TYPES):
            return self.prunable(node, module, lay, src, order)
        if is_batchnorm(module) and axis == 1 and all(r == 1 for _, _, r in lay):
            self.spaces.add(lay, name, "batchnorm", order)
            return lay
        if is_layernorm(module) and name not in self.ignored:
            return self.layer_norm(node, name, meta, order)
        per_channel_prelu = isinstance(module, nn.PReLU) and module.num_parameters > 1
        if name in self.ignored or per_channel_prelu:
            return self.opaque(node)
        if isinstance(module, _POOL_MODULES):
            return self.passthrough(node, meta, channels_first=True)
        if isinstance(module, (*ACTIVATION_MODULES, *_PASS_MODULES)):
            return self.passthrough(node, meta)
        return self.opaque(node)

    def prunable(
        self,
        node: fx.Node,
        module: nn.Module,
        lay: tuple[Segment, ...],
        src: TensorMetadata,
        order: int,
    ) -> tuple[Segment, ...] | None:
        name = node.target
        axis = self.axis(node.args[0])
        linear = isinstance(module, nn.Linear)
        if not linear and len(src.shape) != module.weight.dim():  # unbatched conv input
            return self.opaque(node)
        reads = len(src.shape) - 1 if linear else 1  # the axis the layer's in_channels are on
        if linear or groups(module) == 1:
            fresh = self.fresh(node, out_channels(module))
            if axis == reads:
                self.spaces.add(lay, name, "input", order)
            else:  # its input channels are not the value's channels, which stay whole
                self.spaces.block(lay)
            self.spaces.add(fresh, name, "output", order)
            return self.at(node, fresh, reads)
        if axis != 1:
            return self.opaque(node)
        if is_depthwise(module):
            self.spaces.add(lay, name, "depthwise", order)
            return lay
        return self.grouped(node, module, lay, order)

    def grouped(
        self, node: fx.Node, module: nn.Module, lay: tuple[Segment, ...], order: int
    ) -> tuple[Segment, ...] | None:
        """A grouped conv of G groups, pruned *within* its groups: input position p of every
        group is one unit (the input layout must be G equal tiles), and so is output position
        q, so every group keeps the same positions and ``groups`` stays G. Otherwise opaque."""
        count = groups(module)
        if self.tiles is None:  # first walk: note what must be tiled
            if len(lay) == 1 and lay[0][2] == 1:
                self.needs.append((lay[0][0], count))
            out = self.fresh(node, out_channels(module))
            self.needs.append((out[0][0], count))
            return out
        period = len(lay) // count
        roots = [(self.spaces.find(space), size, repeat) for space, size, repeat in lay]
        out = self.fresh(node, out_channels(module))
        if (
            len(lay) % count
            or roots != roots[:period] * count
            or any(repeat != 1 for _, _, repeat in lay)
            or len(out) % count
        ):
            self.spaces.block(out)
            return self.opaque(node)
        self.spaces.add(lay, node.target, "input", order)
        self.spaces.add(out, node.target, "output", order)
        return out

    def record(self, name: str, module: nn.Module, meta: TensorMetadata) -> None:
        """Add one call of a conv, linear or BatchNorm module to its :class:`LayerShape`."""
        shape = self.shapes.get(name)
        positions = 0
        if isinstance(module, PRUNABLE_TYPES):
            positions = meta.shape.numel() // out_channels(module)
        if shape is not None:
            positions += shape.positions
        self.shapes[name] = _shape_of(name, module, positions)


def _per_head_cost(node: fx.Node, module: nn.Module) -> tuple[int, int] | None:
    """``(MACs, parameters)`` per head of one call of an attention block (see
    :class:`LayerShape`), or None when its input shapes are not the ones it takes.

    Multi-head attention over L queries and S keys of embedding E, batch N:
    ``d * (2*N*L*E + 2*N*S*E + 2*N*L*S)`` MACs (q and out projections, k and v projections,
    ``Q K^T`` and ``A V``), ``3*d*(E + bias)`` parameters. Window attention over a ``(B, H, W,
    C)`` map padded to ``T = B * H' * W'`` tokens in windows of ``n = wh*ww``:
    ``d * (4*T*C + 2*T*n)`` MACs, and V2's ``cpb_mlp`` output row: ``(2wh-1)(2ww-1)*hidden``;
    parameters ``3*d*(C + bias)`` plus the head's bias table column (V1) or its ``cpb_mlp`` row
    and ``logit_scale`` (V2)."""
    dim, embed = head_dim(module), embed_dim(module)
    if is_window_attention(module):
        x = _meta(_arg(node, 0, "x"))
        if x is None or len(x.shape) != 4 or x.shape[3] != embed:
            return None
        wh, ww = module.window_size
        batch, height, width = x.shape[0], x.shape[1], x.shape[2]
        tokens = batch * (height + -height % wh) * (width + -width % ww)
        macs = dim * (4 * tokens * embed + 2 * tokens * wh * ww)
        bias = module.qkv.bias is not None
        params = 3 * dim * (embed + int(bias))
        if hasattr(module, "logit_scale"):  # V2
            hidden = module.cpb_mlp[2].in_features
            macs += module.relative_coords_table[..., 0].numel() * hidden
            params += hidden + 1
        else:
            params += module.relative_position_bias_table.shape[0]
        return macs, params
    query, key = _meta(_arg(node, 0, "query")), _meta(_arg(node, 1, "key"))
    if query is None or key is None or len(query.shape) != len(key.shape):
        return None
    if len(query.shape) == 2:  # unbatched (L, E)
        batch, length, source = 1, query.shape[0], key.shape[0]
    elif len(query.shape) != 3:
        return None
    elif module.batch_first:
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
    else:
        batch, length, source = query.shape[1], query.shape[0], key.shape[0]
    macs = dim * (2 * batch * length * embed + 2 * batch * source * embed)
    macs += dim * 2 * batch * length * source
    return macs, 3 * dim * (embed + int(module.in_proj_bias is not None))


def _tiles(walker: _Walker) -> dict[fx.Node, int]:
    """How many equal tiles each node's new space comes in for the second walk: the least
    common multiple of the group counts of the grouped convs its union (from the first walk)
    meets, where that divides the space's channels (else 1, and those convs stay opaque)."""
    spaces = walker.spaces
    need: dict[int, int] = {}
    for space, count in walker.needs:
        root = spaces.find(space)
        need[root] = math.lcm(need.get(root, 1), count)
    tiles = {}
    for node, space in walker.created.items():
        root = spaces.find(space)
        if need.get(root, 1) > 1 and spaces.size[space] % need[root] == 0:
            tiles[node] = need[root]
    return tiles


def _is_stochastic_depth(target: object) -> bool:
    """torchvision's ``stochastic_depth`` (an fx-wrapped function): it scales whole samples,
    so it keeps the layout (torchvision is not imported to recognise it)."""
    return getattr(target, "__name__", None) == "stochastic_depth" and str(
        getattr(target, "__module__", "")
    ).startswith("torchvision.ops")


def _layer_norm_owner(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The LayerNorm module (over one axis) whose weight and bias an ``F.layer_norm`` call
    passes as ``get_attr`` nodes (a LayerNorm subclass traced into), or None."""
    if node.op != "call_function" or node.target is not F.layer_norm:
        return None
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    owner, _, attr = weight.target.rpartition(".")
    module = modules.get(owner)
    if attr != "weight" or module is None or not is_layernorm(module):
        return None
    if bias is not None and not (
        isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{owner}.bias"
    ):
        return None
    return owner


def _shape_of(name: str, module: nn.Module, positions: int = 0) -> LayerShape:
    """The :class:`LayerShape` of a conv, linear, BatchNorm or LayerNorm module over
    ``positions``."""
    if is_layernorm(module):
        channels = module.normalized_shape[0]
        return LayerShape(
            name, "layernorm", channels, channels, 1, 0, 1, module.bias is not None,
            module.weight is not None,
        )  # fmt: skip
    if isinstance(module, nn.Linear):
        kind, kernel = "linear", 1
    elif is_conv(module):
        kind = "depthwise" if is_depthwise(module) else "conv"
        kernel = module.weight[0, 0].numel()
    else:
        kind, kernel, positions = "batchnorm", 1, 0
    return LayerShape(
        name, kind, in_channels(module), out_channels(module), groups(module), positions, kernel,
        (module.bias if kind != "batchnorm" else module.weight) is not None,
    )  # fmt: skip


def _check_ignored(modules: dict[str, nn.Module], ignored_layers: Iterable[str]) -> frozenset[str]:
    if isinstance(ignored_layers, str):
        raise TypeError(f"ignored_layers must be a list of module names, got {ignored_layers!r}")
    ignored = frozenset(ignored_layers)
    unknown = sorted(n for n in ignored if n not in modules or n == "")
    if unknown:
        raise ValueError(
            f"ignored_layers: the model has no submodule named {unknown[0]!r}; use the "
            f"qualified names of model.named_modules(), e.g. {next(iter(list(modules)[1:]), '')!r}"
        )
    return ignored


def trace_dependencies(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    ignored_layers: Iterable[str] = (),
) -> Dependencies:
    """Dependency groups and cost-relevant shapes of ``model``.

    Args:
        model: the network; not modified (one forward in eval mode under ``no_grad``, its
            train/eval flags restored).
        example_inputs: Tensor or tuple of Tensors for ``model(*example_inputs)``, e.g.
            ``torch.randn(1, 3, 224, 224)``; MACs are counted for this input.
        ignored_layers: qualified module names. A conv, linear or BatchNorm listed here keeps all
            its output channels (its whole group is left out); any other module is traced as a
            single call and the channels entering and leaving it are kept.

    Returns:
        :class:`Dependencies`.

    Raises:
        ValueError: the model cannot be traced by torch.fx (naming the submodule to list in
            ``ignored_layers``), an ignored name does not exist, or the model fails on
            ``example_inputs`` (wrong shape, dtype or device; the message names the module).
        TypeError: ``example_inputs`` is not a Tensor or a tuple/list of Tensors.
    """
    modules = dict(model.named_modules())
    ignored = _check_ignored(modules, ignored_layers)
    graph = trace(model, leaves=ignored, hint=_TRACE_HINT)
    module = fx.GraphModule(model, graph)
    args = as_inputs(example_inputs, "dependency trace")
    # ShapeProp prints a traceback of its own before raising: keep it off the user's terminal.
    with frozen(model), counting() as counter, contextlib.redirect_stderr(io.StringIO()):
        try:
            ShapeProp(module).propagate(*args)
        except RuntimeError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            where = re.search(r"target=([^\]]+)\]", str(exc))
            at = f" at {where.group(1)!r}" if where else ""
            detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            shapes = [f"{tuple(a.shape)} {a.dtype} on {a.device}" for a in args]
            raise ValueError(
                f"the model fails on example_inputs {shapes}{at} ({type(cause).__name__}: "
                f"{detail}); pass example_inputs the model accepts, with its input shape, dtype "
                f"and device (e.g. torch.randn(1, 3, 224, 224))"
            ) from exc
    walker = _Walker(modules, ignored, model)
    walker.run(graph)
    if walker.needs:  # grouped convs: walk again with their spaces tiled
        walker = _Walker(modules, ignored, model, _tiles(walker))
        walker.run(graph)
    spaces = walker.spaces
    members: dict[int, list[tuple[int, Dependency]]] = {}
    for space in range(len(spaces.parent)):
        members.setdefault(spaces.find(space), []).extend(spaces.deps[space])
    groups = []
    for root, deps in sorted(
        members.items(), key=lambda item: min((o for o, _ in item[1]), default=0)
    ):
        deps = [d for _, d in sorted(deps, key=lambda od: od[0])]
        excluded = any(d.module in ignored for d in deps if d.kind != "input")
        if spaces.opaque[root] or excluded or not any(d.kind in ("output", "heads") for d in deps):
            continue
        groups.append(Group(spaces.size[root], tuple(deps)))
    shapes = {
        name: walker.shapes.get(name) or _shape_of(name, m)
        for name, m in modules.items()
        if isinstance(m, SLICEABLE_TYPES) or is_layernorm(m)
    } | {
        name: shape
        for name, shape in walker.shapes.items()
        if shape.kind in ("parameter", "attention")
    }
    return Dependencies(tuple(groups), shapes, counter.get_total_flops() // 2, count_params(model))


def dependency_groups(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    ignored_layers: Iterable[str] = (),
) -> list[Group]:
    """The groups of channels of ``model`` that must be pruned together.

    Args:
        model: the network; not modified.
        example_inputs: Tensor or tuple of Tensors for ``model(*example_inputs)`` (shapes only
            matter; a small input such as ``torch.randn(1, 3, 64, 64)`` is enough).
        ignored_layers: module names to leave unpruned (see :func:`trace_dependencies`).

    Returns:
        list of :class:`Group`, in graph order. Layers whose output is the model's output (the
        classifier) and opaque operations are in no group.

    Raises:
        ValueError, TypeError: as :func:`trace_dependencies` (untraceable model, unknown ignored
            name, ``example_inputs`` the model fails on or of the wrong type).
    """
    return list(trace_dependencies(model, example_inputs, ignored_layers=ignored_layers).groups)
