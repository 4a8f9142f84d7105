"""The training recipe of the comparison, evaluation, and fine-tuning of masked models."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench.quality import models
from icprune import evaluation


@dataclass(frozen=True)
class Recipe:
    """SGD (Nesterov momentum 0.9, weight decay 5e-4) with a cosine learning-rate decay to 0.

    Attributes:
        epochs: passes over the training images.
        lr: initial learning rate.
        batch: images per step.
        shift: maximum random translation in pixels (zero padding), per image and axis.
    """

    epochs: int
    lr: float
    batch: int = 64
    shift: int = 2


TRAIN = Recipe(epochs=15, lr=0.05)
FINE_TUNE = Recipe(epochs=2, lr=0.01)


def _translate(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Tensor[N, C, H, W] -> same shape, each image moved by up to ``shift`` pixels per axis."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]  # (N, 1, 1, W)
    index = torch.arange(n)[:, None, None, None]
    return padded[index, torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    seed: int,
    desc: str = "train",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place with ``recipe`` on images ``x`` (Tensor[N, 1, H, W] float32)
    and labels ``y`` (Tensor[N] int64); batch order and translations come from ``seed``; a
    progress bar per epoch unless ``progress`` is False. Returns ``model``, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = recipe.epochs * math.ceil(len(x) / recipe.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in tqdm(range(recipe.epochs), desc=desc, unit="epoch", leave=False, disable=not progress):
        order = torch.randperm(len(x), generator=generator)
        for idx in order.split(recipe.batch):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(_translate(x[idx], recipe.shift, generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` in eval mode on images ``x``
    (Tensor[N, 1, H, W]) with labels ``y`` (Tensor[N] int64); the model's mode is restored."""
    return evaluation.accuracy(model, list(zip(x.split(batch), y.split(batch), strict=True)))


def trained(
    arch: str,
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    cache: Path | None = None,
    progress: bool = True,
) -> nn.Module:
    """The network ``arch`` initialised with ``torch.manual_seed(seed)`` and trained with
    ``recipe`` (and ``seed``) on ``x``, ``y``, in eval mode. With ``cache`` (a folder), the
    state dict is stored there, keyed by everything the training depends on, and loaded back
    (``weights_only=True``) when it exists, instead of training again."""
    torch.manual_seed(seed)
    model = models.build(arch)
    path = None
    if cache is not None:
        digest = hashlib.sha256(repr((arch, seed, recipe, len(x), float(x.sum()))).encode())
        path = Path(cache) / f"{arch}-{seed}-{digest.hexdigest()[:12]}.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
    train(model, x, y, recipe, seed, f"train {arch}/{seed}", progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), partial)
        partial.replace(path)  # atomic: a killed run leaves no truncated net behind
    return model.eval()
