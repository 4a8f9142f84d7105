"""The model's structure as pruning needs it, read from the model alone (no scores, no data).

- :mod:`~icprune.structure.layers`: what every prunable layer type's channels are (the one
  place that knows conv, linear and BatchNorm channel attributes);
- :mod:`~icprune.structure.graph`: the fx trace, the prunable layers and their read points;
- :mod:`~icprune.structure.dependency`: the groups of channels that must be pruned together;
- :mod:`~icprune.structure.cost`: MACs and parameters as functions of kept channel counts;
- :mod:`~icprune.structure.counting`: MACs and parameters of one forward pass.
"""

from icprune.structure.counting import count
from icprune.structure.dependency import Dependency, Group, dependency_groups

__all__ = ["Dependency", "Group", "count", "dependency_groups"]
