"""icprune: CNN filter pruning by information capacity and independence.

Scores every output channel of every prunable layer by the entropy of its feature map
(information capacity) and its correlation with the other channels of the layer (information
independence), after Tang et al., arXiv:2303.03645. Exact definitions: docs/method.md.

    import icprune
    scores = icprune.score(model, data)                     # from feature maps
    scores = icprune.score(model, source="weights")         # data-free
    stats = icprune.calibrate(model, data)                  # reusable statistics
    result = icprune.prune(model, data, flops_reduction=0.5)  # score -> plan -> apply
    scores = icprune.score(model, data, scoring_config=icprune.ScoringConfig(lam=0.5))
    icprune.recalibrate_bn(pruned_model, data)              # re-estimate BN statistics
    tuned = icprune.finetune(pruned_model, train_data, 2, teacher=model)  # recover accuracy

The same job from a shell: ``icprune prune MODEL --data SRC --flops-reduction 0.5 --out DIR``
(see :mod:`icprune.cli` and docs/cli.md); ``icprune demo`` runs it on bundled data.
"""

from importlib.metadata import version

from icprune.applying import apply
from icprune.calibrate import calibrate
from icprune.config import CalibrationConfig, PlanConfig, ScoringConfig, StatsConfig
from icprune.evaluation import accuracy, latency
from icprune.extension import HAVE_EXT, build_info
from icprune.planning import PruningPlan, plan
from icprune.pruning import PruneResult, prune
from icprune.recovery.batchnorm import recalibrate_bn
from icprune.recovery.finetune import finetune
from icprune.report import ModelSummary, write_report
from icprune.scoring import LayerScores, layer_scores, score
from icprune.serialization import load, save
from icprune.stats import ChannelStats, all_reduce_stats, weight_stats
from icprune.structure import Dependency, Group, count, dependency_groups

#: The installed distribution's version (pyproject.toml is its one source).
__version__ = version("icprune")

__all__ = [
    "HAVE_EXT",
    "CalibrationConfig",
    "ChannelStats",
    "Dependency",
    "Group",
    "LayerScores",
    "ModelSummary",
    "PlanConfig",
    "PruneResult",
    "PruningPlan",
    "ScoringConfig",
    "StatsConfig",
    "__version__",
    "accuracy",
    "all_reduce_stats",
    "apply",
    "build_info",
    "calibrate",
    "count",
    "dependency_groups",
    "finetune",
    "latency",
    "layer_scores",
    "load",
    "plan",
    "prune",
    "recalibrate_bn",
    "save",
    "score",
    "weight_stats",
    "write_report",
]
