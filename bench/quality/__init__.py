"""bench.quality: which channels does each pruning criterion keep, measured on real data?

Run from the repository root (``make quality`` does exactly this):

    python -m bench.quality                 # the full comparison, writes docs/quality.{md,png}
    python -m bench.quality --quick --out /tmp/q   # smoke test, well under a minute

Protocol (fixed before any criterion was compared; see docs/quality.md for the results):

- Data (:mod:`bench.quality.data`): scikit-learn's bundled ``load_digits`` (1797 grey 8x8
  images, 10 classes), upsampled to 16x16 (bilinear), standardised with the training mean and
  standard deviation. One stratified held-out test split of 25 % (450 images,
  ``random_state=0``) for every model and seed; the 1347 others train. Calibration data (for
  feature-map scores and for BN recalibration): 512 training images chosen with seed 0, in 4
  batches of 128, the same for every model and criterion.
- Models (:mod:`bench.quality.models`): a CIFAR-style ResNet-20 (three stages of three
  BasicBlocks, widths 16/32/64) and a VGG-style net with BN (16-16-M-32-32-M-64-64-M, global
  average pool, linear head).
- Training (:mod:`bench.quality.train`): seeds 0, 1, 2; SGD (momentum 0.9, Nesterov, weight
  decay 5e-4), batch 64, 15 epochs, learning rate 0.05 with a cosine decay to 0,
  random translations of up to 2 pixels. Fine-tune after pruning: the same with 2 epochs at a
  learning rate of 0.01.
- Pruning (:mod:`bench.quality.allocation`): ResNet - the inner channels of each block (the
  output of ``conv1``), the residual stream is left alone; VGG - every conv. Targets: 30 %,
  50 % and 70 % fewer MACs. Channels are masked (zeroed at their BatchNorm's output), which is
  equivalent to removing them. Two allocations: ``same counts`` - one pruning ratio shared by
  every layer, the smallest that meets the target, so all criteria keep the same number of
  channels per layer and only the choice of channels differs; ``own`` - the criterion's scores,
  min-max normalised within each layer, ranked globally, channels removed lowest first until
  the target is met (at least one channel stays in each layer).
- Accuracy on the test split after ``icprune.recalibrate_bn`` over the calibration data, and
  after the fine-tune (for the baselines, the two base ICII variants and the best ICII variant
  by recalibrated accuracy; ``same counts`` allocation). Mean and standard deviation over seeds.
- The default ICII variant is the one with the highest recalibrated accuracy with ``same
  counts``, averaged over both models, the three targets and the seeds.
"""
