"""Every zoo model that claims torchvision's layout computes what torchvision's model computes.

A torchvision model is built with a seeded random initialisation, its BatchNorm affine
parameters and running statistics are randomised too (at their defaults, 1/0/0/1, an eval-mode
BatchNorm is the identity and would hide a misplaced or mis-configured norm), and its state_dict
is saved the way torchvision ships checkpoints (a plain dict of tensors). The zoo model is built
from that file through :func:`icprune.cli.zoo.build_model`, the route ``--weights`` takes, and both
run the same random input in eval mode. Their leaf modules must also match one for one in type
and settings (``extra_repr``: eps, padding, ceil_mode, ReLU6 vs ReLU, ...), which catches
differences a random network's output is too insensitive to show (a BatchNorm eps changes it by
about 1e-6 relative).
"""

import pytest
import torch
from torch import nn

from icprune.cli.zoo import ZOO, build_model

# tests/conftest.py leaves this folder out where torchvision is missing; this covers an explicit
# `pytest tests/torchvision` there (where the name finds only this folder)
models = pytest.importorskip("torchvision.models", reason="needs torchvision (.venv-tv)")

#: Zoo names that claim torchvision's key layout (the CIFAR models follow another checkpoint set).
TORCHVISION_LAYOUT = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg16_bn",
    "mobilenet_v2",
)
#: Input sides: the nominal 224 and an odd side, where padding and pooling rounding differ.
SIDES = (224, 97)


def _randomize_norms(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _torchvision_checkpoint(name: str, path, num_classes: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    reference = models.get_model(name, weights=None, num_classes=num_classes)
    _randomize_norms(reference, seed + 1)
    torch.save(reference.state_dict(), path)
    return reference.eval()


def _leaves(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {
        name: (type(m).__name__, m.extra_repr())
        for name, m in model.named_modules()
        if not list(m.children())
    }


def _assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    # float32 end to end through up to 152 layers: relative to the output's scale
    scale = want.abs().max().item()
    torch.testing.assert_close(
        got, want, rtol=1e-4, atol=1e-5 * scale, msg=lambda text: f"{name}: {text}"
    )


def test_the_list_covers_every_imagenet_zoo_entry():
    imagenet = {n for n, e in ZOO.items() if e.input_shape == (3, 224, 224)}
    assert imagenet == set(TORCHVISION_LAYOUT)


@pytest.mark.parametrize("name", TORCHVISION_LAYOUT)
def test_zoo_model_equals_torchvision_for_the_same_state_dict(name, tmp_path):
    path = tmp_path / f"{name}.pth"
    reference = _torchvision_checkpoint(name, path)
    model, shape = build_model(name, path)
    assert shape == (3, 224, 224) and not model.training
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)  # same keys in the same order
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert _leaves(model) == _leaves(reference)
    gen = torch.Generator().manual_seed(2)
    for side in SIDES:
        x = torch.randn(2, 3, side, side, generator=gen)
        with torch.no_grad():
            want, got = reference(x), model(x)
        assert got.shape == want.shape == (2, 1000)
        assert torch.isfinite(want).all()
        _assert_close(got, want, f"{name} at {side}x{side}")


def test_class_count_comes_from_a_torchvision_checkpoint(tmp_path):
    path = tmp_path / "resnet18_7.pth"
    reference = _torchvision_checkpoint("resnet18", path, num_classes=7)
    model, _ = build_model("resnet18", path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_close(model(x), reference(x), "resnet18 with 7 classes")
