"""Run the comparison and write its report.

    python -m bench.quality [--quick] [--out DIR] [--results FILE] [--rows FILE]
        [--cache DIR | --no-cache] [--split both|selection] [--criteria 'A;B'|all]
        [--pipelines 'A;B'] [--no-progress] [--threads N] [--reuse FILE]

``make quality`` runs the full comparison (both splits, the diagnosis, the report). The protocol
is in :mod:`bench.quality`. ``--quick`` is a smoke test (two selection nets and one confirmation
net, one seed each, one target, one training epoch on 256 images). ``--split selection`` with
``--criteria``/``--pipelines`` is how candidates are explored without touching the
confirmation split. Trained networks are kept between runs in a user cache folder
(:func:`default_cache`; ``--cache DIR`` elsewhere, ``--no-cache`` none).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean

import torch
from tqdm.auto import tqdm

import icprune
from bench.quality import criteria, data, diagnosis, models, pipeline, report
from bench.quality.results import Results, Row
from bench.quality.train import TRAIN, Recipe, accuracy, trained

#: Criteria that may become a default (the others are baselines).
CANDIDATES_DATA = ("ICII feat", "ICII feat, act", "E2", "var", "condvar", "wE2", "wvar",
                   "wcondvar", "wcondvar, r=1", "greedy", "greedy, r=1e-1")  # fmt: skip
CANDIDATES_FREE = ("ICII wts", "IC wts", "ICII wts + L1", "wbn", "wbn + L1")
#: The pipeline each kind of default is chosen by: with data, repair + BN re-estimation; a
#: data-free score is judged with BN re-estimation only.
CHOICE_PIPELINE = {"data": "repair+bn", "data-free": "bn"}
#: Baselines measured on both splits.
BASELINES = ("random", "L1", "BN scale", "FPGM")


@dataclass(frozen=True)
class Config:
    """What one run measures.

    Attributes:
        selection, confirmation: ``(nets, seeds)`` of each split.
        targets: MAC reductions, each in (0, 1).
        selection_criteria: criteria measured on the selection split.
        selection_pipelines, confirmation_pipelines: recovery pipelines measured.
        study_criteria, study_pipelines: the repair study on the selection split (ridge, mean
            compensation alone, little data).
        train: the training recipe; max_train: use only this many training images.
        diagnosis: run the residual-net diagnosis (:mod:`bench.quality.diagnosis`).
    """

    selection: tuple[tuple[str, ...], tuple[int, ...]] = (models.SELECTION_NETS, (0, 1, 2, 3, 4))
    confirmation: tuple[tuple[str, ...], tuple[int, ...]] = (
        models.CONFIRMATION_NETS,
        (5, 6, 7, 8, 9),
    )
    targets: tuple[float, ...] = (0.3, 0.5, 0.7)
    selection_criteria: tuple[str, ...] = (*BASELINES, *CANDIDATES_FREE, *CANDIDATES_DATA)
    selection_pipelines: tuple[str, ...] = ("none", "bn", "repair+bn")
    confirmation_pipelines: tuple[str, ...] = ("none", "bn", "repair", "repair+bn")
    study_criteria: tuple[str, ...] = ("L1", "greedy")
    study_pipelines: tuple[str, ...] = (
        "bias", "repair r=1e-4", "repair", "repair r=1e-1", "repair r=1", "bn, 64 img",
        "repair+bn, 64 img",
    )  # fmt: skip
    train: Recipe = TRAIN
    max_train: int | None = None
    diagnosis: bool = True


FULL = Config()
QUICK = Config(
    selection=(("vgg", "resnet"), (0,)),
    confirmation=(("densenet-b",), (5,)),
    targets=(0.5,),
    selection_criteria=("random", "L1", "ICII wts", "ICII feat", "wbn", "wcondvar"),
    selection_pipelines=("bn", "repair+bn"),
    confirmation_pipelines=("bn", "repair+bn"),
    study_criteria=("L1",),
    study_pipelines=("repair",),
    train=Recipe(epochs=1, lr=0.05),
    max_train=256,
    diagnosis=True,
)


def choose(results: Results, split: str = "selection") -> dict[str, str]:
    """The defaults: the data criterion with the highest mean accuracy after ``repair+bn`` and
    the data-free one with the highest after ``bn``, over the nets, seeds and targets of
    ``split`` (ties: earlier candidate). Only candidates measured with that pipeline compete."""
    chosen = {}
    for kind, names in (("data", CANDIDATES_DATA), ("data-free", CANDIDATES_FREE)):
        where = dict(split=split, pipeline=CHOICE_PIPELINE[kind])
        scored = [(mean(v), -i, n) for i, n in enumerate(names)
                  if (v := results.values(criterion=n, **where))]  # fmt: skip
        if scored:
            chosen[kind] = max(scored)[2]
    return chosen


def _measure_split(
    results: Results,
    split: str,
    nets: Sequence[str],
    seeds: Sequence[int],
    blocks: Sequence[tuple[Sequence[str], Sequence[str]]],
    config: Config,
    digits: data.Digits,
    cache: Path | None,
    progress: bool,
) -> None:
    """Measure every ``(criteria, pipelines)`` block on every net and seed of the split (each
    net is trained, and each criterion scored, once)."""
    registry = criteria.registry()
    wanted: dict[str, list[str]] = {}
    for names, pipes in blocks:
        for name in names:
            wanted.setdefault(name, [])
            wanted[name] += [p for p in pipes if p not in wanted[name]]
    example = models.example_input()
    bar = tqdm(total=len(nets) * len(seeds) * len(wanted), desc=split, unit="criterion",
               disable=not progress)  # fmt: skip
    for arch in nets:
        for seed in seeds:
            t0 = time.perf_counter()
            model = trained(arch, seed, digits.train_x, digits.train_y, config.train, cache,
                            progress)  # fmt: skip
            results.seconds["train"] = results.seconds.get("train", 0) + time.perf_counter() - t0
            results.unpruned[f"{arch}/{seed}"] = accuracy(model, digits.test_x, digits.test_y)
            groups = icprune.dependency_groups(model, example)
            ctx = criteria.Context(model, groups, digits.calib, seed)
            for name, pipes in wanted.items():
                t0 = time.perf_counter()
                flows = [pipeline.PIPELINES[p] for p in pipes]
                scores = registry[name][0](ctx)
                for target in config.targets:
                    reached, accs = pipeline.measure(ctx, scores, target, flows, digits.test_x,
                                                     digits.test_y, example)  # fmt: skip
                    for p, acc in accs.items():
                        row = Row(split, arch, models.KINDS[arch], seed, name, target, p, acc,
                                  reached)  # fmt: skip
                        results.rows.append(row)
                key = f"measure {split}"
                results.seconds[key] = results.seconds.get(key, 0) + time.perf_counter() - t0
                bar.update()
    bar.close()


def confirmation_criteria(chosen: dict[str, str]) -> tuple[str, ...]:
    """What the confirmation split measures: the chosen defaults, icprune's current defaults
    (``ICII wts``, ``ICII feat``) and the baselines."""
    return tuple(dict.fromkeys([*chosen.values(), "ICII wts", "ICII feat", *BASELINES]))


def run(
    config: Config,
    splits: Sequence[str] = ("selection", "confirmation"),
    criteria_override: Sequence[str] | None = None,
    pipelines_override: Sequence[str] | None = None,
    cache: Path | None = None,
    progress: bool = True,
    reuse: Results | None = None,
) -> Results:
    """Train, prune, recover and measure every split in ``splits``; choose the defaults on the
    selection split (when measured) and run the diagnosis. Deterministic for a given config on
    a given machine. Without ``cache``, trained nets are kept in a temporary folder for the run
    (the diagnosis reuses the selection nets). With ``reuse`` (results saved by an earlier run
    of the same code), its selection rows and diagnosis are taken instead of measured again."""
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="icprune-quality-") as tmp:
            return run(config, splits, criteria_override, pipelines_override, Path(tmp),
                       progress, reuse)  # fmt: skip
    start = time.perf_counter()
    results = Results()
    results.settings = {
        "selection": [list(x) for x in config.selection],
        "confirmation": [list(x) for x in config.confirmation],
        "targets": list(config.targets),
        "train": repr(config.train),
        "max_train": config.max_train,
    }
    digits = data.load(config.max_train)
    if reuse is not None:
        results.rows = [r for r in reuse.rows if r.split == "selection"]
        results.unpruned = dict(reuse.unpruned)
        results.diagnosis = reuse.diagnosis
        results.chosen = choose(results)
        results.settings["reused"] = True
    elif "selection" in splits:
        names = criteria_override or config.selection_criteria
        pipes = pipelines_override or config.selection_pipelines
        blocks = [(names, pipes)]
        if criteria_override is None and pipelines_override is None:
            blocks.append((config.study_criteria, config.study_pipelines))
        _measure_split(results, "selection", *config.selection, blocks, config, digits, cache,
                       progress)  # fmt: skip
        results.chosen = choose(results)
    if "confirmation" in splits:
        if not results.chosen:
            raise ValueError("the confirmation split needs the defaults chosen on the selection")
        names = criteria_override or confirmation_criteria(results.chosen)
        pipes = pipelines_override or config.confirmation_pipelines
        _measure_split(results, "confirmation", *config.confirmation, [(names, pipes)], config,
                       digits, cache, progress)  # fmt: skip
    if config.diagnosis and "selection" in splits and reuse is None:
        t0 = time.perf_counter()
        nets, seeds = config.selection
        arch = next(a for a in nets if models.KINDS[a] == "residual")
        results.diagnosis = diagnosis.run(arch, seeds, digits, config.train, cache, progress)
        results.seconds["diagnosis"] = time.perf_counter() - t0
    results.seconds["total"] = time.perf_counter() - start
    return results


def default_cache() -> Path:
    """Where trained nets are kept between runs: ``$XDG_CACHE_HOME/icprune/bench-quality``
    (``~/.cache/icprune/bench-quality`` without it). A net is keyed by its architecture, seed,
    training recipe and training data (:func:`bench.quality.train.trained`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icprune" / "bench-quality"


def main(argv: Sequence[str] | None = None) -> Results:
    """Command line entry point; returns the results (for tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke test (well under a minute)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="quality.md/.png here")
    parser.add_argument("--results", type=Path, default=None,
                        help="timings file (default bench/results/cpu-quality.md; with --quick "
                             "or a partial run, in --out)")  # fmt: skip
    parser.add_argument("--rows", type=Path, default=None, help="also save all rows as JSON")
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_cache(),
        help=f"keep trained nets here (default {default_cache()}: a rerun trains nothing)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="train every net, keep none (ignores --cache)"
    )
    parser.add_argument("--split", choices=("both", "selection", "confirmation"), default="both")
    parser.add_argument(
        "--criteria", default=None, help="criteria names separated by ';' (or 'all')"
    )
    parser.add_argument("--pipelines", default=None, help="pipeline names separated by ';'")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="take the selection rows and the diagnosis from this --rows file of "
        "an earlier run instead of measuring them again",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these small nets gain little from "
        "more, and several threads slow down badly on a shared machine)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    names = None
    if args.criteria:
        names = list(criteria.registry()) if args.criteria == "all" else args.criteria.split(";")
    unknown = sorted(set(names or ()) - set(criteria.registry()))
    if unknown:
        parser.error(f"unknown criteria {unknown}; known: {list(criteria.registry())}")
    pipes = args.pipelines.split(";") if args.pipelines else None
    unknown = sorted(set(pipes or ()) - set(pipeline.PIPELINES))
    if unknown:
        parser.error(f"unknown pipelines {unknown}; known: {list(pipeline.PIPELINES)}")
    if args.split == "confirmation":
        parser.error("--split confirmation needs the selection split's choice; use --split both")
    config = QUICK if args.quick else FULL
    if args.split != "both":
        config = replace(config, diagnosis=False)
    splits = ("selection", "confirmation") if args.split == "both" else (args.split,)
    partial = args.quick or args.split != "both" or names is not None or pipes is not None
    partial = partial and args.reuse is None
    results_file = args.results
    if results_file is None:
        results_file = (
            args.out / "cpu-quality.md" if partial else Path("bench/results/cpu-quality.md")
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        reuse = Results.load(args.reuse) if args.reuse is not None else None
        cache = None if args.no_cache else args.cache
        results = run(config, splits, names, pipes, cache, not args.no_progress, reuse)
    finally:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rows is not None:
        results.save(args.rows)
    results.settings["threads"] = args.threads
    shown = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m bench.quality", *shown])
    report.write(results, args.out, results_file, command)
    print(f"wrote {args.out / 'quality.md'}, {args.out / 'quality.png'} and {results_file}")
    return results
