"""Channel slicing: ``weight[out_idx][:, in_idx]`` as one fused gather.

The C++ routine ``icprune._C.slice_channels`` copies the kept rows and columns of a weight in one
pass (no intermediate tensor), with the trailing kernel elements of each (row, column) pair copied
as one contiguous block, on OpenMP threads, with the GIL released. It handles CPU tensors of dtype
float32, float16, bfloat16 and float64 (bits are copied, so the result is bit-identical to torch
indexing). Everything else (other devices and dtypes, weights whose trailing dims cannot be viewed
as one contiguous block, or no compiled extension) takes :func:`slice_channels_ref`, torch's
two-step ``index_select``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from icprune.extension import ext

#: dtypes the C++ gather takes, with the same-width integer dtype their bits are viewed as.
_BITS = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


def slice_channels_ref(weight: Tensor, out_idx: Tensor, in_idx: Tensor | None = None) -> Tensor:
    """Reference: ``weight.index_select(0, out_idx).index_select(1, in_idx)`` (torch, two steps).

    Shapes and arguments as :func:`slice_channels`.
    """
    out = weight.index_select(0, out_idx)
    return out if in_idx is None else out.index_select(1, in_idx)


def _check_index(idx: Tensor, what: str) -> None:
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
        raise TypeError(f"slice_channels: {what} must be a 1-D LongTensor of indices")


def _check_range(idx: Tensor, size: int, what: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise IndexError(
            f"slice_channels: {what} holds indices outside [0, {size}) (min {int(idx.min())}, "
            f"max {int(idx.max())}); negative indices are refused too"
        )


def slice_channels(weight: Tensor, out_idx: Tensor, in_idx: Tensor | None = None) -> Tensor:
    """The rows ``out_idx`` and columns ``in_idx`` of a weight, as a new tensor.

    Args:
        weight: Tensor[O, I, *K] (conv ``(out, in/groups, *kernel)``, linear ``(out, in)``) or
            Tensor[O] (bias, BatchNorm vectors), any dtype and device.
        out_idx: LongTensor[n_out] of row indices in ``[0, O)``, on ``weight``'s device.
        in_idx: LongTensor[n_in] of column indices in ``[0, I)``, or None to keep every column.

    Returns:
        Tensor[n_out, n_in, *K] (Tensor[n_out] for 1-D input), same dtype and device, contiguous,
        not sharing memory with ``weight``, without autograd history; equal bit for bit to
        ``weight[out_idx][:, in_idx]``.

    Raises:
        TypeError: an index is not a 1-D LongTensor.
        IndexError: an index is out of range (negative indices are refused too).
    """
    weight = weight.detach()
    _check_index(out_idx, "out_idx")
    if in_idx is not None:
        if weight.dim() < 2:
            raise ValueError(
                f"slice_channels: in_idx needs a weight with 2+ dims, got {weight.dim()}"
            )
        _check_index(in_idx, "in_idx")
    fused = ext is not None and weight.device.type == "cpu" and weight.dtype in _BITS
    src = None
    if fused and weight.dim() >= 2:
        rows, cols = weight.shape[:2]
        try:  # no copy: the trailing dims must form one contiguous block per (row, column)
            src = weight.view(rows, cols, math.prod(weight.shape[2:]))
        except RuntimeError:
            src = None
        if src is not None and src.shape[2] > 1 and src.stride(2) != 1:
            src = None
    if src is None:
        _check_range(out_idx, weight.shape[0], "out_idx")
        if in_idx is not None:
            _check_range(in_idx, weight.shape[1], "in_idx")
        return slice_channels_ref(weight, out_idx, in_idx)  # index_select: a fresh tensor
    cols_idx = torch.arange(cols) if in_idx is None else in_idx
    out = torch.empty((out_idx.numel(), cols_idx.numel(), *weight.shape[2:]), dtype=weight.dtype)
    bits = _BITS[weight.dtype]
    ext.slice_channels(
        src.view(bits).numpy(),
        out_idx.numpy(),
        cols_idx.numpy(),
        out.view(bits).view(out.shape[0], out.shape[1], src.shape[2]).numpy(),
    )
    return out
