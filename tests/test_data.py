import torch

from icprune.data import IMAGENET_MEAN, sample_images


def test_sample_images_are_deterministic_normalised_crops():
    a = sample_images(count=6, size=32, seed=3)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, sample_images(count=6, size=32, seed=3))
    assert not torch.equal(a, sample_images(count=6, size=32, seed=4))
    # ImageNet-normalised photographs: roughly zero mean, pixel range within the normalised [0, 1].
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, (0.229, 0.224, 0.225), strict=True))
    assert a.min() >= low - 1e-4 and a.max() <= (1 - 0.406) / 0.225 + 1e-4
    assert a.std() > 0.3
    # Images alternate between the two photographs.
    assert (a[0] - a[1]).abs().mean() > 0.1


def test_sample_images_reject_bad_arguments():
    import pytest

    with pytest.raises(ValueError, match="count >= 1 and size >= 8"):
        sample_images(count=0)
