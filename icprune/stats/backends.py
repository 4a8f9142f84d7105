"""Backends that compute the statistics of one batch for :meth:`ChannelStats.update`.

Three implementations of the same batch statistics, all exact in their counts:

- ``"torch"``: :func:`torch_batch`, THE float64 reference (any device, slow on the CPU); the
  kernels' tests compare against it (:func:`icprune.kernels.channel_stats.channel_stats_ref`);
- ``"cpp"``: one OpenMP pass over CPU memory in ``icprune._C`` (csrc/channel_stats.cpp; with
  :func:`cpp_update` the merge into the running statistics too, csrc/merge.cpp), Gram matrix by
  BLAS syrk/gemm blocks on all of torch's threads, with bits independent of the thread count
  (:func:`icprune.stats.gram.gram_syrk`), on the memory as it is;
- ``"triton"``: the fused kernels of :mod:`icprune.kernels.channel_stats`, for CUDA tensors (and
  CPU tensors under ``TRITON_INTERPRET=1``), with no host synchronisation.

Every backend returns a :class:`BatchStats` - each channel's histogram in the bin layout of its
own batch range - which :class:`ChannelStats` rebins exactly into its running layout, as it does
when merging. The C++ extension compiles the binning constants in; it is refused at import when
they differ from :mod:`icprune.stats.binning`'s (:func:`check_compiled_constants`).
``"auto"`` picks Triton for CUDA tensors when Triton is importable, the C++ path for CPU tensors
when it was built, the torch reference otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import numpy as np
import torch

from icprune.extension import HAVE_EXT, LOAD_ERROR, ext
from icprune.stats.binning import INDEX_BITS, K_MIN, MAX_SHIFT, bin_index, bin_layout
from icprune.stats.gram import gram_syrk

BACKENDS = ("auto", "triton", "cpp", "torch")
#: Codes of the input dtypes understood by ``icprune._C.channel_stats``.
_CPP_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
HAVE_TRITON = importlib.util.find_spec("triton") is not None
#: The binning constants the C++ extension compiles in (csrc/channel_stats.h), by name.
BINNING_CONSTANTS = {"K_MIN": K_MIN, "INDEX_BITS": INDEX_BITS, "MAX_SHIFT": MAX_SHIFT}


def check_compiled_constants(compiled: object) -> None:
    """Raise unless ``compiled`` (``icprune._C.BINNING_CONSTANTS``, a dict of name -> int) equals
    :data:`BINNING_CONSTANTS`: the C++ binning would silently disagree with the Python one.

    Raises:
        ImportError: the constants differ or are missing (a stale or mismatched build of
            icprune._C; the message says which and how to rebuild).
    """
    if compiled != BINNING_CONSTANTS:
        raise ImportError(
            f"icprune._C was compiled with the binning constants {compiled!r} but "
            f"icprune.stats.binning has {BINNING_CONSTANTS}; update csrc/channel_stats.h to match "
            f"and rebuild the extension (pip install -e . or make .venv/.icprune-installed)"
        )


if HAVE_EXT:
    check_compiled_constants(getattr(ext, "BINNING_CONSTANTS", None))


class BatchStats(NamedTuple):
    """Statistics of one batch of M samples of C channels, in each channel's own bin layout.

    Attributes:
        counts: Tensor[C, B] int64 histogram of channel c in layout (bin_exponent[c],
            bin_offset[c]).
        bin_exponent, bin_offset: Tensor[C] int64, :func:`icprune.stats.binning.bin_layout` of the
            channel's batch range [minimum, maximum].
        minimum, maximum: Tensor[C] float64 batch extremes (non-finite values read as 0).
        sums: Tensor[C] float64 sum of each channel's samples.
        gram: Tensor[C, C] float64 ``A @ A.T`` of the C x M samples (from a float32 product for
            16/32-bit input on the fast backends, see docs/method.md), exactly symmetric
            (:func:`mirror_upper`); None when the Gram matrix was not asked for.
        nonfinite: number of NaN/Inf values (read as 0 everywhere above): an int, or a 0-d int64
            device tensor (Triton), so that reading it never synchronises with the device.
    """

    counts: torch.Tensor
    bin_exponent: torch.Tensor
    bin_offset: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor
    sums: torch.Tensor
    gram: torch.Tensor
    nonfinite: int | torch.Tensor


def triton_kernels():
    """The module :mod:`icprune.kernels.channel_stats` (imports Triton on first use)."""
    from icprune.kernels import channel_stats as kernels

    return kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(
    backend: str, device: torch.device, name: str = "<unnamed>", dtype: torch.dtype | None = None
) -> str:
    """The backend that computes a batch of ``dtype`` (None: any) on ``device``: ``backend``
    itself when it is available there, the best available one for ``"auto"`` (float64 on CUDA
    goes to torch: the Triton kernels read 16/32-bit floats).

    Raises:
        ValueError: unknown backend name, or a forced backend that cannot run here (the message
            says why and what to do).
    """
    if backend not in BACKENDS:
        raise ValueError(f"layer '{name}': backend must be one of {BACKENDS}, got {backend!r}")
    cuda = device.type == "cuda"
    if backend == "auto":
        if cuda and HAVE_TRITON and dtype != torch.float64:
            return "triton"
        if device.type == "cpu" and HAVE_EXT:
            return "cpp"
        return "torch"
    if backend == "cpp":
        if not HAVE_EXT:
            raise ValueError(
                f"layer '{name}': backend='cpp' but the C++ extension icprune._C is not available "
                f"({LOAD_ERROR}); reinstall icprune with a C++17 compiler, or use backend='auto'"
            )
        if device.type != "cpu":
            raise ValueError(
                f"layer '{name}': backend='cpp' reads CPU memory but the statistics are on "
                f"{device}; use backend='auto' (Triton on CUDA) or keep the statistics on the CPU"
            )
    if backend == "triton":
        if not HAVE_TRITON:
            raise ValueError(
                f"layer '{name}': backend='triton' but Triton is not installed; "
                f"pip install 'icprune[triton]', or use backend='auto'"
            )
        if dtype == torch.float64:
            raise ValueError(
                f"layer '{name}': backend='triton' reads float16/bfloat16/float32 feature maps, "
                f"got float64; use backend='torch' (or 'auto') for float64"
            )
        if not cuda and not _interpreting():
            raise ValueError(
                f"layer '{name}': backend='triton' runs on CUDA tensors, the statistics are on "
                f"{device}; set TRITON_INTERPRET=1 before importing icprune to run the kernels "
                f"on the CPU (slow, for testing), or use backend='auto'"
            )
    return backend


def mirror_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Tensor[C, C] whose lower triangle is the upper triangle of ``matrix`` mirrored (a bit copy;
    the upper triangle and diagonal are ``matrix``'s own).

    Every Gram matrix icprune keeps passes through this: a BLAS ``A @ A.T`` need not be
    bit-symmetric (MKL's is not on AVX-512 CPUs), and the estimators promise symmetric results.
    """
    c = matrix.shape[-1]
    index = torch.arange(c, device=matrix.device)
    return torch.where(index[:, None] <= index[None, :], matrix, matrix.T)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """Tensor[N, C, S] view of Tensor[N, C, *spatial] (a view for contiguous and channels_last
    memory; S = 1 for Tensor[N, C])."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def gram_matrix(x3: torch.Tensor, maxabs: float) -> torch.Tensor:
    """``A @ A.T`` of the C x (N*S) samples of a CPU Tensor[N, C, S] as Tensor[C, C] float64
    (:func:`icprune.stats.gram.gram_syrk`, scale undone, exactly symmetric: its upper triangle
    mirrored)."""
    g, two_e = gram_syrk(x3, maxabs)
    gram = torch.from_numpy(g).to(torch.float64)
    if two_e:
        gram = torch.ldexp(gram, torch.tensor(float(two_e), dtype=torch.float64))
    return mirror_upper(gram)


def as_samples(x: torch.Tensor) -> torch.Tensor:
    """The samples of Tensor[N, C, *spatial] (or Tensor[N, C]) as Tensor[M, C] float64, M = N *
    prod(spatial): a view for channels_last float64 tensors, one copy otherwise."""
    return x.to(torch.float64).movedim(1, -1).reshape(-1, x.shape[1])


def torch_batch(x: torch.Tensor, bins: int, gram: bool = True) -> BatchStats:
    """THE reference statistics of one batch, in float64 torch on ``x``'s device.

    Every other backend must reproduce it: exactly in counts, layouts, extremes and non-finite
    counts, within the documented tolerance (docs/method.md) in sums and Gram.

    Args:
        x: Tensor[N, C, *spatial] (or Tensor[N, C]) of a floating dtype, at least one element.
        bins: number of histogram bins B >= 2.
        gram: compute the Gram matrix (else ``gram`` is None).

    Returns:
        :class:`BatchStats` on ``x.device``: non-finite values are read as 0 everywhere and
        counted in ``nonfinite`` (an int); each channel is binned in the layout of its own range.
    """
    samples = as_samples(x)
    finite = torch.isfinite(samples)
    nonfinite = 0 if bool(finite.all()) else int((~finite).sum())
    if nonfinite:
        samples = torch.where(finite, samples, torch.zeros_like(samples))
    lo, hi = samples.amin(0), samples.amax(0)
    bin_exponent, bin_offset = bin_layout(lo, hi, bins)
    c = samples.shape[1]
    index = bin_index(samples, bin_exponent) - bin_offset
    flat = index + torch.arange(c, device=samples.device) * bins
    counts = torch.bincount(flat.flatten(), minlength=c * bins).view(c, bins)
    return BatchStats(
        counts=counts,
        bin_exponent=bin_exponent,
        bin_offset=bin_offset,
        minimum=lo,
        maximum=hi,
        sums=samples.sum(0),
        gram=mirror_upper(samples.T @ samples) if gram else None,
        nonfinite=nonfinite,
    )


def cpp_batch(x: torch.Tensor, bins: int, gram: bool = True) -> BatchStats:
    """Batch statistics of a CPU Tensor[N, C, *spatial] (float16/bfloat16/float32/float64, any
    strides) by ``icprune._C.channel_stats`` and BLAS blocks (:func:`gram_matrix`; None without
    ``gram``); the tensor is read in place through numpy."""
    x3 = _as_3d(x)
    out = ext.channel_stats(_numpy_view(x3), _CPP_DTYPES[x3.dtype], bins)
    nonfinite = int(out.pop("nonfinite"))
    batch = {key: torch.from_numpy(value) for key, value in out.items()}
    matrix = None
    if gram:
        maxabs = float(max(-batch["minimum"].min(), batch["maximum"].max()))
        matrix = gram_matrix(torch.nan_to_num(x3, 0.0, 0.0, 0.0) if nonfinite else x3, maxabs)
    return BatchStats(**batch, gram=matrix, nonfinite=nonfinite)


def _numpy_view(x3: torch.Tensor) -> np.ndarray:
    """ndarray view of a CPU Tensor[N, C, S] for ``icprune._C`` (bfloat16 as its int16 bits)."""
    return (x3.view(torch.int16) if x3.dtype == torch.bfloat16 else x3).numpy()


def cpp_update(
    x: torch.Tensor,
    running: dict[str, torch.Tensor],
    *,
    channel_range: bool,
    histogram: bool,
    commit_nonfinite: bool,
) -> tuple[int, float]:
    """Add a CPU Tensor[N, C, *spatial] (16/32/64-bit floats, any strides) into running
    statistics in place, in one call of ``icprune._C.update_stats``: the batch pass, extremes,
    layout, both exact rebins and the compensated sums (no Gram matrix).

    Args:
        x: the batch.
        running: CPU contiguous tensors updated in place: ``counts`` int64[C, B],
            ``bin_exponent``/``bin_offset`` int64[C], ``minimum``/``maximum``/``sums``/
            ``sums_lo`` float64[C].
        channel_range: range_mode ``"channel"`` (else one layout for the layer).
        histogram: keep histograms (else counts are left as they are).
        commit_nonfinite: add a batch holding NaN/Inf (read as 0); if False such a batch changes
            nothing.

    Returns:
        (nonfinite, maxabs): number of NaN/Inf values, largest magnitude of the batch.
    """
    x3 = _as_3d(x)
    r = running
    nonfinite, maxabs = ext.update_stats(
        _numpy_view(x3),
        _CPP_DTYPES[x3.dtype],
        channel_range,
        histogram,
        commit_nonfinite,
        *(r[k].numpy() for k in RUNNING_KEYS),
    )
    return int(nonfinite), float(maxabs)


#: The running statistics :func:`cpp_update` updates, in its argument order.
RUNNING_KEYS = ("counts", "bin_exponent", "bin_offset", "minimum", "maximum", "sums", "sums_lo")


def cpp_merge(
    running: dict[str, torch.Tensor],
    batch: BatchStats,
    sums_lo: torch.Tensor | None,
    *,
    channel_range: bool,
    histogram: bool,
) -> None:
    """Add ``batch`` (counts in its own layouts; CPU contiguous tensors; ``sums_lo`` the
    remainder of its sums, or None) into ``running`` (as :func:`cpp_update`) in one call of
    ``icprune._C.merge_stats``: the same results as the torch code of ``ChannelStats._add``."""
    parts = (batch.counts, batch.bin_exponent, batch.bin_offset, batch.minimum, batch.maximum)
    ext.merge_stats(
        channel_range,
        histogram,
        *(running[k].numpy() for k in RUNNING_KEYS),
        *(t.contiguous().numpy() for t in (*parts, batch.sums)),
        None if sums_lo is None else sums_lo.contiguous().numpy(),
    )


def triton_batch(x: torch.Tensor, bins: int, gram: bool = True) -> BatchStats:
    """Batch statistics of Tensor[N, C, *spatial] by the Triton kernels (see
    :func:`icprune.kernels.channel_stats.channel_stats`, which returns a BatchStats); nothing
    synchronises with the host."""
    return triton_kernels().channel_stats(_as_3d(x), bins, gram)


BATCH_FUNCTIONS = {"torch": torch_batch, "cpp": cpp_batch, "triton": triton_batch}
