"""The data of the comparison: scikit-learn's bundled digits, upsampled, with fixed splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from icprune.data import digits

#: Side of the upsampled images, in pixels.
SIZE = 16
#: Fraction of the images held out for testing, and the seed of that split.
TEST_FRACTION = 0.25
SPLIT_SEED = 0
#: Calibration data: this many training images, chosen with CALIB_SEED, in batches of CALIB_BATCH.
CALIB_IMAGES = 512
CALIB_BATCH = 128
CALIB_SEED = 0


@dataclass(frozen=True)
class Digits:
    """The digits data, split.

    Attributes:
        train_x, test_x: Tensor[N, 1, SIZE, SIZE] float32, standardised with the training
            split's mean and standard deviation.
        train_y, test_y: Tensor[N] int64 class labels 0..9.
        calib: list of Tensor[CALIB_BATCH, 1, SIZE, SIZE] training images, for feature-map
            scores and BN recalibration.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    calib: list[torch.Tensor]


def load(max_train: int | None = None) -> Digits:
    """Load the digits with :func:`icprune.data.digits` at SIZE x SIZE with this comparison's
    split, and draw the calibration batches.

    Args:
        max_train: keep only the first this many training images (for quick smoke runs).

    Returns:
        :class:`Digits`.
    """
    split = digits(SIZE, TEST_FRACTION, SPLIT_SEED, max_train)
    train_x, train_y = split.train_x, split.train_y
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(CALIB_SEED))
    calib = list(train_x[order[:CALIB_IMAGES]].split(CALIB_BATCH))
    return Digits(train_x, train_y, split.test_x, split.test_y, calib)
