"""Recovering a pruned model's accuracy.

- :mod:`~icprune.recovery.batchnorm`: :func:`~icprune.recovery.batchnorm.recalibrate_bn`
  re-estimates every BatchNorm's running statistics;
- :mod:`~icprune.recovery.finetune`: :func:`~icprune.recovery.finetune.finetune` trains a few
  epochs, optionally distilled from the unpruned model.

Both are ``icprune.recalibrate_bn`` and ``icprune.finetune``; this package hands on no names of
its own, so that ``icprune.recovery.finetune`` stays the module.
"""
