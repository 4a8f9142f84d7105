"""Run the comparison and write its report.

    python -m bench.quality [--quick] [--out DIR] [--results FILE] [--no-progress] [--threads N]

(``make quality`` runs the full comparison.) The protocol is in :mod:`bench.quality`; the
wall-clock time of the last full run is in bench/results/cpu-quality.md; ``--quick`` (one seed,
one target, six criteria, one training epoch on 256 images) takes well under a minute.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch
from tqdm.auto import tqdm

import icprune
from bench.quality import allocation, criteria, data, mask, models, report
from bench.quality.train import FINE_TUNE, TRAIN, Recipe, accuracy, train

ALLOCATIONS = ("same counts", "own")
#: Criteria that are also fine-tuned, besides the best ICII variant.
FINE_TUNED = (
    "L1 norm",
    "BN scale",
    "FPGM",
    "HRank",
    "random",
    "ICII feat",
    "ICII wts",
    "icprune default, feat",
)


@dataclass(frozen=True)
class Config:
    """What one run compares.

    Attributes:
        archs: model names (see :func:`bench.quality.models.build`).
        seeds: training seeds, one trained model per architecture and seed.
        targets: MAC reductions, each in (0, 1).
        train, fine_tune: the recipes.
        criteria: names from :func:`bench.quality.criteria.registry`; None = all.
        max_train: use only this many training images (None = all).
    """

    archs: tuple[str, ...] = models.ARCHS
    seeds: tuple[int, ...] = (0, 1, 2)
    targets: tuple[float, ...] = (0.3, 0.5, 0.7)
    train: Recipe = TRAIN
    fine_tune: Recipe = FINE_TUNE
    criteria: tuple[str, ...] | None = None
    max_train: int | None = None


FULL = Config()
QUICK = Config(
    seeds=(0,),
    targets=(0.5,),
    train=Recipe(epochs=1, lr=0.05),
    fine_tune=Recipe(epochs=1, lr=0.01),
    criteria=("ICII feat", "ICII wts", "icprune default", "L1 norm", "HRank", "random"),
    max_train=256,
)


@dataclass(frozen=True)
class Row:
    """One measured accuracy (fraction in [0, 1]) of a pruned model on the test split, and the
    MAC reduction (fraction) that its pruning achieved."""

    arch: str
    seed: int
    criterion: str
    target: float
    allocation: str
    stage: str
    accuracy: float
    reduction: float


@dataclass
class Results:
    """Everything a report needs: the config, the rows, the unpruned accuracy per
    ``(arch, seed)``, the best ICII variant and the wall-clock seconds per phase."""

    config: Config
    rows: list[Row] = field(default_factory=list)
    unpruned: dict[tuple[str, int], float] = field(default_factory=dict)
    best: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def mean(self, **where) -> float:
        """Mean accuracy of the rows whose fields equal ``where``."""
        items = where.items()
        values = [r.accuracy for r in self.rows if all(getattr(r, k) == v for k, v in items)]
        if not values:
            raise KeyError(f"no rows with {where}")
        return mean(values)


def best_variant(results: Results, names: Sequence[str]) -> str:
    """The ICII variant among ``names`` with the highest recalibrated accuracy with ``same
    counts``, averaged over every architecture, target and seed (ties: earlier name)."""
    scored = [
        (results.mean(criterion=n, allocation="same counts", stage="recalibrated"), -i, n)
        for i, n in enumerate(names)
    ]
    return max(scored)[2]


def _kept(
    costs: allocation.Costs, scores: dict[str, torch.Tensor], target: float, how: str
) -> dict[str, torch.Tensor]:
    if how == "own":
        return allocation.own_allocation(costs, scores, target)
    counts = allocation.same_counts(costs, target)
    return {name: allocation.keep_top(scores[name], k) for name, k in counts.items()}


def run(config: Config, progress: bool = True) -> Results:
    """Train every model, score it with every criterion, prune at every target with both
    allocations, recalibrate BN and measure; then fine-tune the main criteria. Deterministic
    for a given config on a given machine."""
    results = Results(config)
    start = time.perf_counter()
    digits = data.load(config.max_train)
    registry = criteria.registry()
    names = list(registry) if config.criteria is None else list(config.criteria)
    unknown = sorted(set(names) - set(registry))
    if unknown:
        raise ValueError(f"unknown criteria {unknown}; known: {list(registry)}")
    trained, all_scores, costs = {}, {}, {}
    tasks = len(config.archs) * len(config.seeds) * len(names) * len(config.targets) * 2
    bar = tqdm(total=tasks, desc="prune+recalibrate", unit="model", disable=not progress)
    for arch in config.archs:
        for seed in config.seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = models.build(arch)
            desc = f"train {arch}/{seed}"
            train(model, digits.train_x, digits.train_y, config.train, seed, desc, progress)
            results.seconds["train"] = results.seconds.get("train", 0.0) + time.perf_counter() - t0
            results.unpruned[arch, seed] = accuracy(model, digits.test_x, digits.test_y)
            pruned = models.pruned_layers(model)
            costs[arch] = allocation.costs(model, pruned, models.example_input())
            trained[arch, seed] = (model, pruned)
            ctx = criteria.Context(model, digits.calib, pruned, seed)
            for name in names:
                t0 = time.perf_counter()
                scores = all_scores[arch, seed, name] = registry[name](ctx)
                results.seconds["score"] = (
                    results.seconds.get("score", 0.0) + time.perf_counter() - t0
                )
                for target in config.targets:
                    for how in ALLOCATIONS:
                        keep = _kept(costs[arch], scores, target, how)
                        acc, cut = _measure(model, pruned, keep, costs[arch], digits)
                        row = Row(arch, seed, name, target, how, "recalibrated", acc, cut)
                        results.rows.append(row)
                        bar.update()
    bar.close()
    results.seconds["prune+recalibrate"] = (
        time.perf_counter() - start - results.seconds["train"] - results.seconds["score"]
    )
    candidates = [n for n in criteria.variants() if n in names]
    results.best = best_variant(results, candidates) if candidates else ""
    tuned = [n for n in names if n in FINE_TUNED or n == results.best]
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(trained) * len(tuned) * len(config.targets),
        desc="fine-tune",
        unit="model",
        disable=not progress,
    )
    for (arch, seed), (model, pruned) in trained.items():
        for name in tuned:
            for target in config.targets:
                keep = _kept(costs[arch], all_scores[arch, seed, name], target, "same counts")
                tune = config.fine_tune
                acc, cut = _measure(model, pruned, keep, costs[arch], digits, tune, seed)
                row = Row(arch, seed, name, target, "same counts", "fine-tuned", acc, cut)
                results.rows.append(row)
                bar.update()
    bar.close()
    results.seconds["fine-tune"] = time.perf_counter() - t0
    results.seconds["total"] = time.perf_counter() - start
    return results


def _measure(
    model: torch.nn.Module,
    pruned: Sequence[models.Prunable],
    keep: dict[str, torch.Tensor],
    costs: allocation.Costs,
    digits: data.Digits,
    fine_tune: Recipe | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Mask ``keep`` into a copy of ``model``, recalibrate its BN on the calibration data,
    optionally fine-tune it (with ``seed``); returns its test accuracy and MAC reduction."""
    pruned_model = mask.masked(model, pruned, keep)
    icprune.recalibrate_bn(pruned_model, digits.calib, progress=False)
    if fine_tune is not None:
        train(pruned_model, digits.train_x, digits.train_y, fine_tune, seed, progress=False)
    counts = {layer: int(k.sum()) for layer, k in keep.items()}
    acc = accuracy(pruned_model, digits.test_x, digits.test_y)
    return acc, allocation.reduction(costs, counts)


def main(argv: Sequence[str] | None = None) -> Results:
    """Command line entry point; returns the results (for tests)."""
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 target")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="quality.md/.png here")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="timings file (default bench/results/cpu-quality.md; with --quick, in --out)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these small models gain little from more, and "
        "several threads slow down badly on a machine shared with other jobs)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    config = QUICK if args.quick else FULL
    results_file = args.results
    if results_file is None:
        quick_file = args.out / "cpu-quality.md"
        results_file = quick_file if args.quick else Path("bench/results/cpu-quality.md")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run(config, progress=not args.no_progress)
        report.write(results, args.out, results_file, quick=args.quick)
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {args.out / 'quality.md'}, {args.out / 'quality.png'} and {results_file}")
    return results
