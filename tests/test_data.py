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


def test_sample_images_folder_holds_the_two_photographs():
    import subprocess
    import sys

    from icprune.cli.data_specs import image_folder
    from icprune.data import sample_images_folder

    folder = sample_images_folder()
    assert sorted(p.name for p in folder.glob("*.jpg")) == ["china.jpg", "flower.jpg"]
    printed = subprocess.run(
        [sys.executable, "-m", "icprune.data"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == str(folder)
    source = image_folder(folder, (3, 64, 64))
    assert source.num_samples == 2 and not source.labelled


def test_digits_are_standardised_and_split_stratified():
    from icprune.data import digits

    data = digits(size=12)
    assert data.train_x.shape == (1347, 1, 12, 12) and data.test_x.shape == (450, 1, 12, 12)
    assert abs(float(data.train_x.mean())) < 1e-5 and abs(float(data.train_x.std()) - 1) < 1e-4
    assert data.train_y.bincount().min() > 120 and data.test_y.bincount().min() > 40
    assert len(digits(max_train=100).train_x) == 100
