"""bench.quality: which channels does each criterion keep, and what repairs the rest?

Run from the repository root (``make quality`` does exactly this):

    python -m bench.quality                       # both splits + diagnosis, docs/quality.{md,png}
    python -m bench.quality --quick --out /tmp/q  # smoke test, well under a minute
    python -m bench.quality.lite0                 # the pretrained EfficientNet-Lite0 track

Protocol (fixed before the confirmation split was run):

- Data (:mod:`bench.quality.data`): scikit-learn's bundled ``load_digits`` (1797 grey 8x8
  images, 10 classes), upsampled to 16x16 (bilinear), standardised with the training mean and
  standard deviation. One stratified held-out test split of 25 % (450 images,
  ``random_state=0``); the 1347 others train. Calibration data (statistics for scoring and
  repair, and BN re-estimation): 512 training images chosen with seed 0, in 4 batches of 128,
  the same for every net and criterion.
- Nets (:mod:`bench.quality.models`): four architecture kinds - plain (VGG-style), residual,
  inverted residual (depthwise, MobileNetV2-style) and concat (DenseNet-style) - with one
  *selection* net and one *confirmation* net of each kind (another depth, width or block).
- Splits: the **selection split** (the selection nets, seeds 0-4) is where criteria, repair and
  their settings are compared and the defaults chosen (:func:`bench.quality.run.choose`); the
  **confirmation split** (the confirmation nets, seeds 5-9) measures only the chosen defaults,
  icprune's previous defaults and the baselines, and the verdict is read there only.
- Training (:mod:`bench.quality.train`): SGD (momentum 0.9, Nesterov, weight decay 5e-4),
  batch 64, 15 epochs, learning rate 0.05 with a cosine decay to 0, random translations of up
  to 2 pixels; the seed fixes the initialisation, the batch order and the translations.
- Pruning (:mod:`bench.quality.pipeline`): ``icprune.plan`` over icprune's dependency groups
  (residual streams and concatenations included) with one pruning fraction for every group,
  the smallest that removes at least 30 / 50 / 70 % of the MACs, so every criterion keeps the
  same number of channels per group; then ``icprune.apply``.
- Recovery, no training: nothing, BN re-estimation (``icprune.recalibrate_bn`` on the
  calibration data), repair from the statistics (:mod:`icprune.recovery.repair`), or both.
- Headline: test accuracy right after pruning and recovery, mean and standard deviation over
  seeds.
"""
