"""The model's structure as icprune needs it: prunable layers and where their outputs are read.

Structure comes from a ``torch.fx`` symbolic trace (no data, no forward pass). A *prunable layer*
is a ``Conv1d/2d/3d`` or ``Linear`` module; by default those whose output reaches the model's
output without passing another prunable layer (the classifier) are left out, because their output
channels are the model's outputs.

A layer's feature map can be read at three *read points*:

- ``"output"``: the layer's own output;
- ``"bn"``: the output of the BatchNorm that directly consumes the layer's output;
- ``"activation"``: that BatchNorm's output (or, without one, the layer's output) passed through
  the elementwise activation that directly follows it (ReLU, ReLU6, SiLU, GELU, ...).

Where the requested point does not exist for a layer (e.g. ResNet's last conv of a block, whose
BatchNorm feeds the residual add, has no activation of its own), the nearest earlier point is
used; the point actually used is reported in :attr:`ReadPoint.read_at`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from icprune.structure.layers import (
    ATTENTION_TYPES,
    BATCHNORM_TYPES,
    PRUNABLE_TYPES,
    is_window_attention,
)

READ_POINTS = ("output", "bn", "activation")

#: Elementwise activation modules.
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)  # fmt: skip
#: Elementwise activation functions and tensor methods, as they appear in a traced graph.
ACTIVATION_FUNCTIONS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid,
    torch.tanh,
})  # fmt: skip
ACTIVATION_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})


@dataclass(frozen=True)
class ReadPoint:
    """Where the feature map of one prunable layer is read.

    Attributes:
        layer: qualified name of the prunable layer (``model.named_modules()`` key).
        module: qualified name of the module whose forward output is hooked (the layer itself or
            the BatchNorm after it).
        read_at: the read point actually used: ``"output"``, ``"bn"`` or ``"activation"``.
        activation: out-of-place elementwise function applied to the hooked output
            (Tensor -> Tensor of the same shape), or None.
        channel_axis: the dimension of the hooked output the layer's channels run along: 1 for
            a conv (``[N, C, *spatial]``), -1 for a linear layer (its ``out_features`` are the
            last dimension, ``[N, C]`` or over every leading position, ``[N, L, C]``,
            ``[N, H, W, C]``).
    """

    layer: str
    module: str
    read_at: str
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    channel_axis: int = 1


class _Tracer(fx.Tracer):
    """fx tracer that keeps prunable layers, BatchNorms, activations and attention blocks
    (icprune's ``PrunedMultiheadAttention`` too) as single calls, also when they are user
    subclasses (fx would otherwise trace into any non-``torch.nn`` class),
    and the modules named in ``leaves`` too. ``entered`` is the stack of submodules being traced
    (qualified names); after a failed trace its last entry is where tracing failed."""

    def __init__(self, leaves: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaves = frozenset(leaves)
        self.entered: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = isinstance(
            m, (*PRUNABLE_TYPES, *BATCHNORM_TYPES, *ACTIVATION_MODULES, *ATTENTION_TYPES)
        )
        leaf = leaf or is_window_attention(m) or module_qualified_name in self.leaves
        return leaf or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        self.entered.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.entered.pop()  # left in place when tracing fails inside this module
        return result


#: What to do about a model fx cannot trace, when scoring.
TRACE_HINT = (
    "Either make the untraceable submodule a leaf (wrap its data-dependent code in a module that "
    "fx does not enter), or pass layers=[...] explicitly together with read_at='output', which "
    "need no trace."
)


def trace(model: nn.Module, leaves: Iterable[str] = (), hint: str = TRACE_HINT) -> fx.Graph:
    """Symbolic ``torch.fx`` trace of ``model`` (no forward pass, the model is not modified).

    Args:
        model: the network.
        leaves: qualified names of submodules traced as single calls (fx does not enter them).
        hint: what the error message tells the user to do when tracing fails.

    Raises:
        ValueError: the model cannot be traced, naming the submodule where tracing failed and
            what to do about it.
    """
    tracer = _Tracer(leaves)
    try:
        return tracer.trace(model)
    except Exception as exc:
        where = f" inside submodule '{tracer.entered[-1]}'" if tracer.entered else ""
        raise ValueError(
            f"icprune could not trace {type(model).__name__} with torch.fx{where} "
            f"({type(exc).__name__}: {exc}). {hint}"
        ) from exc


def _is_prunable_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], PRUNABLE_TYPES)


def output_layers(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[str]:
    """Names of prunable layers whose output reaches the graph's output without passing another
    prunable layer: their output channels are the model's outputs and cannot be pruned."""
    found: set[str] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_prunable_node(node, modules):
            found.add(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return found


def prunable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The prunable layers of ``model``, in ``named_modules()`` order.

    Args:
        model: the network.
        layers: qualified names to select; None selects every Conv1d/2d/3d and Linear module
            except output layers (found by tracing the model, see :func:`output_layers`) and
            layers the model never calls as modules (``nn.MultiheadAttention``'s ``out_proj``,
            whose weight it passes to a function: a hook on it would never see a sample).

    Returns:
        dict qualified name -> module.

    Raises:
        ValueError: a name does not exist, or (layers=None) the model cannot be traced.
        TypeError: a named module is not a supported layer type.
    """
    modules = dict(model.named_modules())
    if layers is None:
        graph = trace(model)
        excluded = output_layers(graph, modules)
        called = {node.target for node in graph.nodes if node.op == "call_module"}
        return {
            name: m
            for name, m in modules.items()
            if isinstance(m, PRUNABLE_TYPES) and name not in excluded and name in called
        }
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
    chosen = list(dict.fromkeys(layers))
    if not chosen:
        raise ValueError("layers is empty; pass None to score every prunable layer")
    # A module registered under several names can be selected by any of them.
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in chosen:
        if name not in modules:
            known = [n for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES)]
            raise ValueError(
                f"layers: {type(model).__name__} has no module named '{name}'; "
                f"prunable layers are: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}"
            )
        if not isinstance(modules[name], PRUNABLE_TYPES):
            raise TypeError(
                f"layers: '{name}' is a {type(modules[name]).__name__}, which icprune cannot "
                f"prune; supported are Conv1d, Conv2d, Conv3d and Linear"
            )
    return {name: modules[name] for name in modules if name in chosen}


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> Callable | None:
    """The elementwise activation computed by ``node`` as a function that leaves its input
    untouched (in-place activations run on a copy), or None if ``node`` is no activation."""
    if node.op == "call_module":
        module = modules[node.target]
        return (lambda t: module(t.clone())) if isinstance(module, ACTIVATION_MODULES) else None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        fn = node.target
    elif node.op == "call_method" and node.target in ACTIVATION_METHODS:
        method = node.target
        fn = lambda t, *args, **kwargs: getattr(t, method)(*args, **kwargs)  # noqa: E731
    else:
        return None
    extra, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in (*extra, *kwargs.values())):
        return None  # parameters computed by the graph itself: not reproducible in a hook
    return lambda t: fn(t.clone(), *extra, **kwargs)


def _sole_user(node: fx.Node) -> fx.Node | None:
    """The only node that consumes ``node``'s output, or None if there are zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def read_points(
    model: nn.Module, layers: dict[str, nn.Module], read_at: str
) -> dict[str, ReadPoint]:
    """Resolve the read point of every layer in ``layers``.

    Args:
        model: the network holding ``layers``.
        layers: dict qualified name -> prunable module (from :func:`prunable_layers`).
        read_at: preferred read point, one of ``"output"``, ``"bn"``, ``"activation"``.

    Returns:
        dict layer name -> :class:`ReadPoint`, in the order of ``layers``.
    """
    if read_at not in READ_POINTS:
        raise ValueError(f"read_at must be one of {READ_POINTS}, got {read_at!r}")
    axes = {name: -1 if isinstance(m, nn.Linear) else 1 for name, m in layers.items()}
    if read_at == "output":
        return {name: ReadPoint(name, name, "output", channel_axis=axes[name]) for name in layers}
    modules = dict(model.named_modules())
    graph = trace(model)
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    points = {}
    for name in layers:
        points[name] = ReadPoint(name, name, "output", channel_axis=axes[name])
        nodes = calls.get(name, [])
        if len(nodes) != 1:  # unused, or called more than once: only its own output is defined
            continue
        node, hooked, activation = nodes[0], name, None
        user = _sole_user(node)
        if (
            user is not None
            and user.op == "call_module"
            and isinstance(modules[user.target], BATCHNORM_TYPES)
            and len(calls[user.target]) == 1
        ):
            node, hooked = user, user.target
            points[name] = ReadPoint(name, hooked, "bn", channel_axis=axes[name])
        if read_at == "activation":
            user = _sole_user(node)
            activation = _activation_of(user, modules) if user is not None else None
            if activation is not None:
                points[name] = ReadPoint(
                    name, hooked, "activation", activation, channel_axis=axes[name]
                )
    return points
