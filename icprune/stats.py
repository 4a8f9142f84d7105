"""Streaming, mergeable per-channel statistics of one layer: the reference semantics.

:class:`ChannelStats` holds the sufficient statistics from which icprune computes information
capacity (histogram entropy) and information independence (correlation or distance between
channels). They are additive, so they stream over calibration batches and merge across instances,
processes and devices; the exact definitions are in ``docs/method.md``.

This module holds the pure-torch reference that every faster backend must reproduce; the
faster backends (:mod:`icprune.backends`) compute a batch's statistics in the batch's own bin
layout, which ``update`` then adds exactly, as :meth:`ChannelStats.merge` does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from icprune.backends import BATCH_FUNCTIONS, BatchStats, resolve_backend
from icprune.binning import K_MIN, bin_index, bin_layout, rebin
from icprune.compensated import add_

RANGE_MODES = ("layer", "channel")
NAN_POLICIES = ("raise", "zero")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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
#: Bump when the meaning or layout of :meth:`ChannelStats.state_dict` changes.
STATE_VERSION = 2


class ChannelStats:
    """Sufficient statistics of the C channels of one layer, accumulated over samples.

    A *sample* of channel ``c`` is one value of its feature map: an input tensor of shape
    ``(N, C, *spatial)`` contributes ``M = N * prod(spatial)`` samples to every channel. Kept:

    - ``count``: int, number of samples M seen so far (per channel, the same for all);
    - ``sums``: Tensor[C] float64, per-channel sum of the samples;
    - ``gram``: Tensor[C, C] float64, ``A @ A.T`` for the C x M matrix A of all samples;
      both are float64 totals; ``sums_lo`` and ``gram_lo`` (same shapes) hold their
      compensation terms, the remainders that make ``sums + sums_lo`` the exact total (see below);
    - ``counts``: Tensor[C, bins] int64 histogram, binned exactly (see :mod:`icprune.binning`)
      over a range shared by the layer (``range_mode="layer"``) or per channel (``"channel"``);
    - ``minimum``/``maximum``: Tensor[C] float64, per-channel extremes (they fix the bin layout);
    - ``nonfinite``: int, number of NaN/Inf values replaced by 0 under ``nan_policy="zero"``.

    The result never depends on how the batches are distributed over ``update`` calls, merged
    instances or processes (:func:`icprune.distributed.all_reduce_stats`): histogram counts,
    extremes and bin layouts are bit-identical always. ``sums`` and ``gram`` are double-double
    totals (:mod:`icprune.compensated`): each batch's float64 contribution is added without
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

    Args:
        num_channels: C, the number of channels (>= 1).
        bins: B, the number of histogram bins (>= 2). Bins have power-of-two widths, so the data
            of a channel (or layer) occupies between about B/2 and B of them.
        range_mode: ``"layer"`` - one bin layout shared by all channels, so entropy reflects a
            channel's dynamic range as well as its shape; ``"channel"`` - each channel binned over
            its own range (scale-free entropy, up to the factor-of-two granularity of the widths).
        nan_policy: ``"raise"`` - a NaN/Inf value raises ``ValueError`` naming the layer;
            ``"zero"`` - non-finite values are replaced by 0 and counted in ``nonfinite``.
        name: layer name used in error messages (e.g. ``"layer1.0.conv1"``).
        read_at: where the samples come from, kept as metadata: ``"output"``, ``"bn"`` or
            ``"activation"`` for feature maps (see :mod:`icprune.graph`), ``"weights"`` for the
            data-free statistics of a layer's weights, None if unspecified.
        device: device holding the statistics (default CPU); updates must come from it.
        backend: how a batch is computed (see :mod:`icprune.backends`): ``"auto"`` (Triton for
            CUDA tensors, the C++ extension for CPU tensors, else torch), or one of ``"triton"``,
            ``"cpp"``, ``"torch"`` (the float64 reference) to force it. On CUDA (Triton) nothing
            synchronises with the host: non-finite values are counted on the device and, with
            ``nan_policy="raise"``, reported when the statistics are next read.
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
    ) -> None:
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(
                f"layer '{name}': num_channels must be an int >= 1, got {num_channels!r}"
            )
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"layer '{name}': bins must be an int >= 2, got {bins!r}")
        if range_mode not in RANGE_MODES:
            raise ValueError(
                f"layer '{name}': range_mode must be one of {RANGE_MODES}, got {range_mode!r}"
            )
        if nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"layer '{name}': nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}"
            )
        self.num_channels = num_channels
        self.bins = bins
        self.range_mode = range_mode
        self.nan_policy = nan_policy
        self.name = name
        self.read_at = read_at
        self.backend = backend
        c = num_channels
        f64 = {"dtype": torch.float64, "device": device}
        i64 = {"dtype": torch.int64, "device": device}
        self.count = 0
        self._nonfinite = 0
        # Non-finite values counted on the device by the Triton backend, not yet read back.
        self._pending_nonfinite: torch.Tensor | None = None
        self.sums = torch.zeros(c, **f64)
        self.gram = torch.zeros(c, c, **f64)
        # Compensation terms: sums + sums_lo and gram + gram_lo are the exact totals.
        self.sums_lo = torch.zeros(c, **f64)
        self.gram_lo = torch.zeros(c, c, **f64)
        self.counts = torch.zeros(c, bins, **i64)
        self.minimum = torch.full((c,), float("inf"), **f64)
        self.maximum = torch.full((c,), float("-inf"), **f64)
        # The layout bin_layout gives an empty range: the finest bins, anchored at 0.
        self.bin_exponent = torch.full((c,), K_MIN, **i64)
        self.bin_offset = torch.zeros(c, **i64)
        resolve_backend(backend, self.device, name)  # fail early on an unavailable backend

    def __repr__(self) -> str:
        return (
            f"ChannelStats(name={self.name!r}, num_channels={self.num_channels}, bins={self.bins}, "
            f"range_mode={self.range_mode!r}, read_at={self.read_at!r}, count={self.count})"
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
        return self.gram.device

    # ----------------------------------------------------------------------------- accumulation

    def update(self, x: torch.Tensor) -> None:
        """Add the samples of one batch.

        Args:
            x: Tensor[N, C, *spatial] (or Tensor[N, C] for linear layers) of dtype float16,
                bfloat16, float32 or float64, any memory layout (contiguous, channels_last).
                A tensor with no elements is a no-op.

        Raises:
            TypeError: ``x`` is not a floating-point tensor of a supported dtype.
            ValueError: wrong rank or channel count, or non-finite values with
                ``nan_policy="raise"``.
        """
        self._check(x)
        if x.numel() == 0:
            return
        backend = resolve_backend(self.backend, self.device, self.name, x.dtype)
        if backend == "torch":
            samples = self._handle_nonfinite(self._as_samples(x))
            self._accumulate_moments(samples)
            self._accumulate_histogram(samples)
            return
        batch = BATCH_FUNCTIONS[backend](x, self.bins)
        if isinstance(batch.nonfinite, torch.Tensor):  # on the device: read back later
            pending = self._pending_nonfinite
            self._pending_nonfinite = (
                batch.nonfinite if pending is None else pending + batch.nonfinite
            )
        elif batch.nonfinite:
            self._handle_nonfinite(self._as_samples(x))  # raises, naming the channels, or counts
        self._add(batch, x.numel() // self.num_channels)

    def _check(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is a Tensor[N, C, *spatial] of a supported dtype on our device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer '{self.name}': expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"layer '{self.name}': feature map has dtype {x.dtype}; supported are "
                f"float16, bfloat16, float32 and float64 - cast it first (e.g. x.float())"
            )
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"layer '{self.name}': expected a tensor of shape "
                f"(N, {self.num_channels}, *spatial), got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(
                f"layer '{self.name}': feature map is on {x.device} but the statistics are on "
                f"{self.device}; create ChannelStats(device=...) on the data's device"
            )

    def _as_samples(self, x: torch.Tensor) -> torch.Tensor:
        """Validate ``x`` and return its samples as Tensor[M, C] float64."""
        self._check(x)
        # Channels last: a view for channels_last tensors, one copy otherwise.
        return x.to(torch.float64).movedim(1, -1).reshape(-1, self.num_channels)

    def _handle_nonfinite(self, samples: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(samples)
        if bool(finite.all()):
            return samples
        bad = int((~finite).sum())
        if self.nan_policy == "raise":
            channels = torch.nonzero((~finite).any(0)).flatten()[:8].tolist()
            raise ValueError(
                f"layer '{self.name}': feature map holds {bad} non-finite value(s) (NaN/Inf), "
                f"first in channel(s) {channels}. Check the model and its input, or pass "
                f"nan_policy='zero' to count them and score them as zeros."
            )
        self.nonfinite += bad
        return torch.where(finite, samples, torch.zeros_like(samples))

    def _accumulate_moments(self, samples: torch.Tensor) -> None:
        self.count += samples.shape[0]
        add_(self.sums, self.sums_lo, samples.sum(0))
        add_(self.gram, self.gram_lo, samples.T @ samples)

    def _accumulate_histogram(self, samples: torch.Tensor) -> None:
        lo = torch.minimum(self.minimum, samples.amin(0))
        hi = torch.maximum(self.maximum, samples.amax(0))
        self._relayout(lo, hi)
        index = bin_index(samples, self.bin_exponent) - self.bin_offset
        flat = index + torch.arange(self.num_channels, device=self.device) * self.bins
        self.counts += torch.bincount(flat.flatten(), minlength=self.num_channels * self.bins).view(
            self.num_channels, self.bins
        )

    def _layout_for(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exponent, offset) Tensor[C] int64 of the bin layout for per-channel extremes lo/hi."""
        if self.range_mode == "layer":
            c = self.num_channels
            k, off = bin_layout(lo.min().reshape(1), hi.max().reshape(1), self.bins)
            return k.expand(c).clone(), off.expand(c).clone()
        return bin_layout(lo, hi, self.bins)

    def _relayout(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Widen the range to [lo, hi] (Tensor[C] float64 each), merging bins exactly."""
        k, off = self._layout_for(lo, hi)
        self.counts = rebin(self.counts, self.bin_exponent, self.bin_offset, k, off)
        self.bin_exponent, self.bin_offset = k, off
        self.minimum, self.maximum = lo, hi

    def _add(
        self,
        batch: BatchStats,
        count: int,
        sums_lo: torch.Tensor | None = None,
        gram_lo: torch.Tensor | None = None,
    ) -> None:
        """Add the statistics of ``count`` samples, given in their own bin layout, exactly
        (``sums_lo``/``gram_lo``: compensation terms of ``batch.sums``/``batch.gram``, if any)."""
        lo = torch.minimum(self.minimum, batch.minimum)
        hi = torch.maximum(self.maximum, batch.maximum)
        self._relayout(lo, hi)
        self.counts += rebin(
            batch.counts, batch.exponent, batch.offset, self.bin_exponent, self.bin_offset
        )
        self.count += count
        add_(self.sums, self.sums_lo, batch.sums, sums_lo)
        add_(self.gram, self.gram_lo, batch.gram, gram_lo)

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
        """Add the statistics of ``other`` (same channels, bins, range mode and read point) into
        ``self``.

        Merging is exact: the result equals one instance updated with the batches of both, bit
        for bit (within the limits stated in the class docstring).

        Args:
            other: statistics of the same layer over other samples (any device).

        Returns:
            ``self``, updated in place.
        """
        if not isinstance(other, ChannelStats):
            raise TypeError(
                f"layer '{self.name}': can only merge a ChannelStats, got {type(other).__name__}"
            )
        mine = (self.num_channels, self.bins, self.range_mode, self.read_at)
        theirs = (other.num_channels, other.bins, other.range_mode, other.read_at)
        if mine != theirs:
            raise ValueError(
                f"layer '{self.name}': cannot merge statistics with (channels, bins, range_mode, "
                f"read_at) = {theirs} into {mine}; collect both with the same settings"
            )
        self.sync()
        other.sync()
        dev = self.device
        parts = (other.counts, other.bin_exponent, other.bin_offset, other.minimum, other.maximum)
        self._add(
            BatchStats(*(t.to(dev) for t in parts), other.sums.to(dev), other.gram.to(dev), 0),
            other.count,
            other.sums_lo.to(dev),
            other.gram_lo.to(dev),
        )
        self.nonfinite += other.nonfinite
        return self

    # ---------------------------------------------------------------------------- serialisation

    def state_dict(self) -> dict[str, object]:
        """Everything needed to restore these statistics: tensors and plain Python values only,
        so ``torch.save``/``torch.load(weights_only=True)`` round-trips it bit-identically."""
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
            "sums": self.sums.clone(),
            "gram": self.gram.clone(),
            "sums_lo": self.sums_lo.clone(),
            "gram_lo": self.gram_lo.clone(),
            "counts": self.counts.clone(),
            "minimum": self.minimum.clone(),
            "maximum": self.maximum.clone(),
            "bin_exponent": self.bin_exponent.clone(),
            "bin_offset": self.bin_offset.clone(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore statistics saved by :meth:`state_dict` (checked against this instance's
        channels, bins and range mode; tensors are moved to this instance's device)."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"layer '{self.name}': statistics state has version {version!r}, this icprune "
                f"reads version {STATE_VERSION}; recompute the statistics with this version"
            )
        mine = (self.num_channels, self.bins, self.range_mode)
        theirs = (state["num_channels"], state["bins"], state["range_mode"])
        if mine != theirs:
            raise ValueError(
                f"layer '{self.name}': saved statistics have (channels, bins, range_mode) = "
                f"{theirs}, this instance {mine}; create ChannelStats with the saved settings"
            )
        dev = self.device
        self.nan_policy = state["nan_policy"]
        self.read_at = state["read_at"]
        self.count = int(state["count"])
        self.nonfinite = int(state["nonfinite"])
        for key in STATE_TENSORS:
            value = state[key]
            current = getattr(self, key)
            if not isinstance(value, torch.Tensor) or value.shape != current.shape:
                raise ValueError(f"layer '{self.name}': saved '{key}' has the wrong type or shape")
            setattr(self, key, value.to(device=dev, dtype=current.dtype).clone())

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, object], device=None, backend: str = "auto"
    ) -> ChannelStats:
        """Build an instance from :meth:`state_dict` output (on ``device``, default CPU, updated
        by ``backend`` from then on)."""
        stats = cls(
            int(state["num_channels"]),
            bins=int(state["bins"]),
            range_mode=str(state["range_mode"]),
            nan_policy=str(state["nan_policy"]),
            name=str(state["name"]),
            read_at=state["read_at"],
            device=device,
            backend=backend,
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
        self._require(1, "entropy")
        p = self.counts.to(torch.float64) / self.count
        return -torch.special.xlogy(p, p).sum(1)

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
        self._require(1, "distance")
        diag = self.gram.diagonal()
        sq = (diag[:, None] + diag[None, :] - 2 * self.gram).clamp(min=0)
        sq.fill_diagonal_(0.0)
        return sq.sqrt()
