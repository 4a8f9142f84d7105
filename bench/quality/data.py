"""The data of the comparison: scikit-learn's bundled digits, upsampled, with fixed splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """Load ``sklearn.datasets.load_digits`` (1797 images of 8x8 pixels, values 0..16),
    upsample to SIZE x SIZE (bilinear), split stratified into train and test.

    Args:
        max_train: keep only the first this many training images (for quick smoke runs).

    Returns:
        :class:`Digits`.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            f"bench.quality needs scikit-learn ({exc}): pip install -e '.[data]'"
        ) from exc
    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    train_x, train_y = images[train_idx], labels[train_idx]
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(CALIB_SEED))
    calib = list(train_x[order[:CALIB_IMAGES]].split(CALIB_BATCH))
    return Digits(train_x, train_y, images[test_idx], labels[test_idx], calib)
