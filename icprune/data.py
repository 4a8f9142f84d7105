"""Real image data that ships with scikit-learn, for the demo and the tests (no downloads).

``python -m icprune.data`` prints the folder of scikit-learn's two bundled photographs, an
image folder any ``--data`` option takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: ImageNet channel means and standard deviations (RGB, for images scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_images(count: int = 32, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random crops of scikit-learn's two bundled photographs, normalised like ImageNet.

    The photographs (``sklearn.datasets.load_sample_images``: a Chinese temple and a flower,
    427 x 640 RGB) are cut into ``count`` square crops of random side 180-427 px at random
    positions, half of them mirrored, each resized to ``size`` x ``size`` (bilinear).

    Args:
        count: number of images N (>= 1).
        size: side of each output image in pixels (>= 8).
        seed: seed of the crop positions; the same seed gives the same tensor.

    Returns:
        Tensor[N, 3, size, size] float32, ImageNet-normalised.
    """
    if count < 1 or size < 8:
        raise ValueError(f"sample_images: need count >= 1 and size >= 8, got {count=}, {size=}")
    try:  # scikit-learn needs pillow to decode the JPEGs, and says so only when loading
        from sklearn.datasets import load_sample_images

        images = load_sample_images().images
    except ImportError as exc:
        raise ImportError(
            f"sample_images needs scikit-learn and pillow ({exc}): pip install 'icprune[data]'"
        ) from exc
    photos = [torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in images]
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[1:]
        side = int(torch.randint(180, min(height, width) + 1, (1,), generator=gen))
        top = int(torch.randint(0, height - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - side + 1, (1,), generator=gen))
        crop = photo[:, top : top + side, left : left + side].float().div(255)
        if i % 4 >= 2:
            crop = crop.flip(-1)
        crop = torch.nn.functional.interpolate(
            crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        crops.append((crop - mean) / std)
    return torch.stack(crops)


@dataclass(frozen=True)
class Digits:
    """scikit-learn's handwritten digits, upsampled, split and standardised.

    Attributes:
        train_x, test_x: Tensor[N, 1, size, size] float32, standardised with the training
            split's mean and standard deviation.
        train_y, test_y: Tensor[N] int64 class labels 0..9.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits(
    size: int = 16, test_fraction: float = 0.25, seed: int = 0, max_train: int | None = None
) -> Digits:
    """``sklearn.datasets.load_digits`` (1797 greyscale 8x8 images, values 0..16) scaled to
    [0, 1], upsampled to ``size`` x ``size`` (bilinear), split stratified into train and test.

    Args:
        size: side of the upsampled images in pixels.
        test_fraction: share of the images held out for testing.
        seed: seed of the split.
        max_train: keep only the first this many training images (None: all).

    Returns:
        :class:`Digits` (1347 training and 450 test images with the defaults).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            f"digits needs scikit-learn ({exc}): pip install 'icprune[data]'"
        ) from exc
    data = load_digits()
    images = torch.from_numpy(data.images).float()[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False
    )
    labels = torch.from_numpy(data.target).long()
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=test_fraction, stratify=data.target, random_state=seed
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Digits(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def sample_images_folder() -> Path:
    """The folder holding scikit-learn's two bundled photographs (``china.jpg`` and
    ``flower.jpg``, 427 x 640 RGB): real images for ``icprune prune --data`` without
    downloads."""
    try:
        import sklearn.datasets
    except ImportError as exc:
        msg = f"sample_images_folder needs scikit-learn ({exc}): pip install 'icprune[data]'"
        raise ImportError(msg) from exc
    return Path(sklearn.datasets.__file__).parent / "images"


if __name__ == "__main__":
    print(sample_images_folder())
