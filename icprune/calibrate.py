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

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack

import torch
from torch import nn

from icprune.batches import batch_input, iter_batches, model_device, progress_bar
from icprune.files import exclusive, load_torch_file, save_atomically
from icprune.modes import frozen
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.distributed import all_reduce_stats, check_initialized
from icprune.structure.graph import ReadPoint, prunable_layers, read_points
from icprune.structure.layers import out_channels

#: Format tag and version of calibration checkpoint files.
CHECKPOINT_FORMAT = "icprune.calibration"
CHECKPOINT_VERSION = 1
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


def _save_checkpoint(path: str, settings: dict, stats: dict[str, ChannelStats], done: int, digest):
    """Write the statistics after ``done`` batches to ``path`` atomically (tmp file + rename)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "settings": settings,
        "batches": done,
        "data": digest.hexdigest(),
        "stats": {name: s.state_dict() for name, s in stats.items()},
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
    missing = [k for k in ("settings", "batches", "data", "stats") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks the key(s) {missing} (damaged); {again}")
    batches, saved = state["batches"], state["settings"]
    ok = isinstance(batches, int) and not isinstance(batches, bool) and batches >= 0
    if not ok or not isinstance(saved, dict) or not isinstance(state["data"], str):
        raise ValueError(
            f"checkpoint {path!r} holds a bad 'batches', 'settings' or 'data' entry (damaged); "
            f"{again}"
        )
    if not isinstance(state["stats"], dict):
        raise ValueError(f"checkpoint {path!r}: 'stats' must be a dict (damaged); {again}")
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
    batches: Iterator,
    max_batches: int | None,
):
    """Load the checkpoint at ``path`` into ``stats`` if it exists and draw the batches it holds
    from ``batches``, checking their fingerprint. Returns (batches done, running data digest)."""
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
    for name, layer in stats.items():
        saved = state["stats"].get(name)
        if saved is None:
            raise ValueError(
                f"checkpoint {path!r} holds no statistics for layer '{name}' (damaged); delete it "
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
    def hook(_module, _inputs, output):
        feature = output if point.activation is None else point.activation(output)
        stats.update(feature.detach())

    return hook


def calibrate(
    model: nn.Module,
    data: Iterable,
    *,
    layers: Iterable[str] | None = None,
    bins: int = 64,
    range_mode: str = "layer",
    read_at: str = "bn",
    nan_policy: str = "raise",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    backend: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    distributed: bool = False,
) -> dict[str, ChannelStats]:
    """Collect the channel statistics of every prunable layer over calibration data.

    Args:
        model: the network; not modified (mode, parameters and buffers are restored bit for bit).
        data: iterable of batches, each a Tensor ``[N, ...]`` model input or a tuple/list whose
            first element is the input (e.g. a DataLoader yielding ``(images, labels)``).
        layers: qualified module names to calibrate; None = every Conv/Linear layer except the
            output layers (see :func:`icprune.structure.graph.prunable_layers`).
        bins: histogram bins per channel (see :class:`ChannelStats`).
        range_mode: ``"layer"`` or ``"channel"`` histogram range (see :class:`ChannelStats`).
        read_at: where a layer's feature map is read: ``"output"`` (the conv/linear output),
            ``"bn"`` (the BatchNorm that directly follows it) or ``"activation"`` (after the
            activation that follows that); the point actually used per layer, which can be an
            earlier one where the requested one does not exist, is stored in ``stats.read_at``.
            ``"output"`` needs no fx trace.
        nan_policy: ``"raise"`` or ``"zero"`` for NaN/Inf in a feature map (see
            :class:`ChannelStats`).
        max_batches: stop after this many batches (None: the whole of ``data``).
        device: device to run on; batches are moved there. Default: the model's device. The model
            itself is never moved.
        progress: show a tqdm progress bar (only on a terminal).
        backend: who computes each batch's statistics (see :class:`ChannelStats`): ``"auto"``
            (Triton on CUDA, the C++ extension on the CPU, else torch), ``"triton"``, ``"cpp"``
            or ``"torch"``. On CUDA no layer synchronises with the host per batch; non-finite
            values found on the device are reported once, at the end.
        checkpoint: file to make calibration resumable (None: no checkpoint). Every
            ``checkpoint_every`` batches, and at the end, the statistics, the number of batches
            done, the settings and fingerprints of the model and of the data seen are written to
            it atomically (a temporary file in the same folder renamed over it, so an
            interrupted write leaves the previous checkpoint; read back with
            ``torch.load(weights_only=True)``, and every value is validated). While calibration
            runs it holds an advisory lock, ``PATH.lock`` (removed at the end; released by the
            system if the process dies; none on Windows), so a second calibration into the same
            file fails at once instead of overwriting it. If the file exists when calibration
            starts, it
            resumes: the statistics are loaded and the batches already done are drawn from
            ``data`` but not run through the model, so ``data`` must yield the same batches in
            the same order (no shuffling, or a seeded one) - checked by the fingerprint (shape,
            dtype and 4096 evenly spaced values of every batch input). The result is bit-identical
            to an uninterrupted run. The file is kept after success, holding the final
            statistics: a rerun returns them without running the model (delete the file to
            start over). With ``distributed=True`` each process needs its own file (it holds
            that process's statistics).
        checkpoint_every: batches between checkpoint writes (an int >= 1; used with
            ``checkpoint``).
        distributed: combine the statistics of all processes of the default
            ``torch.distributed`` process group
            (:func:`icprune.stats.distributed.all_reduce_stats`): every process calls ``calibrate``
            with its own shard of the batches (a shard may be empty) and gets the statistics of all
            of them, identical on every process and equal to one process calibrating every batch. An
            error on one process (e.g. a non-finite feature map raised during its forward) leaves
            the others waiting until the process group's timeout.

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
            yielding something other than Tensors/tuples.
        FileNotFoundError: the folder of ``checkpoint`` does not exist.
        RuntimeError: ``distributed=True`` without an initialised process group, or another
            process calibrating into the same ``checkpoint``.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if distributed:
        check_initialized()
    selected = prunable_layers(model, layers)
    if not selected:
        raise ValueError(f"{type(model).__name__} has no prunable (Conv/Linear) layer to calibrate")
    points = read_points(model, selected, read_at)
    dev = model_device(model, device)
    stats = {
        name: ChannelStats(
            out_channels(module),
            bins=bins,
            range_mode=range_mode,
            nan_policy=nan_policy,
            name=name,
            read_at=points[name].read_at,
            device=dev,
            backend=backend,
        )
        for name, module in selected.items()
    }
    modules = dict(model.named_modules())
    batches = iter_batches(data, max_batches)
    path = None if checkpoint is None else os.fspath(checkpoint)
    settings = None
    if path is not None:
        options = {"bins": bins, "range_mode": range_mode, "read_at": read_at}
        options |= {"nan_policy": nan_policy, "backend": backend}
        settings = _settings(model, stats, **options)
    with ExitStack() as stack:
        if path is not None:  # one writer per checkpoint file
            stack.enter_context(exclusive(path, "calibration checkpoint"))
        seen, digest = _resume(path, settings, stats, batches, max_batches)
        saved = seen
        handles = []
        try:
            with frozen(model):
                for point in points.values():
                    hook = _hook(point, stats[point.layer])
                    handles.append(modules[point.module].register_forward_hook(hook))
                bar = progress_bar(batches, data, max_batches, "calibrate", progress, initial=seen)
                for batch in bar:
                    x = batch_input(batch)
                    if path is not None:
                        _fingerprint(digest, x)
                    model(x.to(dev))
                    seen += 1
                    if path is not None and seen % checkpoint_every == 0:
                        _save_checkpoint(path, settings, stats, seen, digest)
                        saved = seen
        finally:
            for handle in handles:
                handle.remove()
        if path is not None and seen != saved:  # batches run since the last write
            _save_checkpoint(path, settings, stats, seen, digest)
    if distributed:  # every rank raises alike, or none does
        if _global_sum(seen, dev) == 0:
            raise ValueError("data yielded no batches on any process; pass model inputs")
        reduced = all_reduce_stats(stats)
        _check_samples(reduced)
        return reduced
    if seen == 0:
        raise ValueError("data yielded no batches; pass at least one batch of model inputs")
    for layer in stats.values():
        layer.sync()  # one host synchronisation per layer, after all batches
    _check_samples(stats)
    return stats


def _check_samples(stats: dict[str, ChannelStats]) -> None:
    """Raise if the batches held no sample at all (every batch empty)."""
    if all(layer.count == 0 for layer in stats.values()):
        raise ValueError(
            "data yielded only empty batches (no sample reached any layer); pass batches with "
            "at least one sample"
        )
