"""Multi-process calibration: combine per-rank :class:`ChannelStats` over ``torch.distributed``.

Each process calibrates its shard of the data; :func:`all_reduce_stats` then gives every process
the statistics of all the data, bit-identical to one process calibrating every batch (see the
exactness conditions of :class:`ChannelStats`): histogram counts are rebinned to a common layout
and summed as integers, and the compensated sums and Gram matrices of all ranks are combined in
rank order, the same way on every rank. Any backend works (gloo for CPU statistics, NCCL for
CUDA ones): the collectives run on tensors on the statistics' device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from icprune.stats.channel_stats import ChannelStats
from icprune.stats.compensated import add_


def check_initialized() -> None:
    """Raise a RuntimeError saying what to do unless a default process group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "all_reduce_stats needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group(...) on every process first (e.g. launch with "
            "torchrun), or use the statistics of this process as they are"
        )


def _signature(stats: Mapping[str, ChannelStats]) -> list[tuple]:
    return [
        (name, s.num_channels, s.bins, s.range_mode, s.read_at, s.parts)
        for name, s in stats.items()
    ]


def _agree(stats: Mapping[str, ChannelStats], group) -> None:
    """Raise the same error on every rank unless all ranks hold the same layers and settings and
    none found non-finite values it must report (pending device counts are read here)."""
    problem = None
    try:
        for s in stats.values():
            s.sync()
    except ValueError as exc:
        problem = str(exc)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (_signature(stats), problem), group=group)
    for rank, (_, error) in enumerate(gathered):
        if error is not None:
            raise ValueError(f"all_reduce_stats: rank {rank} failed: {error}")
    reference = dict((row[0], row) for row in gathered[0][0])
    for rank, (signature, _) in enumerate(gathered[1:], start=1):
        mine = dict((row[0], row) for row in signature)
        for name in [*reference, *(n for n in mine if n not in reference)]:
            if reference.get(name) != mine.get(name):
                raise ValueError(
                    f"all_reduce_stats: layer '{name}' differs between rank 0 and rank {rank}: "
                    f"(name, channels, bins, range_mode, read_at, parts) = "
                    f"{reference.get(name)} vs {mine.get(name)} (None: layer missing); calibrate "
                    f"the same layers with the same settings on every rank"
                )
        if list(mine) != list(reference):
            raise ValueError(
                f"all_reduce_stats: rank {rank} holds the layers in another order than rank 0; "
                f"pass the statistics in the same order on every rank"
            )


def all_reduce_stats(
    stats: Mapping[str, ChannelStats], group: dist.ProcessGroup | None = None
) -> dict[str, ChannelStats]:
    """Statistics of the data of all processes of ``group``, on every process.

    A collective: every rank of ``group`` must call it, with statistics of the same layers (same
    names, order, channels, bins, range mode and read point), e.g. each from
    :func:`icprune.calibrate` on its own shard of the batches. The result equals what one process
    calibrating all the batches gets, bit for bit - counts, extremes, bin layouts, ``count``,
    ``nonfinite``, ``sums``, ``gram`` and hence scores - within the exactness conditions of
    :class:`ChannelStats` (in particular, each batch must be computed whole by one rank, with the
    same backend everywhere).

    Steps: the ranks exchange a signature of their layers (``all_gather_object``) and any
    non-finite error found on the device; all-reduce MIN/MAX of the per-channel extremes; every
    rank rebins its counts to the common layout and the counts are summed (int64); the
    compensated sums and Gram matrices are gathered and added in rank order.

    Args:
        stats: dict layer name -> :class:`ChannelStats` of this process (not modified); the
            tensors are exchanged on their device, so use CPU statistics with gloo and CUDA ones
            (on this rank's device) with NCCL.
        group: process group (default: the world).

    Returns:
        dict layer name -> new :class:`ChannelStats` over the data of all ranks, same order, on
        the same devices and with the same backends as ``stats``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: ``stats`` is not a mapping of :class:`ChannelStats`.
        ValueError: the ranks hold different layers or settings (naming the layer and rank), or a
            rank found non-finite values under ``nan_policy="raise"`` (every rank raises).
    """
    check_initialized()
    layers_ok = isinstance(stats, Mapping) and all(
        isinstance(s, ChannelStats) for s in stats.values()
    )
    if not layers_ok:
        raise TypeError(
            "all_reduce_stats: stats must be a dict layer name -> ChannelStats (e.g. from "
            f"icprune.calibrate), got {type(stats).__name__}"
        )
    _agree(stats, group)
    reduced = {
        name: ChannelStats.from_state_dict(s.state_dict(), device=s.device, backend=s.backend)
        for name, s in stats.items()
    }
    if not reduced:
        return reduced
    layers = list(reduced.values())
    device = layers[0].device
    # Extremes: one MIN and one MAX over all layers' channels (moved to one device for the call).
    lo = torch.cat([s.minimum.to(device) for s in layers])
    hi = torch.cat([s.maximum.to(device) for s in layers])
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    start = 0
    for s in layers:
        c = s.num_channels
        s.widen_range(lo[start : start + c].to(s.device), hi[start : start + c].to(s.device))
        start += c
    # Counts, sample count and non-finite count: exact integer sums.
    ints = torch.cat(
        [s.counts.flatten().to(device) for s in layers]
        + [torch.tensor([s.count, s.nonfinite], dtype=torch.int64, device=device) for s in layers]
    )
    dist.all_reduce(ints, op=dist.ReduceOp.SUM, group=group)
    start = 0
    for s in layers:
        size = s.counts.numel()
        s.counts = ints[start : start + size].view_as(s.counts).to(s.device).clone()
        start += size
    for i, s in enumerate(layers):
        s.count, s.nonfinite = (int(v) for v in ints[start + 2 * i : start + 2 * i + 2])
    # Compensated sums and Gram: gather every rank's (hi, lo) parts, add them in rank order.
    world = dist.get_world_size(group)
    for s in layers:
        parts = torch.cat([s.sums, s.gram_packed, s.sums_lo, s.gram_packed_lo])
        gathered = [torch.empty_like(parts) for _ in range(world)]
        dist.all_gather(gathered, parts, group=group)
        total_hi = torch.zeros_like(parts[: parts.numel() // 2])
        total_lo = torch.zeros_like(total_hi)
        for rank_parts in gathered:
            part_hi, part_lo = rank_parts.chunk(2)
            add_(total_hi, total_lo, part_hi.contiguous(), part_lo.contiguous())
        c = s.num_channels
        s.sums, s.gram_packed = total_hi[:c].clone(), total_hi[c:].clone()
        s.sums_lo, s.gram_packed_lo = total_lo[:c].clone(), total_lo[c:].clone()
    return reduced
