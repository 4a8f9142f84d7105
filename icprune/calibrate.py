"""Calibration: stream a model's feature maps into per-layer :class:`ChannelStats`.

Forward hooks read each prunable layer's feature map at its read point (see
:mod:`icprune.structure.graph`) and add it to that layer's statistics; no feature map is kept. The
model runs in eval mode without gradients, and its mode, parameters and buffers are left exactly as
they were.

Calibration can checkpoint its statistics to a file every few batches and resume from it after
an interruption, and can combine the statistics of several processes (``distributed=True``, see
:mod:`icprune.stats.distributed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from itertools import chain

import torch
from torch import nn

from icprune.attention import multihead_context, window_context
from icprune.batches import batch_input, iter_batches, model_device, progress_bar
from icprune.config import CalibrationConfig, StatsConfig, with_options
from icprune.files import exclusive, load_torch_file, save_atomically
from icprune.input_gram import InputGram, derive_all, input_gram_layers
from icprune.modes import frozen
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.distributed import all_reduce_stats, check_initialized
from icprune.structure.dependency import trace_dependencies
from icprune.structure.graph import ReadPoint, prunable_layers, read_points, trace
from icprune.structure.layers import groups as groups_of
from icprune.structure.layers import in_channels, is_window_attention, out_channels

#: Format tag and version of calibration checkpoint files.
CHECKPOINT_FORMAT = "icprune.calibration"
CHECKPOINT_VERSION = 2
#: Values of each batch input (and model tensor) that enter a fingerprint, evenly spaced.
FINGERPRINT_VALUES = 4096


def _fingerprint(digest, x: torch.Tensor) -> None:
    """Feed the dtype, shape and up to :data:`FINGERPRINT_VALUES` evenly spaced values of ``x``
    into the hashlib ``digest`` (cheap: a strided read, whatever the size of ``x``)."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_VALUES)
    sample = flat[::step][:FINGERPRINT_VALUES].to("cpu", torch.float64)
    digest.update(repr((str(x.dtype), tuple(x.shape))).encode())
    digest.update(sample.numpy().tobytes())


def _settings(model: nn.Module, stats: dict[str, ChannelStats], **options) -> dict[str, object]:
    """What a checkpoint must match to be resumed: the options, the layers and a fingerprint of
    the model's parameters and buffers (plain Python values only)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        _fingerprint(digest, value)
    layers = {name: [s.num_channels, s.read_at] for name, s in stats.items()}
    return {**options, "layers": layers, "model": digest.hexdigest()}


def _save_checkpoint(
    path: str,
    settings: dict,
    stats: dict[str, ChannelStats],
    inputs: dict[str, InputGram],
    done: int,
    digest,
):
    """Write the statistics (and the input statistics of the layers whose Gram matrix is derived
    from them) after ``done`` batches to ``path`` atomically (tmp file + rename)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "settings": settings,
        "batches": done,
        "data": digest.hexdigest(),
        "stats": {name: s.state_dict() for name, s in stats.items()},
        "inputs": {name: g.state_dict() for name, g in inputs.items()},
    }
    save_atomically(state, path)


def _load_checkpoint(path: str, settings: dict) -> dict:
    """The checkpoint at ``path``, checked against ``settings`` (a clear error if it differs)."""
    again = "delete it or pass another checkpoint path to start over"
    try:
        state = load_torch_file(path, "calibration checkpoint", map_location="cpu")
    except ValueError as exc:
        raise ValueError(f"{exc}; {again}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path!r} is not an icprune calibration checkpoint; pass another path"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {path!r} has version {state.get('version')!r}, this icprune writes "
            f"version {CHECKPOINT_VERSION}; {again}"
        )
    missing = [k for k in ("settings", "batches", "data", "stats", "inputs") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks the key(s) {missing} (damaged); {again}")
    batches, saved = state["batches"], state["settings"]
    ok = isinstance(batches, int) and not isinstance(batches, bool) and batches >= 0
    if not ok or not isinstance(saved, dict) or not isinstance(state["data"], str):
        raise ValueError(
            f"checkpoint {path!r} holds a bad 'batches', 'settings' or 'data' entry (damaged); "
            f"{again}"
        )
    for key in ("stats", "inputs"):
        if not isinstance(state[key], dict):
            raise ValueError(f"checkpoint {path!r}: '{key}' must be a dict (damaged); {again}")
    for key in [*settings, *(k for k in saved if k not in settings)]:  # options, layers, model
        mine, theirs = settings.get(key), saved.get(key)
        if mine == theirs:
            continue
        if key == "layers" and isinstance(theirs, dict):
            name = next(n for n in [*theirs, *mine] if theirs.get(n) != mine.get(n))
            key = f"layers (first: '{name}')"
            mine, theirs = mine.get(name), theirs.get(name)
        what = "the model's parameters or buffers" if key == "model" else key
        raise ValueError(
            f"checkpoint {path!r} was written with other settings: {what} differ (checkpoint: "
            f"{theirs!r}, now: {mine!r}); delete the file or pass another checkpoint path to "
            f"start over"
        )
    return state


def _resume(
    path: str | None,
    settings: dict | None,
    stats: dict[str, ChannelStats],
    inputs: dict[str, InputGram],
    batches: Iterator,
    max_batches: int | None,
):
    """Load the checkpoint at ``path`` into ``stats`` and ``inputs`` if it exists
    and draw the batches it holds from ``batches``, checking their fingerprint. Returns (batches
    done, running data digest)."""
    digest = hashlib.sha256()
    if path is None or not os.path.exists(path):
        return 0, digest
    state = _load_checkpoint(path, settings)
    done = int(state["batches"])
    if max_batches is not None and done > max_batches:
        raise ValueError(
            f"checkpoint {path!r} holds {done} batches, more than max_batches={max_batches}; "
            f"raise max_batches, or delete the file or pass another path to start over"
        )
    targets = [("stats", "statistics", name, layer) for name, layer in stats.items()]
    targets += [("inputs", "input Gram statistics", name, g) for name, g in inputs.items()]
    for key, what, name, layer in targets:
        saved = state[key].get(name)
        if saved is None:
            raise ValueError(
                f"checkpoint {path!r} holds no {what} for layer '{name}' (damaged); delete it "
                f"or pass another checkpoint path to start over"
            )
        try:
            layer.load_state_dict(saved)
        except ValueError as exc:
            raise ValueError(
                f"checkpoint {path!r}: {exc}; delete it or pass another checkpoint path to start "
                f"over"
            ) from None
    end = object()
    for drawn in range(done):
        batch = next(batches, end)
        if batch is end:
            raise ValueError(
                f"checkpoint {path!r} holds {done} batches but data yielded only {drawn}; pass "
                f"the same data as the interrupted run, or delete the file to start over"
            )
        _fingerprint(digest, batch_input(batch))
    if digest.hexdigest() != state["data"]:
        raise ValueError(
            f"checkpoint {path!r}: data does not yield the same first {done} batches as the run "
            f"that wrote it; resuming needs the same batches in the same order (no shuffling, "
            f"or a seeded one) - or delete the file to start over"
        )
    return done, digest


def _global_sum(value: int, device: torch.device) -> int:
    """Sum of an int over the processes of the default group."""
    total = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return int(total)


def _hook(point: ReadPoint, stats: ChannelStats):
    """Forward hook adding the read point's feature map to ``stats``. A linear layer's map
    ``[N, *leading, C]`` (tokens, channels-last maps) is given to the statistics as the view
    ``[N, C, *leading]``, so every leading position is a sample."""
    axis = point.channel_axis

    def hook(_module, _inputs, output):
        feature = output if point.activation is None else point.activation(output)
        if feature.dim() > 2 and axis % feature.dim() != 1:
            feature = feature.movedim(axis, 1)
        stats.update(feature.detach())

    return hook


def calibrate(
    model: nn.Module,
    data: Iterable,
    *,
    layers: Iterable[str] | None = None,
    **options,
) -> dict[str, ChannelStats]:
    """Collect the channel statistics of every prunable layer over calibration data.

    Args:
        model: the network; not modified (mode, parameters and buffers are restored bit for bit).
        data: iterable of batches, each a Tensor ``[N, ...]`` model input or a tuple/list whose
            first element is the input (e.g. a DataLoader yielding ``(images, labels)``).
        layers: qualified module names to calibrate; None = every Conv/Linear layer except the
            output layers (see :func:`icprune.structure.graph.prunable_layers`).
        **options: the settings, as configs or field by field (a field overrides the config's
            value): ``stats_config=`` - how the statistics are kept
            (:class:`icprune.StatsConfig`: ``bins``, ``range_mode``, ``nan_policy``,
            ``backend``); ``calibration_config=`` - how the data is run
            (:class:`icprune.CalibrationConfig`: ``read_at``, ``max_batches``, ``device``,
            ``progress``, ``checkpoint``, ``checkpoint_every``, ``distributed``,
            ``gram_from_input``). E.g.
            ``calibrate(model, data, bins=32, read_at="output")``. ``read_at="input"``: what
            every consumer layer of a dependency group reads - the statistics the default
            criterion scores from and repair re-fits from, one pass for both
            (:func:`calibrate_inputs`; returns :class:`InputStats` keyed by consumer, and takes
            no ``layers``, ``checkpoint`` or ``distributed``).

    Returns:
        dict qualified layer name -> :class:`ChannelStats` over all samples of all batches
        (``count = sum(N * H * W)``), in ``named_modules()`` order.

    Raises:
        ValueError: unknown layer names, untraceable model (see
            :func:`icprune.structure.graph.trace`), ``data`` yielding no batch or only empty ones,
            non-finite feature maps (``nan_policy="raise"``), a checkpoint that cannot be read
            (damaged, truncated, holding Python objects other than tensors and plain values, or
            failing the checks of :meth:`ChannelStats.load_state_dict`) or written with other
            settings, another model or other data, or holding more batches than ``max_batches``;
            ``checkpoint_every`` not an int >= 1.
        TypeError: ``data`` not iterable, a single Tensor (pass a list of batches), or
            yielding something other than Tensors/tuples; an unknown keyword option or a config
            of the wrong class.
        FileNotFoundError: the folder of ``checkpoint`` does not exist.
        RuntimeError: ``distributed=True`` without an initialised process group, or another
            process calibrating into the same ``checkpoint``.
    """
    stats_config, calibration_config = with_options(
        "calibrate", options, StatsConfig, CalibrationConfig
    )
    if calibration_config.read_at == "input":
        if layers is not None:
            raise ValueError(
                "read_at='input' reads every consumer of a prunable group in one pass and takes "
                "no layers=; drop it (or read at 'bn')"
            )
        return calibrate_inputs(
            model, data, stats_config=stats_config, calibration_config=calibration_config
        )
    checkpoint_every, distributed = (
        calibration_config.checkpoint_every,
        calibration_config.distributed,
    )
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if distributed:
        check_initialized()
    selected = prunable_layers(model, layers)
    if not selected:
        raise ValueError(f"{type(model).__name__} has no prunable (Conv/Linear) layer to calibrate")
    points = read_points(model, selected, calibration_config.read_at)
    dev = model_device(model, calibration_config.device)
    batches = iter_batches(data, calibration_config.max_batches)
    inputs = (
        input_gram_layers(model, points, stats_config, dev)
        if calibration_config.gram_from_input
        else {}
    )
    own_parts = tuple(p for p in stats_config.parts if p != "gram")
    stats = {
        name: ChannelStats(
            out_channels(module),
            **dataclasses.asdict(stats_config) | ({"parts": own_parts} if name in inputs else {}),
            name=name,
            read_at=points[name].read_at,
            device=dev,
        )
        for name, module in selected.items()
    }
    modules = dict(model.named_modules())
    path = (
        None if calibration_config.checkpoint is None else os.fspath(calibration_config.checkpoint)
    )
    settings = None
    if path is not None:
        written = {
            "bins": stats_config.bins,
            "range_mode": stats_config.range_mode,
            "read_at": calibration_config.read_at,
        }
        written |= {"nan_policy": stats_config.nan_policy, "backend": stats_config.backend}
        written |= {
            "parts": list(stats_config.parts),
            "gram_from_input": calibration_config.gram_from_input,
        }
        settings = _settings(model, stats, **written)
    with ExitStack() as stack:
        if path is not None:  # one writer per checkpoint file
            stack.enter_context(exclusive(path, "calibration checkpoint"))
        seen, digest = _resume(
            path, settings, stats, inputs, batches, calibration_config.max_batches
        )
        saved = seen
        handles = []
        try:
            with frozen(model):
                for point in points.values():
                    hook = _hook(point, stats[point.layer])
                    if point.layer in inputs:
                        handles += inputs[point.layer].attach(hook)
                    else:
                        handles.append(modules[point.module].register_forward_hook(hook))
                bar = progress_bar(
                    batches,
                    data,
                    calibration_config.max_batches,
                    "calibrate",
                    calibration_config.progress,
                    initial=seen,
                )
                for batch in bar:
                    x = batch_input(batch)
                    if path is not None:
                        _fingerprint(digest, x)
                    model(x.to(dev))
                    seen += 1
                    if path is not None and seen % checkpoint_every == 0:
                        _save_checkpoint(path, settings, stats, inputs, seen, digest)
                        saved = seen
        finally:
            for handle in handles:
                handle.remove()
        if path is not None and seen != saved:  # batches run since the last write
            _save_checkpoint(path, settings, stats, inputs, seen, digest)
    if distributed:  # every rank raises alike, or none does
        if _global_sum(seen, dev) == 0:
            raise ValueError("data yielded no batches on any process; pass model inputs")
        stats = all_reduce_stats(stats)
        for name, value in all_reduce_stats({n: g.stats for n, g in inputs.items()}).items():
            inputs[name].stats = value  # the total decides (every rank has the same)
        small = {n: g.direct for n, g in inputs.items() if g.stats.count <= g.break_even}
        for name, value in all_reduce_stats(small).items():
            inputs[name].direct = value
    elif seen == 0:
        raise ValueError("data yielded no batches; pass at least one batch of model inputs")
    for layer in stats.values():
        layer.sync()  # one host synchronisation per layer, after all batches
    _check_samples(stats)
    derive_all(inputs, stats)
    return stats


def _check_samples(stats: dict[str, ChannelStats]) -> None:
    """Raise if the batches held no sample at all (every batch empty)."""
    if all(layer.count == 0 for layer in stats.values()):
        raise ValueError(
            "data yielded only empty batches (no sample reached any layer); pass batches with "
            "at least one sample"
        )


class InputStats(dict):
    """What every consumer layer reads, from one calibration pass (``read_at="input"``).

    A dict consumer name -> :class:`ChannelStats` over the consumer's ``C_in`` input channels
    (``read_at == "input"``): every conv and linear layer whose input channels follow a
    dependency group, read after the activation, the pooling and the residual add - exactly what
    it multiplies by its weights. Consumers that read the same tensor (e.g. a ResNet block's
    first conv and its downsample conv) share one :class:`ChannelStats` object: it is computed
    once. Scoring (:mod:`icprune.criteria`) and repair (:mod:`icprune.recovery.repair`) both use
    it; see docs/quality.md.

    Attributes:
        spatial: consumer name -> spatial shape of its input, e.g. ``(H, W)`` (``()`` for a
            linear layer), as last seen; repair needs it for the tap coverage under padding.
        example: zeros of the shape of the model input the dependency groups were traced on
            (Tensor[1, ...]), so that scoring from these statistics needs no ``example_inputs``.
    """

    def __init__(
        self,
        stats: dict[str, ChannelStats],
        spatial: dict[str, tuple[int, ...]],
        example: torch.Tensor | None = None,
    ):
        super().__init__(stats)
        self.spatial = dict(spatial)
        self.example = example


#: What the consumer criteria and repair read of the consumers' inputs: means and covariances
#: (sums and Gram matrices), no histograms (``ChannelStats(parts=...)``).
CONSUMER_PARTS = ("gram",)


def attention_readers(groups: Iterable) -> dict[str, str]:
    """The output projection of every attention block whose heads are a group: consumer name
    -> attention block name. Such a projection is never called as a module; what it reads -
    every head's attention output, ``head_dim`` features per head - is recomputed from the
    block's own call (:func:`icprune.attention.multihead_context`,
    :func:`icprune.attention.window_context`)."""
    readers = {}
    for group in groups:
        heads = [d.module for d in group.dependencies if d.kind == "heads"]
        for dep in group.dependencies if heads else ():
            if dep.kind == "input":
                readers[dep.module] = heads[0]
    return readers


#: The signature of :func:`icprune.attention.multihead_context`, to bind a hooked call's
#: arguments as ``nn.MultiheadAttention.forward`` takes them.
_MULTIHEAD = inspect.signature(multihead_context)


def input_layers(model: nn.Module, groups: Iterable) -> dict[str, str]:
    """The consumers whose inputs :func:`calibrate_inputs` reads, and who reads for them.

    Args:
        model: the network.
        groups: its :class:`icprune.Group` list (:func:`icprune.dependency_groups`).

    Returns:
        dict consumer name -> name of the consumer whose input it shares (itself when it is the
        first to read that tensor), in the order the groups name them. A consumer that reads a
        group flattened (``Dependency.repeat > 1``, e.g. a linear layer on a flattened feature
        map: its Gram would be ``(C*H*W)^2``), a grouped conv (each output reads only its group's
        channels, which one covariance of all inputs does not describe), or a layer called more
        than once per forward, is left out; scoring and repair treat it as documented in
        :mod:`icprune.criteria` and :mod:`icprune.recovery.repair`. An attention block's output
        projection (:func:`attention_readers`) is read, from the block's call.
    """
    modules = dict(model.named_modules())
    groups = list(groups)
    projections = attention_readers(groups)
    flattened = {
        d.module
        for g in groups
        for d in g.dependencies
        if d.kind == "input"
        and d.module not in projections
        and (d.repeat != 1 or groups_of(modules[d.module]) > 1)
    }
    names = [
        d.module
        for g in groups
        for d in g.dependencies
        if d.kind == "input" and d.module not in flattened
    ]
    names = list(dict.fromkeys(names))
    graph = trace(model)
    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    owner: dict[str, str] = {}
    first_reader: dict[object, str] = {}
    for name in names:
        if name in projections:
            owner[name] = name
            continue
        nodes = calls.get(name, [])
        if len(nodes) != 1 or not nodes[0].args:
            continue
        source = nodes[0].args[0]
        owner[name] = first_reader.setdefault(source, name)
    return owner


def calibrate_inputs(
    model: nn.Module,
    data: Iterable,
    *,
    example_inputs: torch.Tensor | None = None,
    ignored_layers: Iterable[str] = (),
    **options,
) -> InputStats:
    """Statistics of what every consumer layer of a dependency group reads (see
    :class:`InputStats`): forward pre-hooks (an attention block's output projection: a forward
    hook on the block, :func:`attention_readers`), one :class:`ChannelStats` per distinct input
    tensor, one pass in eval mode without gradients (the model is left as it was).

    Args:
        model: the unpruned network.
        data: iterable of batches (Tensors ``[N, ...]`` or ``(input, target)`` tuples).
        example_inputs: input for the dependency trace (shapes only); default: the first sample
            of the first batch.
        ignored_layers: as :func:`icprune.dependency_groups`.
        **options: ``stats_config=`` / ``calibration_config=`` or their fields, as
            :func:`calibrate` (``backend="torch"``: float64 Gram matrices); ``read_at`` is
            ``"input"`` here, and ``checkpoint`` and ``distributed`` are not supported.

    Returns:
        :class:`InputStats` (``count = sum(N * H * W)`` per consumer).

    Raises:
        ValueError: ``data`` yields no batch, the model is untraceable or has no consumer of a
            prunable group, non-finite inputs (``nan_policy="raise"``), or as
            :func:`icprune.dependency_groups`.
        TypeError: ``data`` is not an iterable of batches.
    """
    stats_config, calibration_config = with_options(
        "calibrate_inputs", options, StatsConfig, CalibrationConfig
    )
    config = calibration_config
    unsupported = [
        k for k, on in (("checkpoint", config.checkpoint is not None),
                        ("distributed", config.distributed)) if on
    ]  # fmt: skip
    if unsupported or config.read_at not in ("input", "bn"):
        what = unsupported or [f"read_at={config.read_at!r}"]
        raise ValueError(
            f"read_at='input' calibration does not support {', '.join(what)}; drop it (the "
            f"consumers' inputs are read in one pass)"
        )
    max_batches = config.max_batches
    batches = iter_batches(data, max_batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("data yielded no batches; pass at least one batch of model inputs")
    batches = chain([first], batches)
    if example_inputs is None:
        example_inputs = batch_input(first)[:1]
    groups = trace_dependencies(model, example_inputs, ignored_layers=ignored_layers).groups
    owner = input_layers(model, groups)
    if not owner:
        raise ValueError(
            f"{type(model).__name__} has no conv/linear layer that reads a prunable group's "
            f"channels; there is nothing to calibrate at read_at='input'"
        )
    modules = dict(model.named_modules())
    dev = model_device(model, config.device)
    readers = {
        name: ChannelStats(
            in_channels(modules[name]),
            bins=stats_config.bins,
            range_mode=stats_config.range_mode,
            nan_policy=stats_config.nan_policy,
            name=name,
            read_at="input",
            device=dev,
            backend=stats_config.backend,
            parts=stats_config.parts,
        )
        for name in dict.fromkeys(owner.values())
    }
    spatial: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        linear = isinstance(modules[name], nn.Linear)

        def read(_module, inputs):
            x = inputs[0].detach()
            if linear and x.dim() > 2:  # [N, *leading, C] (tokens): every position a sample
                x = x.movedim(-1, 1)
            readers[name].update(x)
            spatial[name] = () if linear else tuple(x.shape[2:])

        return read

    def context_hook(name: str):
        window = is_window_attention(modules[projections[name]])

        def read(module, args, kwargs, _output):
            if window:
                context = window_context(module, *args, **kwargs)[0]
            else:
                bound = _MULTIHEAD.bind(module, *args, **kwargs)
                bound.arguments["need_weights"] = False  # the weights are not read
                context = multihead_context(*bound.args, **bound.kwargs)[0]
            readers[name].update(context.detach().reshape(-1, context.shape[-1]))
            spatial[name] = ()

        return read

    projections = attention_readers(groups)
    handles = [
        modules[projections[name]].register_forward_hook(context_hook(name), with_kwargs=True)
        if name in projections
        else modules[name].register_forward_pre_hook(hook(name))
        for name in readers
    ]
    seen = 0
    try:
        with frozen(model):
            bar = progress_bar(batches, data, max_batches, "calibrate inputs", config.progress)
            for batch in bar:
                model(batch_input(batch).to(dev))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    for stats in readers.values():
        stats.sync()
    _check_samples(readers)
    return InputStats(
        {name: readers[reader] for name, reader in owner.items()},
        {name: spatial[reader] for name, reader in owner.items()},
        torch.zeros_like(example_inputs),
    )
