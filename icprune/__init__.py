"""icprune: CNN filter pruning from channel statistics.

Scores every output channel of every prunable layer and prunes the lowest, coupled channels
together. The default criteria score a channel by what the layers that read it would lose
(``icprune.criteria``), and the pruned model is repaired from the same statistics; they were
chosen by a measured comparison with a held-out confirmation split (docs/quality.md). The
paper's criterion - information capacity (entropy) and independence, after Tang et al.,
arXiv:2303.03645 (docs/method.md) - is ``criterion="icii"``.

    import icprune
    scores = icprune.score(model, data)                     # "greedy", from what layers read
    scores = icprune.score(model, example_inputs=x)         # "wbn", data-free
    scores = icprune.score(model, data, criterion="icii")   # the paper's, from feature maps
    stats = icprune.calibrate(model, data, read_at="input")  # reusable: scoring and repair
    pruned = icprune.apply(model, plan, stats=stats)        # prune and repair
    result = icprune.prune(model, data, flops_reduction=0.5)  # score -> plan -> apply -> repair
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
