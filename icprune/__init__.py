"""icprune: CNN filter pruning by information capacity and independence.

Scores every output channel of every prunable layer by the entropy of its feature map
(information capacity) and its correlation with the other channels of the layer (information
independence), after Tang et al., arXiv:2303.03645. Exact definitions: docs/method.md.

    import icprune
    scores = icprune.score(model, data)                     # from feature maps
    scores = icprune.score(model, source="weights")         # data-free
    stats = icprune.calibrate(model, data)                  # reusable statistics
    icprune.recalibrate_bn(pruned_model, data)              # re-estimate BN statistics
"""

from icprune._ext import HAVE_EXT, build_info
from icprune.calibrate import calibrate
from icprune.counting import count
from icprune.recalibrate import recalibrate_bn
from icprune.scoring import LayerScores, layer_scores, score
from icprune.stats import ChannelStats
from icprune.weight_stats import weight_stats

__version__ = "0.1.0"

__all__ = [
    "HAVE_EXT",
    "ChannelStats",
    "LayerScores",
    "__version__",
    "build_info",
    "calibrate",
    "count",
    "layer_scores",
    "recalibrate_bn",
    "score",
    "weight_stats",
]
