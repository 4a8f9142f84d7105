"""The statistics engine: streaming, mergeable per-channel statistics of feature maps or weights.

- :mod:`~icprune.stats.channel_stats`: :class:`ChannelStats`, the reference semantics;
- :mod:`~icprune.stats.binning`: exact, split-independent histogram binning;
- :mod:`~icprune.stats.compensated`: exact (double-double) sums;
- :mod:`~icprune.stats.backends`: who computes one batch (torch, C++, Triton) as a
  :class:`BatchStats`;
- :mod:`~icprune.stats.weights`: the data-free statistics of a model's weights;
- :mod:`~icprune.stats.distributed`: merging the statistics of several processes.

The Triton kernels live in :mod:`icprune.kernels`, beneath this package.
"""

from icprune.stats.backends import BatchStats
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.distributed import all_reduce_stats
from icprune.stats.weights import weight_stats

__all__ = ["BatchStats", "ChannelStats", "all_reduce_stats", "weight_stats"]
