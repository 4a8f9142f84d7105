"""Cost accounting: multiply-accumulates (MACs) and parameter counts of a model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from icprune.modes import frozen

__all__ = ["as_inputs", "count", "count_params", "counting"]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (the CPU kernel of
    ``F.scaled_dot_product_attention``, which FlopCounterMode does not know): the two batched
    matmuls ``Q K^T`` and ``A V``, as FlopCounterMode counts them on the other devices."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextlib.contextmanager
def counting() -> Iterator[FlopCounterMode]:
    """A ``FlopCounterMode`` (no display) that counts every matmul of attention too.

    Two things would otherwise hide attention's MACs: the CPU kernel of
    ``F.scaled_dot_product_attention`` has no FLOP formula in torch (one is given: ``Q K^T``
    and ``A V``), and ``nn.MultiheadAttention``'s inference fast path
    (``torch._native_multi_head_attention``) runs as one uncounted kernel (it is switched off
    inside the context, then restored). Used by :func:`count` and the dependency trace, so the
    plan's analytic MACs and the count of the pruned model agree.

    Yields:
        the counter; read ``get_total_flops()`` after the block.
    """
    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops
        },
    )
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_params(model: nn.Module) -> int:
    """Number of scalar parameters in ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def as_inputs(example_inputs: Tensor | Sequence[Tensor], caller: str) -> tuple[Tensor, ...]:
    """The positional arguments of ``model(*example_inputs)``: ``(example_inputs,)`` for one
    Tensor, the Tensors themselves for a tuple or list of them.

    Args:
        example_inputs: a Tensor (e.g. Tensor[N, 3, H, W] float images) or a tuple/list of
            Tensors.
        caller: the function taking them, for the message (e.g. ``"count()"``).

    Raises:
        TypeError: anything else (the message names ``caller``).
    """
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(
        isinstance(t, Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise TypeError(
        f"{caller}: `example_inputs` must be a Tensor or a tuple/list of Tensors passed to "
        "model(*example_inputs), e.g. torch.randn(1, 3, 224, 224) (use device='meta' for a "
        f"free shape-only count); got {type(example_inputs).__name__}"
    )


def count(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> tuple[int, int]:
    """Count MACs of one forward pass and the parameters of ``model``.

    MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (total FLOPs // 2, see
    :func:`counting`), which counts convolutions and matrix multiplies only (attention's
    ``Q K^T`` and ``A V`` included); BN, activations, softmax, pooling and additions are free.
    The forward runs under ``frozen(model)`` (eval mode, no grad), so BN running statistics
    and every module's ``training`` flag are left exactly as they were. Meta
    tensors work (model and inputs on ``torch.device("meta")``) and cost nothing.

    Args:
        model: the network to measure.
        example_inputs: Tensor (e.g. Tensor[N, 3, H, W] float images) or tuple/list of
            Tensors, passed as ``model(*example_inputs)``. MACs scale with the batch size N.

    Returns:
        ``(macs, params)``: multiply-accumulates for the whole batch (int, count) and the
        number of scalar parameters (int, count).

    Raises:
        TypeError: if ``example_inputs`` is not a Tensor or a tuple/list of Tensors.
    """
    args = as_inputs(example_inputs, "count()")
    with frozen(model), counting() as counter:
        model(*args)
    return counter.get_total_flops() // 2, count_params(model)
