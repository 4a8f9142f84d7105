"""Streaming, mergeable per-channel statistics of one layer: the reference semantics.

:class:`ChannelStats` holds the sufficient statistics from which icprune computes information
capacity (histogram entropy) and information independence (correlation or distance between
channels). They are additive, so they stream over calibration batches and merge across instances,
processes and devices; the exact definitions are in ``docs/method.md``.

Every backend (:mod:`icprune.stats.backends`: the float64 torch reference
:func:`~icprune.stats.backends.torch_batch`, C++, Triton) computes a batch's statistics in the
batch's own bin layout, which ``update`` then adds exactly, as :meth:`ChannelStats.merge` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import torch

from icprune.extension import HAVE_EXT
from icprune.stats import packed
from icprune.stats.backends import (
    BATCH_FUNCTIONS,
    RUNNING_KEYS,
    BatchStats,
    as_samples,
    cpp_merge,
    cpp_update,
    resolve_backend,
)
from icprune.stats.binning import K_MIN, bin_layout, rebin
from icprune.stats.compensated import add_
from icprune.stats.gram import gram_syrk

RANGE_MODES = ("layer", "channel")
NAN_POLICIES = ("raise", "zero")
#: Where samples can come from (``read_at``): feature-map read points, the weights, or unknown.
READ_AT = ("output", "bn", "activation", "input", "weights", None)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Most histogram bins per channel (more bins than that only add sampling noise to the entropy,
#: and C * bins int64 counters must fit in memory).
MAX_BINS = 2**16
#: The optional parts of the statistics (``parts``): per-channel histograms (for capacity,
#: :meth:`ChannelStats.entropy`) and the Gram matrix (for independence, correlation and distance).
#: Counts, sums and extremes are always kept.
PARTS = ("histogram", "gram")
#: The tensors of :meth:`ChannelStats.state_dict`, in a fixed order.
STATE_TENSORS = (
    "sums",
    "gram",
    "sums_lo",
    "gram_lo",
    "counts",
    "minimum",
    "maximum",
    "bin_exponent",
    "bin_offset",
)
#: Bump when the meaning or layout of :meth:`ChannelStats.state_dict` changes. Version 3 stores
#: the Gram matrix and its remainder as packed triangles and names the ``parts`` kept; version 2
#: (full C x C matrices, both parts) is still read.
STATE_VERSION = 3
#: Versions :meth:`ChannelStats.load_state_dict` reads.
READABLE_VERSIONS = (2, 3)
#: Every key of :meth:`ChannelStats.state_dict`.
STATE_KEYS = (
    "version",
    "name",
    "num_channels",
    "bins",
    "range_mode",
    "nan_policy",
    "read_at",
    "count",
    "nonfinite",
    "parts",
    *STATE_TENSORS,
)
#: dtype of every tensor of :meth:`ChannelStats.state_dict`.
_STATE_DTYPES = {
    "sums": torch.float64,
    "gram": torch.float64,
    "sums_lo": torch.float64,
    "gram_lo": torch.float64,
    "counts": torch.int64,
    "minimum": torch.float64,
    "maximum": torch.float64,
    "bin_exponent": torch.int64,
    "bin_offset": torch.int64,
}
#: Saved Gram matrices may be asymmetric by this much (relative to their largest entry): the
#: round-off of a BLAS product that was not bit-symmetric (files written before icprune kept one
#: triangle). Anything larger is refused as corrupt.
GRAM_ASYMMETRY = 1e-5


def _is_int(value: object) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _initial_state(
    c: int, bins: int, p: int, device: torch.device | str | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors of empty statistics of C channels, B bins and a packed Gram of P entries on
    ``device``: float64 ``[sums, sums_lo, minimum, maximum, gram_packed, gram_packed_lo]``
    (zeros but for the extremes, +inf and -inf) and int64 ``[counts (C x B), bin_exponent
    (K_MIN), bin_offset]``, each its own contiguous tensor. On the CPU they are slices of two
    numpy buffers (small layers pay two allocations, not nine; no two tensors overlap) whose
    zeros come from ``calloc``, so the packed totals of a large net are not written here (see
    :func:`icprune.stats.packed.zeros`)."""
    if torch.device("cpu" if device is None else device).type != "cpu":
        f64 = {"dtype": torch.float64, "device": device}
        i64 = {"dtype": torch.int64, "device": device}
        floats = [
            torch.zeros(c, **f64),
            torch.zeros(c, **f64),
            torch.full((c,), float("inf"), **f64),
            torch.full((c,), float("-inf"), **f64),
            packed.zeros(p, device),
            packed.zeros(p, device),
        ]
        ints = [torch.zeros(c, bins, **i64), torch.full((c,), K_MIN, **i64), torch.zeros(c, **i64)]
        return floats, ints
    f = np.zeros(4 * c + 2 * p)
    f[2 * c : 3 * c] = np.inf
    f[3 * c : 4 * c] = -np.inf
    cb = c * bins
    i = np.zeros(cb + 2 * c, dtype=np.int64)
    i[cb : cb + c] = K_MIN
    edges = (0, c, 2 * c, 3 * c, 4 * c, 4 * c + p, 4 * c + 2 * p)
    floats = [torch.from_numpy(f[a:b]) for a, b in itertools.pairwise(edges)]
    ints = [torch.from_numpy(i[:cb].reshape(c, bins))]
    ints += [torch.from_numpy(i[cb : cb + c]), torch.from_numpy(i[cb + c :])]
    return floats, ints


def checked_parts(parts: object, where: str) -> tuple[str, ...]:
    """``parts`` (an iterable of names from :data:`PARTS`) as a tuple in :data:`PARTS` order.

    Raises:
        ValueError: not a tuple/list of known, distinct names (``where`` starts the message).
    """
    names = list(parts) if isinstance(parts, (tuple, list)) else None
    if names is None or any(p not in PARTS for p in names) or len(set(names)) != len(names):
        raise ValueError(
            f"{where} must be a tuple of distinct names from {PARTS} (e.g. ('gram',)), got "
            f"{parts!r}"
        )
    return tuple(p for p in PARTS if p in names)


class ChannelStats:
    """Sufficient statistics of the C channels of one layer, accumulated over samples.

    A *sample* of channel ``c`` is one value of its feature map: an input tensor of shape
    ``(N, C, *spatial)`` contributes ``M = N * prod(spatial)`` samples to every channel. Kept:

    - ``count``: int, number of samples M seen so far (per channel, the same for all);
    - ``sums``: Tensor[C] float64, per-channel sum of the samples;
    - ``gram``: Tensor[C, C] float64, ``A @ A.T`` for the C x M matrix A of all samples (a
      property built on each access): kept as one packed triangle, ``gram_packed``
      (Tensor[C (C + 1) / 2] float64, :mod:`icprune.stats.packed`), so it is exactly symmetric by
      construction (every term added and every loaded matrix contributes its upper triangle only,
      whatever the BLAS computed); ``sums`` and ``gram`` are float64 totals; ``sums_lo`` and
      ``gram_packed_lo`` (same shapes; ``gram_lo`` unpacked) hold their compensation terms, the
      remainders that make ``sums + sums_lo`` the exact total (see below);
    - ``counts``: Tensor[C, bins] int64 histogram, binned exactly (see :mod:`icprune.stats.binning`)
      over a range shared by the layer (``range_mode="layer"``) or per channel (``"channel"``);
    - ``minimum``/``maximum``: Tensor[C] float64, per-channel extremes (they fix the bin layout);
    - ``nonfinite``: int, number of NaN/Inf values replaced by 0 under ``nan_policy="zero"``.

    The result never depends on how the batches are distributed over ``update`` calls, merged
    instances or processes (:func:`icprune.stats.distributed.all_reduce_stats`): histogram counts,
    extremes and bin layouts are bit-identical always. ``sums`` and ``gram`` are double-double
    totals (:mod:`icprune.stats.compensated`): each batch's float64 contribution is added without
    rounding, so the stored value is the exact total of the batch contributions, correctly
    rounded, and bit-identical for any grouping and order of the batches. Limits: (1) this holds
    while an entry's batch contributions span fewer than about 105 binary orders of magnitude,
    from the lowest set bit of any of them to the sum of their magnitudes (float32 Gram entries
    of the fast backends may then differ by a factor up to ~1e24, float64 ones of the torch
    reference by ~1e15); beyond, the total is accurate to ~1e-31 relative but its last bit may
    depend on the grouping; (2) a batch's own contribution is a matrix product that rounds, so
    cutting the same samples into *different* batches changes ``gram`` and ``sums`` within fp64
    (or fp32, fast backends) round-off. No feature map is kept. The faster backends compute the
    per-batch Gram matrix in float32 (documented in docs/method.md): it matches the float64
    reference within 1e-5 of its largest entry.

    Without the ``"histogram"`` part, ``counts`` stay zero and :meth:`entropy` raises; without
    ``"gram"``, ``gram_packed`` is empty and :meth:`correlation`, :meth:`distance` and ``gram``
    raise. Skipping a part skips its cost (the Gram matrix is most of calibration's).

    Args:
        num_channels: C, the number of channels (>= 1).
        bins: B, the number of histogram bins (2 to :data:`MAX_BINS`). Bins have power-of-two
            widths, so the data of a channel (or layer) occupies between about B/2 and B of
            them.
        range_mode: ``"layer"`` - one bin layout shared by all channels, so entropy reflects a
            channel's dynamic range as well as its shape; ``"channel"`` - each channel binned over
            its own range (scale-free entropy, up to the factor-of-two granularity of the widths).
        nan_policy: ``"raise"`` - a NaN/Inf value raises ``ValueError`` naming the layer;
            ``"zero"`` - non-finite values are replaced by 0 and counted in ``nonfinite``.
        name: layer name used in error messages (e.g. ``"layer1.0.conv1"``).
        read_at: where the samples come from, kept as metadata (and used in error messages):
            ``"output"``, ``"bn"`` or ``"activation"`` for feature maps (see
            :mod:`icprune.structure.graph`), ``"input"`` for what a consumer layer reads (its
            input), ``"weights"`` for the data-free statistics of a layer's weights, None if
        unspecified. device: device holding the statistics (default CPU); updates must come from it.
        backend: how a batch is computed (see :mod:`icprune.stats.backends`): ``"auto"`` (Triton for
            CUDA tensors, the C++ extension for CPU tensors, else torch), or one of ``"triton"``,
            ``"cpp"``, ``"torch"`` (the float64 reference) to force it. On CUDA (Triton) nothing
            synchronises with the host: non-finite values are counted on the device and, with
            ``nan_policy="raise"``, reported when the statistics are next read.
        parts: which optional statistics to keep, a subset of :data:`PARTS` (default both):
            ``("histogram",)`` for capacity only, ``("gram",)`` for independence only (and for
            a repair step that needs the second moments), ``()`` for counts, sums and extremes.

    Raises:
        ValueError: a bad setting (the message names the argument and the allowed values), or a
            backend that cannot run on ``device``.
    """

    def __init__(
        self,
        num_channels: int,
        bins: int = 64,
        range_mode: str = "layer",
        nan_policy: str = "raise",
        name: str = "<unnamed>",
        read_at: str | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        parts: tuple[str, ...] | list[str] = PARTS,
    ) -> None:
        if not _is_int(num_channels) or num_channels < 1:
            raise ValueError(
                f"layer '{name}': num_channels must be an int >= 1, got {num_channels!r}"
            )
        if not _is_int(bins) or not 2 <= bins <= MAX_BINS:
            raise ValueError(
                f"layer '{name}': bins must be an int in [2, {MAX_BINS}], got {bins!r}"
            )
        if range_mode not in RANGE_MODES:
            raise ValueError(
                f"layer '{name}': range_mode must be one of {RANGE_MODES}, got {range_mode!r}"
            )
        if nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"layer '{name}': nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}"
            )
        if read_at not in READ_AT:
            raise ValueError(f"layer '{name}': read_at must be one of {READ_AT}, got {read_at!r}")
        self.parts = checked_parts(parts, f"layer '{name}': parts")
        self.num_channels = num_channels
        self.bins = bins
        self.range_mode = range_mode
        self.nan_policy = nan_policy
        self.name = name
        self.read_at = read_at
        self.backend = backend
        c = num_channels
        self.count = 0
        self._nonfinite = 0
        # Non-finite values counted on the device by the Triton backend, not yet read back.
        self._pending_nonfinite: torch.Tensor | None = None
        p = packed.packed_size(c) if "gram" in self.parts else 0
        # sums, sums_lo, minimum, maximum, gram_packed, gram_packed_lo; counts, bin_exponent,
        # bin_offset. Compensation terms: sums + sums_lo and gram_packed + gram_packed_lo are
        # the exact totals. An empty range has extremes (+inf, -inf) and the layout bin_layout
        # gives it: the finest bins, anchored at 0.
        f64, i64 = _initial_state(c, bins, p, device)
        self.sums, self.sums_lo, self.minimum, self.maximum = f64[:4]
        self.gram_packed, self.gram_packed_lo = f64[4:]
        self.counts, self.bin_exponent, self.bin_offset = i64
        resolve_backend(backend, self.device, name)  # fail early on an unavailable backend

    def __repr__(self) -> str:
        return (
            f"ChannelStats(name={self.name!r}, num_channels={self.num_channels}, bins={self.bins}, "
            f"range_mode={self.range_mode!r}, read_at={self.read_at!r}, parts={self.parts!r}, "
            f"count={self.count})"
        )

    @property
    def nonfinite(self) -> int:
        """Number of NaN/Inf values replaced by 0 (``nan_policy="zero"``); reading it waits for
        pending device updates."""
        self.sync()
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: int) -> None:
        self._nonfinite = value

    @property
    def device(self) -> torch.device:
        """Device holding the statistics."""
        return self.sums.device

    @property
    def gram(self) -> torch.Tensor:
        """Tensor[C, C] float64, the Gram matrix ``A @ A.T`` of all samples (the rounded total),
        exactly symmetric: a new tensor unpacked from ``gram_packed`` on each access.

        Raises:
            ValueError: the statistics were collected without the ``"gram"`` part."""
        self._require_part("gram", "the Gram matrix")
        return packed.unpack(self.gram_packed, self.num_channels)

    @property
    def gram_lo(self) -> torch.Tensor:
        """Tensor[C, C] float64, the remainder of ``gram`` (``gram + gram_lo`` is the exact
        total), unpacked from ``gram_packed_lo`` on each access.

        Raises:
            ValueError: the statistics were collected without the ``"gram"`` part."""
        self._require_part("gram", "the Gram matrix")
        return packed.unpack(self.gram_packed_lo, self.num_channels)

    def _require_part(self, part: str, what: str) -> None:
        """Raise unless ``part`` (one of :data:`PARTS`) was collected."""
        if part not in self.parts:
            raise ValueError(
                f"layer '{self.name}': {what} needs the '{part}' statistics, but they were "
                f"collected with parts={self.parts!r}; recollect with '{part}' in parts "
                f"(e.g. calibrate(..., parts={PARTS!r}))"
            )

    # ----------------------------------------------------------------------------- accumulation

    def update(self, x: torch.Tensor) -> None:
        """Add the samples of one batch.

        Args:
            x: Tensor[N, C, *spatial] (or Tensor[N, C] for linear layers) of dtype float16,
                bfloat16, float32 or float64, any memory layout (contiguous, channels_last).
                A tensor with no elements is a no-op.

        Raises:
            TypeError: ``x`` is not a dense floating-point tensor of a supported dtype (int,
                bool and complex tensors are refused, not cast).
            ValueError: wrong rank or channel count, data on another device, non-finite values
                with ``nan_policy="raise"``, or float64 values so large that the sums of
                squares overflow float64 (above about 1e154). A refused batch adds nothing.
        """
        self._check(x)
        if x.numel() == 0:
            return
        x = x.detach()  # statistics never take part in autograd
        backend = resolve_backend(self.backend, self.device, self.name, x.dtype)
        if backend == "cpp" and x.dtype != torch.float64 and self._fused():
            self._update_cpp(x)
            return
        # Everything that can raise comes first: a refused batch adds nothing.
        batch = BATCH_FUNCTIONS[backend](x, self.bins, "gram" in self.parts)
        bad = 0
        if not isinstance(batch.nonfinite, torch.Tensor) and batch.nonfinite:
            _, bad = self._finite(self._as_samples(x))  # raises, naming the channels
        if x.dtype == torch.float64:  # 16/32-bit data cannot overflow the float64 totals
            self._check_range(batch.sums, batch.gram)
        self._nonfinite += bad
        if isinstance(batch.nonfinite, torch.Tensor):  # on the device: read back later
            pending = self._pending_nonfinite
            self._pending_nonfinite = (
                batch.nonfinite if pending is None else pending + batch.nonfinite
            )
        self._add(batch, x.numel() // self.num_channels)

    def _update_cpp(self, x: torch.Tensor) -> None:
        """``update`` of a 16/32-bit CPU batch: one C++ call for histograms, extremes, sums and
        their merge (:func:`icprune.stats.backends.cpp_update`), one blocked BLAS product
        (:func:`icprune.stats.gram.gram_syrk`) whose upper
        triangle is added into the packed total in one pass. A batch with NaN/Inf under
        ``nan_policy="raise"`` changes nothing (the C++ call leaves the state as it was)."""
        zero = self.nan_policy == "zero"
        bad, maxabs = cpp_update(
            x,
            self._running(),
            channel_range=self.range_mode == "channel",
            histogram="histogram" in self.parts,
            commit_nonfinite=zero,
        )
        if bad and not zero:
            self._finite(self._as_samples(x))  # raises, naming the channels
        self._nonfinite += bad
        self.count += x.numel() // self.num_channels
        if "gram" in self.parts:
            x3 = x.reshape(x.shape[0], self.num_channels, -1)
            g, two_e = gram_syrk(torch.nan_to_num(x3, 0.0, 0.0, 0.0) if bad else x3, maxabs)
            packed.add_upper_(self.gram_packed, self.gram_packed_lo, g, two_e)

    def _running(self) -> dict[str, torch.Tensor]:
        """The running-statistics tensors the C++ routines update in place, by name."""
        return {key: getattr(self, key) for key in RUNNING_KEYS}

    def _fused(self) -> bool:
        """True when the C++ routines can update the statistics in place (CPU, extension built,
        contiguous tensors)."""
        return HAVE_EXT and all(t.is_cpu and t.is_contiguous() for t in self._running().values())

    def _check_range(self, sums: torch.Tensor, gram: torch.Tensor | None) -> None:
        """Raise unless a batch's sums and Gram matrix, added to the totals, stay finite."""
        total = (self.sums.abs() + sums.abs()).sum() + self.gram_packed.abs().sum()
        if gram is not None:
            total = total + gram.abs().sum()
        if not bool(torch.isfinite(total)):
            raise ValueError(
                f"layer '{self.name}': the sums of squares of the {self._what} overflow "
                f"float64 (the square of a value above ~1e154 already does), so its statistics "
                f"cannot be kept; rescale the data (nothing of this batch was added)"
            )

    @property
    def _what(self) -> str:
        """What the samples are, for messages: ``"weights"`` or ``"feature map"``."""
        return "weights" if self.read_at == "weights" else "feature map"

    def _check(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is a Tensor[N, C, *spatial] of a supported dtype on our device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer '{self.name}': expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"layer '{self.name}': {self._what} has dtype {x.dtype}; supported are "
                f"float16, bfloat16, float32 and float64 - cast it first (e.g. x.float())"
            )
        if x.layout != torch.strided:
            raise TypeError(
                f"layer '{self.name}': {self._what} is a {x.layout} tensor; pass a dense one "
                f"(x.to_dense())"
            )
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"layer '{self.name}': expected a tensor of shape "
                f"(N, {self.num_channels}, *spatial), got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(
                f"layer '{self.name}': {self._what} is on {x.device} but the statistics are on "
                f"{self.device}; create ChannelStats(device=...) on the data's device"
            )

    def _as_samples(self, x: torch.Tensor) -> torch.Tensor:
        """Validate ``x`` and return its samples as Tensor[M, C] float64."""
        self._check(x)
        return as_samples(x)

    def _finite(self, samples: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``samples`` with non-finite values replaced by 0 and how many there were; raises
        instead under ``nan_policy="raise"``. Changes nothing in ``self``."""
        finite = torch.isfinite(samples)
        if bool(finite.all()):
            return samples, 0
        bad = int((~finite).sum())
        if self.nan_policy == "raise":
            channels = torch.nonzero((~finite).any(0)).flatten()[:8].tolist()
            if self.read_at == "weights":
                raise ValueError(
                    f"weights of layer '{self.name}' hold {bad} non-finite value(s) (NaN/Inf), "
                    f"first in output channel(s) {channels}. Check the model's parameters (a "
                    f"diverged training or a corrupt checkpoint?), or pass nan_policy='zero' to "
                    f"count them and score them as zeros."
                )
            raise ValueError(
                f"layer '{self.name}': feature map holds {bad} non-finite value(s) (NaN/Inf), "
                f"first in channel(s) {channels}. Check the model and its input, or pass "
                f"nan_policy='zero' to count them and score them as zeros."
            )
        return torch.where(finite, samples, torch.zeros_like(samples)), bad

    def _layout_for(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin_exponent, bin_offset) Tensor[C] int64: the bin layout for per-channel extremes
        lo/hi (Tensor[C] float64 each)."""
        if self.range_mode == "layer":
            c = self.num_channels
            exponent, offset = bin_layout(lo.min().reshape(1), hi.max().reshape(1), self.bins)
            return exponent.expand(c).clone(), offset.expand(c).clone()
        return bin_layout(lo, hi, self.bins)

    def widen_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Widen the range of every channel to include [lo, hi], moving the histogram to the bin
        layout of the wider range exactly (neighbouring bins merge; no count changes; statistics
        without the ``"histogram"`` part only update extremes and layout).

        Used to bring several instances to one layout before their counts are summed
        (:func:`icprune.stats.distributed.all_reduce_stats`). A range already wider stays.

        Args:
            lo, hi: Tensor[C] float64 per-channel extremes on this instance's device.
        """
        lo, hi = torch.minimum(self.minimum, lo), torch.maximum(self.maximum, hi)
        exponent, offset = self._layout_for(lo, hi)
        if "histogram" in self.parts:
            self.counts = rebin(self.counts, self.bin_exponent, self.bin_offset, exponent, offset)
        self.bin_exponent, self.bin_offset = exponent, offset
        self.minimum, self.maximum = lo, hi

    def _add(
        self,
        batch: BatchStats,
        count: int,
        sums_lo: torch.Tensor | None = None,
        gram_packed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add the statistics of ``count`` samples, given in their own bin layout, exactly
        (``sums_lo``: compensation term of ``batch.sums``, if any). The Gram term is
        ``batch.gram``'s upper triangle (so the total stays exactly symmetric whoever computed
        it), or, when merging, ``gram_packed``: another packed total ``(hi, lo)``."""
        histogram = "histogram" in self.parts
        if batch.counts.device.type == "cpu" and self._fused():
            cpp_merge(
                self._running(),
                batch,
                sums_lo,
                channel_range=self.range_mode == "channel",
                histogram=histogram,
            )
        else:
            self.widen_range(batch.minimum, batch.maximum)
            if histogram:
                self.counts += rebin(
                    batch.counts,
                    batch.bin_exponent,
                    batch.bin_offset,
                    self.bin_exponent,
                    self.bin_offset,
                )
            add_(self.sums, self.sums_lo, batch.sums, sums_lo)
        self.count += count
        if "gram" not in self.parts:
            return
        if gram_packed is not None:
            add_(self.gram_packed, self.gram_packed_lo, *gram_packed)
        else:
            packed.add_upper_(self.gram_packed, self.gram_packed_lo, batch.gram)

    def sync(self) -> None:
        """Read back the non-finite values counted on the device by Triton updates (one host
        synchronisation; a no-op when there are none) and apply ``nan_policy`` to them.

        Called by every estimator, :meth:`merge`, :meth:`state_dict`, the ``nonfinite`` property
        and :func:`icprune.calibrate`.

        Raises:
            ValueError: ``nan_policy="raise"`` and some update held NaN/Inf (read as 0 there).
        """
        pending, self._pending_nonfinite = self._pending_nonfinite, None
        if pending is None:
            return
        bad = int(pending)
        if bad and self.nan_policy == "raise":
            raise ValueError(
                f"layer '{self.name}': feature maps held {bad} non-finite value(s) (NaN/Inf), "
                f"found on the device after the update (they were read as 0). Check the model "
                f"and its input, or pass nan_policy='zero' to count them and score them as zeros."
            )
        self._nonfinite += bad

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Add the statistics of ``other`` (same channels, bins, range mode, read point and parts)
        into ``self``.

        Merging is exact: the result equals one instance updated with the batches of both, bit
        for bit (within the limits stated in the class docstring).

        Args:
            other: statistics of the same layer over other samples (any device; ``self`` itself
                doubles every statistic).

        Returns:
            ``self``, updated in place.

        Raises:
            TypeError: ``other`` is not a ChannelStats.
            ValueError: other channels, bins, range mode, read point or parts (nothing is
                changed), or non-finite values pending on the device under
                ``nan_policy="raise"``.
        """
        if not isinstance(other, ChannelStats):
            raise TypeError(
                f"layer '{self.name}': can only merge a ChannelStats, got {type(other).__name__}"
            )
        mine = (self.num_channels, self.bins, self.range_mode, self.read_at, self.parts)
        theirs = (other.num_channels, other.bins, other.range_mode, other.read_at, other.parts)
        if mine != theirs:
            raise ValueError(
                f"layer '{self.name}': cannot merge statistics with (channels, bins, range_mode, "
                f"read_at, parts) = {theirs} into {mine}; collect both with the same settings"
            )
        self.sync()
        other.sync()
        dev = self.device
        # Merging an instance into itself doubles it: read from a copy, not from the tensors
        # being updated in place.
        copy = other is self
        kept = (f for f in BatchStats._fields if f not in ("gram", "nonfinite"))
        batch = {key: getattr(other, key).to(dev, copy=copy) for key in kept}
        parts = (other.sums_lo, other.gram_packed, other.gram_packed_lo)
        sums_lo, gram_hi, gram_lo = (t.to(dev, copy=copy) for t in parts)
        # nonfinite: read back by sync() above, added below.
        self._add(
            BatchStats(**batch, gram=None, nonfinite=0), other.count, sums_lo, (gram_hi, gram_lo)
        )
        self.nonfinite += other.nonfinite
        return self

    def set_gram(self, gram_packed: torch.Tensor, gram_packed_lo: torch.Tensor) -> None:
        """Give statistics collected without the ``"gram"`` part the Gram matrix of the same
        samples, computed elsewhere (e.g. derived from a layer's input, :mod:`icprune.input_gram`);
        ``parts`` then includes ``"gram"``.

        Args:
            gram_packed, gram_packed_lo: Tensor[C (C + 1) / 2] float64 on this instance's
                device, the packed double-double total (:mod:`icprune.stats.packed`), finite,
                with a non-negative diagonal.

        Raises:
            ValueError: the statistics already have the Gram part, or a tensor of the wrong
                shape, dtype or device, non-finite, or with a negative diagonal (nothing is
                changed).
        """
        if "gram" in self.parts:
            raise ValueError(f"layer '{self.name}': the statistics already hold a Gram matrix")
        size = packed.packed_size(self.num_channels)
        for t in (gram_packed, gram_packed_lo):
            if (
                not isinstance(t, torch.Tensor)
                or t.shape != (size,)
                or t.dtype != torch.float64
                or t.device != self.device
            ):
                raise ValueError(
                    f"layer '{self.name}': a packed Gram total must be a Tensor[{size}] float64 "
                    f"on {self.device}, got {t!r:.80}"
                )
        if not bool(torch.isfinite(gram_packed).all() & torch.isfinite(gram_packed_lo).all()):
            raise ValueError(f"layer '{self.name}': the Gram matrix holds non-finite values")
        if bool((packed.diagonal(gram_packed, self.num_channels) < 0).any()):
            raise ValueError(f"layer '{self.name}': the Gram matrix has a negative diagonal")
        self.gram_packed, self.gram_packed_lo = gram_packed, gram_packed_lo
        self.parts = tuple(p for p in PARTS if p in (*self.parts, "gram"))

    # ---------------------------------------------------------------------------- serialisation

    def state_dict(self) -> dict[str, object]:
        """Everything needed to restore these statistics: tensors and plain Python values only,
        so ``torch.save``/``torch.load(weights_only=True)`` round-trips it bit-identically.

        Version :data:`STATE_VERSION`: ``"gram"`` and ``"gram_lo"`` are the packed triangles
        (Tensor[C (C + 1) / 2] float64, :mod:`icprune.stats.packed`; empty without the ``"gram"``
        part), ``"parts"`` a list of the parts kept."""
        self.sync()
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "num_channels": self.num_channels,
            "bins": self.bins,
            "range_mode": self.range_mode,
            "nan_policy": self.nan_policy,
            "read_at": self.read_at,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "parts": list(self.parts),
            "sums": self.sums.clone(),
            "gram": self.gram_packed.clone(),
            "sums_lo": self.sums_lo.clone(),
            "gram_lo": self.gram_packed_lo.clone(),
            "counts": self.counts.clone(),
            "minimum": self.minimum.clone(),
            "maximum": self.maximum.clone(),
            "bin_exponent": self.bin_exponent.clone(),
            "bin_offset": self.bin_offset.clone(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore statistics saved by :meth:`state_dict` (tensors are moved to this instance's
        device).

        Everything is checked before anything is assigned, so a refused state leaves this
        instance exactly as it was. Checked: every key present; the version (one of
        :data:`READABLE_VERSIONS`); channels, bins, range mode and parts equal to this
        instance's; ``nan_policy`` and ``read_at`` among the allowed values; ``count`` and
        ``nonfinite`` ints >= 0; every tensor of the right type (dense, the dtype
        :meth:`state_dict` writes: no casting), shape and finiteness; histogram counts >= 0
        summing to ``count`` in every channel (all zero without the ``"histogram"`` part);
        extremes ordered (or empty when ``count`` is 0); the bin layout equal to the one the
        extremes give; each compensation term below half an ulp of its total; a Gram matrix with
        a non-negative diagonal. Version 2 files hold full C x C matrices: they must be symmetric
        (up to :data:`GRAM_ASYMMETRY` of the largest entry, the round-off of an older file's BLAS
        product) and their upper triangle is kept, so they load to the same statistics as
        before; version 3 files hold the packed triangles and load back bit for bit.

        Args:
            state: a mapping as returned by :meth:`state_dict` (e.g. read back with
                ``torch.load(weights_only=True)``).

        Raises:
            ValueError: the state is not a mapping, lacks a key, or fails a check above (the
                message names the layer, the key and what is wrong).
        """
        values = self._checked_state(state)
        for key, value in values.items():
            setattr(self, key, value)

    def _checked_state(self, state: Mapping[str, object]) -> dict[str, object]:
        """The attributes :meth:`load_state_dict` assigns, from a fully validated ``state``."""
        where = f"layer '{self.name}': saved statistics"
        if not isinstance(state, Mapping):
            raise ValueError(f"{where} must be a dict (from state_dict()), got {type(state)}")
        version = state.get("version")
        if not _is_int(version) or version not in READABLE_VERSIONS:
            raise ValueError(
                f"layer '{self.name}': statistics state has version {version!r}, this icprune "
                f"reads versions {READABLE_VERSIONS}; recompute the statistics with this version"
            )
        full = version == 2  # full C x C Gram matrices, both parts
        keys = [key for key in STATE_KEYS if not (full and key == "parts")]
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(
                f"{where} lack the key(s) {missing}; they were not written by "
                f"ChannelStats.state_dict() (or the file is damaged)"
            )
        mine = (self.num_channels, self.bins, self.range_mode)
        theirs = (state["num_channels"], state["bins"], state["range_mode"])
        if not (_is_int(theirs[0]) and _is_int(theirs[1]) and isinstance(theirs[2], str)) or (
            mine != theirs
        ):
            raise ValueError(
                f"layer '{self.name}': saved statistics have (channels, bins, range_mode) = "
                f"{theirs}, this instance {mine}; create ChannelStats with the saved settings"
            )
        if state["nan_policy"] not in NAN_POLICIES:
            raise ValueError(
                f"{where} have nan_policy {state['nan_policy']!r}, not one of {NAN_POLICIES}"
            )
        if state["read_at"] not in READ_AT:
            raise ValueError(f"{where} have read_at {state['read_at']!r}, not one of {READ_AT}")
        parts = PARTS if full else checked_parts(state["parts"], f"{where}: 'parts'")
        if parts != self.parts:
            raise ValueError(
                f"layer '{self.name}': saved statistics have parts {parts!r}, this instance "
                f"{self.parts!r}; create ChannelStats with the saved parts (from_state_dict does)"
            )
        count, nonfinite = state["count"], state["nonfinite"]
        for key, value in (("count", count), ("nonfinite", nonfinite)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{where} have {key} = {value!r}; it must be an int >= 0")
        if nonfinite > count * self.num_channels:
            raise ValueError(
                f"{where} count {nonfinite} non-finite values among {count} samples of "
                f"{self.num_channels} channels"
            )
        c = self.num_channels
        p = packed.packed_size(c) if "gram" in parts else 0
        gram_shape = (c, c) if full else (p,)
        shapes = {"gram": gram_shape, "gram_lo": gram_shape, "counts": (c, self.bins)}
        t = {}
        for key in STATE_TENSORS:
            value, shape, dtype = state[key], shapes.get(key, (c,)), _STATE_DTYPES[key]
            if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
                raise ValueError(
                    f"{where}: '{key}' must be a dense Tensor, got {type(value).__name__}"
                    f"{'' if not isinstance(value, torch.Tensor) else f' ({value.layout})'}"
                )
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(
                    f"{where}: '{key}' has the wrong type or shape: {value.dtype} of shape "
                    f"{tuple(value.shape)}, expected {dtype} of shape {shape}"
                )
            t[key] = value.detach().to(device="cpu")
        for key in ("sums", "gram", "sums_lo", "gram_lo"):
            if not bool(torch.isfinite(t[key]).all()):
                raise ValueError(f"{where}: '{key}' holds NaN or Inf; the file is damaged")
        for hi, lo in (("sums", "sums_lo"), ("gram", "gram_lo")):
            bound = torch.clamp(t[hi].abs() * 2.0**-52, min=2.0**-1074)
            if not bool((t[lo].abs() <= bound).all()):
                raise ValueError(
                    f"{where}: '{lo}' is not the remainder of '{hi}' (larger than half an ulp); "
                    f"the file is damaged"
                )
        counts = t["counts"]
        if bool((counts < 0).any()):
            raise ValueError(f"{where}: 'counts' holds negative histogram counts")
        totals = counts.sum(1)
        if "histogram" not in parts:
            if bool((counts != 0).any()):
                raise ValueError(
                    f"{where}: 'counts' must be all zero for statistics without the "
                    f"'histogram' part; the file is damaged"
                )
        elif not bool((totals == count).all()):
            bad = int(torch.nonzero(totals != count)[0])
            raise ValueError(
                f"{where}: the histogram of channel {bad} holds {int(totals[bad])} samples but "
                f"count is {count}; every channel's counts must sum to count"
            )
        lo, hi = t["minimum"], t["maximum"]
        if count == 0:
            if not bool((lo == float("inf")).all() and (hi == float("-inf")).all()):
                raise ValueError(
                    f"{where}: count is 0 but 'minimum'/'maximum' are not empty (+inf/-inf)"
                )
        elif not bool((torch.isfinite(lo) & torch.isfinite(hi) & (lo <= hi)).all()):
            raise ValueError(
                f"{where}: 'minimum'/'maximum' must be finite with minimum <= maximum in every "
                f"channel"
            )
        bin_exponent, bin_offset = self._layout_for(lo, hi)
        same = torch.equal(bin_exponent, t["bin_exponent"]) and torch.equal(
            bin_offset, t["bin_offset"]
        )
        if not same:
            raise ValueError(
                f"{where}: 'bin_exponent'/'bin_offset' are not the bin layout of the saved "
                f"extremes (bin_exponent {t['bin_exponent'][:4].tolist()}..., expected "
                f"{bin_exponent[:4].tolist()}...); the file is damaged"
            )
        gram = t["gram"]
        diag = gram.diagonal() if full else packed.diagonal(gram, c) if p else gram
        if bool((diag < 0).any()):
            raise ValueError(f"{where}: 'gram' has a negative diagonal entry (a sum of squares)")
        if full:
            asymmetry = float((gram - gram.T).abs().max()) if c > 1 else 0.0
            if asymmetry > GRAM_ASYMMETRY * float(gram.abs().max()):
                raise ValueError(
                    f"{where}: 'gram' is not symmetric (|G - G.T| up to {asymmetry:.3g}); the "
                    f"file is damaged"
                )
            t["gram"], t["gram_lo"] = packed.pack_upper(gram), packed.pack_upper(t["gram_lo"])
        dev = self.device
        rename = {"gram": "gram_packed", "gram_lo": "gram_packed_lo"}
        values: dict[str, object] = {
            rename.get(key, key): t[key].to(dev).contiguous().clone() for key in STATE_TENSORS
        }
        values["nan_policy"] = state["nan_policy"]
        values["read_at"] = state["read_at"]
        values["count"] = count
        values["parts"] = parts
        values["_nonfinite"] = nonfinite
        values["_pending_nonfinite"] = None
        return values

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, object], device=None, backend: str = "auto"
    ) -> ChannelStats:
        """Build an instance from :meth:`state_dict` output (on ``device``, default CPU, updated
        by ``backend`` from then on).

        Raises:
            ValueError: ``state`` is not a valid statistics state (see :meth:`load_state_dict`;
                settings of the wrong type or value are named too).
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"saved statistics must be a dict (from ChannelStats.state_dict()), got "
                f"{type(state).__name__}"
            )
        settings = ("name", "num_channels", "bins", "range_mode", "nan_policy", "read_at")
        missing = [key for key in settings if key not in state]
        name = state.get("name")
        if missing or not isinstance(name, str):
            what = f"lack the key(s) {missing}" if missing else f"have name {name!r} (not a str)"
            raise ValueError(
                f"saved statistics of layer {name!r} {what}; they were not written by "
                f"ChannelStats.state_dict() (or the file is damaged)"
            )
        for key in ("num_channels", "bins"):
            if not _is_int(state[key]):
                raise ValueError(
                    f"saved statistics of layer {name!r} have {key} = {state[key]!r}; it must be "
                    f"an int"
                )
        stats = cls(
            state["num_channels"],
            bins=state["bins"],
            range_mode=state["range_mode"],
            nan_policy=state["nan_policy"],
            name=name,
            read_at=state["read_at"],
            device=device,
            backend=backend,
            parts=state.get("parts", PARTS),  # version 2 kept both
        )
        stats.load_state_dict(state)
        return stats

    # ------------------------------------------------------------------------------ estimators

    def _require(self, minimum: int, what: str) -> None:
        self.sync()
        if self.count < minimum:
            raise ValueError(
                f"layer '{self.name}': {what} needs at least {minimum} sample(s), have "
                f"{self.count}; feed more data (or larger feature maps) before scoring"
            )

    def entropy(self) -> torch.Tensor:
        """Shannon entropy of each channel's histogram, ``-sum_b p_cb ln p_cb``.

        Returns:
            Tensor[C] float64, in nats; 0 for a constant channel, at most ``ln(bins)``.
        """
        self._require_part("histogram", "entropy")
        self._require(1, "entropy")
        p = self.counts.to(torch.float64).div_(self.count)
        return torch.special.xlogy(p, p, out=p).sum(1).neg_()

    def constant(self) -> torch.Tensor:
        """Tensor[C] bool: channels whose samples are all equal (exact, from the extremes)."""
        return self.minimum == self.maximum

    def correlation(self) -> torch.Tensor:
        """Pearson correlation between channels from the Gram matrix and sums.

        ``Cov = (G - s s^T / n) / (n - 1)``, ``Corr = Cov / (sigma sigma^T)``, clamped to [-1, 1].
        A constant channel (zero variance) has correlation 0 with every other channel and 1 with
        itself, so the matrix is always finite.

        Returns:
            Tensor[C, C] float64, symmetric, unit diagonal.
        """
        self._require_part("gram", "correlation")
        self._require(2, "correlation")
        n = self.count
        cov = (self.gram - torch.outer(self.sums, self.sums) / n) / (n - 1)
        var = cov.diagonal().clamp(min=0)
        sigma = torch.where(self.constant(), torch.zeros_like(var), var.sqrt())
        usable = sigma > 0
        safe = torch.where(usable, sigma, torch.ones_like(sigma))
        corr = (cov / torch.outer(safe, safe)).clamp(-1.0, 1.0)
        corr = torch.where(torch.outer(usable, usable), corr, torch.zeros_like(corr))
        corr.fill_diagonal_(1.0)
        return corr

    def distance(self) -> torch.Tensor:
        """Euclidean distance between the channels' sample vectors.

        ``D_cj = sqrt(max(G_cc + G_jj - 2 G_cj, 0))`` with ``G`` the Gram matrix: the distance
        between rows c and j of the C x M sample matrix (it grows like sqrt(M)).

        Returns:
            Tensor[C, C] float64, symmetric, zero diagonal, in the units of the feature map.
        """
        self._require_part("gram", "distance")
        self._require(1, "distance")
        return packed.distance(self.gram_packed, self.num_channels)
