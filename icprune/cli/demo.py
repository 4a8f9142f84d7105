"""``icprune demo`` (``make demo``): the whole job on bundled data, no downloads, no arguments.

Trains a CIFAR-style ResNet-20 (one input channel) on scikit-learn's handwritten digits
(upsampled to 16 x 16, 1347 training and 450 test images), scores its channels with
:func:`icprune.prune`'s defaults from what each layer reads over 512 training images, prunes
about half of its FLOPs (coupled residual channels together), repairs the layers that read the
pruned channels from the same statistics, re-estimates BatchNorm statistics, fine-tunes briefly
with distillation from the unpruned model, and prints test accuracy, MACs, parameters and
measured CPU latency before and after. The pruned model, its plan, the scores and a report
with plots go to ``--out``.

Run: ``icprune demo [--out DIR] [--force] [--quiet]`` (or ``python -m icprune demo``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from icprune.cli.output import RunFolder, claim, timed
from icprune.data import digits
from icprune.evaluation import accuracy, latency
from icprune.models import resnet20
from icprune.pruning import prune
from icprune.recovery.batchnorm import recalibrate_bn
from icprune.recovery.finetune import finetune
from icprune.report import ModelSummary, comparison_table
from icprune.structure.counting import count


@dataclass(frozen=True)
class DemoConfig:
    """The embedded defaults of the demo.

    Attributes:
        size: side of the upsampled digit images, in pixels.
        max_train: training images used (None: all 1347).
        train_epochs, train_lr: training of the unpruned model (SGD, cosine decay).
        finetune_epochs, finetune_lr: fine-tuning of the pruned model, distilling the unpruned.
        batch: images per training step.
        calib_images: training images whose feature maps are scored and re-estimate BatchNorm.
        flops_reduction: share of MACs to remove.
        latency_batch, latency_rounds: timing of both models on test images (interleaved).
        seed: seed of initialisation and batch order.
    """

    size: int = 16
    max_train: int | None = None
    train_epochs: int = 8
    train_lr: float = 0.1
    finetune_epochs: int = 3
    finetune_lr: float = 0.01
    batch: int = 128
    calib_images: int = 512
    flops_reduction: float = 0.5
    latency_batch: int = 256
    latency_rounds: int = 15
    seed: int = 0


class Shuffled:
    """Re-iterable ``(inputs, targets)`` batches in a new seeded order on every pass.

    Args:
        x: Tensor[N, ...] inputs; y: Tensor[N] int64 labels; batch: samples per batch;
        seed: seed of the sequence of orders.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self._generator)
        return ((self.x[i], self.y[i]) for i in order.split(self.batch))


def run_demo(
    out: str | os.PathLike = "icprune-demo",
    *,
    force: bool = False,
    progress: bool = True,
    config: DemoConfig = DemoConfig(),
) -> int:
    """Run the demo and write its results into ``out``.

    Args:
        out: folder to create (model.pt, plan.json, scores.json, report.md, report.json, PNGs).
        force: allow an existing ``out`` (the demo's files there are replaced).
        progress: tqdm bars for training, calibration and fine-tuning (only on a terminal).
        config: the embedded defaults (smaller ones make a quick smoke run).

    Returns:
        0 (the exit code of ``icprune demo``).
    """
    with RunFolder(claim(out, force=force, is_dir=True)) as folder:
        return _demo(folder, progress, config)


def _demo(folder: RunFolder, progress: bool, config: DemoConfig) -> int:
    torch.manual_seed(config.seed)
    data = digits(size=config.size, max_train=config.max_train)
    train = Shuffled(data.train_x, data.train_y, config.batch, config.seed)
    test = list(zip(data.test_x.split(512), data.test_y.split(512), strict=True))
    calib = list(data.train_x[: config.calib_images].split(config.batch))
    example = data.test_x[:1]
    print(
        f"icprune demo: ResNet-20 on scikit-learn's digits at {config.size}x{config.size} "
        f"({len(data.train_x)} training, {len(data.test_x)} test images)"
    )
    timings = {}
    model = resnet20(num_classes=10, in_channels=1)
    with timed(timings, "train_s"):
        finetune(
            model, train, config.train_epochs, lr=config.train_lr, progress=progress, inplace=True
        )
    with timed(timings, "score_plan_apply_s"):
        result = prune(model, calib, flops_reduction=config.flops_reduction, progress=progress)
    pruned = result.model
    with timed(timings, "recalibrate_bn_s"):
        recalibrate_bn(pruned, calib, progress=progress)
    recalibrated_accuracy = accuracy(pruned, test)
    with timed(timings, "finetune_s"):
        finetune(
            pruned,
            train,
            config.finetune_epochs,
            lr=config.finetune_lr,
            teacher=model,
            progress=progress,
            inplace=True,
        )
    settings = {
        "demo": asdict(config),
        "criterion": "icprune.prune defaults (greedy scores from the consumers' inputs, repair)",
        "accuracy_after_recalibration_only": recalibrated_accuracy,
    }
    folder.write_results(pruned=pruned, plan=result.plan, scores=result.scores, settings=settings)
    batch = data.test_x[: config.latency_batch]
    seconds = latency({"unpruned": model, "pruned": pruned}, batch, rounds=config.latency_rounds)
    before = ModelSummary(*count(model, example), accuracy(model, test), seconds["unpruned"])
    after = ModelSummary(*count(pruned, example), accuracy(pruned, test), seconds["pruned"])
    report = folder.write_report(
        plan=result.plan,
        scores=result.scores,
        before=before,
        after=after,
        settings=settings,
        timings=timings,
        title="icprune demo: ResNet-20 on digits",
    )
    print(f"\n{comparison_table(report)}")
    print(
        f"\naccuracy right after pruning and BatchNorm re-estimation: "
        f"{recalibrated_accuracy:.1%}; latency: batch of {len(batch)} test images, median of "
        f"{config.latency_rounds} interleaved rounds, {torch.get_num_threads()} threads"
    )
    print(
        f"wrote {folder.path}/: model.pt, plan.json, scores.json, report.md, report.json and plots"
    )
    return 0
