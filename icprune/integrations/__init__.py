"""icprune inside the pruning tools people already use.

- :mod:`icprune.integrations.torch_pruning`: :class:`InformationImportance`, a Torch-Pruning 1.6
  importance criterion that scores its groups with :func:`icprune.score`'s criteria and defaults
  (``"greedy"`` from calibration data, ``"wbn"`` data-free, ``"icii"`` on request). Needs
  ``torch-pruning`` (``pip install 'icprune[torch-pruning]'``); it is imported only when that
  module is.
- :mod:`icprune.integrations.masks`: a :class:`icprune.PruningPlan` applied as
  ``torch.nn.utils.prune`` masks (soft pruning: the model keeps its shapes, the pruned channels
  are zeros), and the masks made permanent again.

``import icprune`` never imports these modules or their optional dependencies.
"""
