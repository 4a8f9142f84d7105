"""What ``icprune prune`` and ``icprune score`` do, given parsed arguments."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from icprune.applying import apply
from icprune.calibrate import batch_input
from icprune.cli.exit_codes import CommandError, ExitCode
from icprune.cli.launch import start
from icprune.cli.output import (
    MODEL_FILE,
    PLAN_FILE,
    SCORES_FILE,
    check_scores_path,
    claim,
    timed,
    write_run,
    write_scores,
    writing,
)
from icprune.counting import count
from icprune.evaluation import accuracy, latency
from icprune.finetune import finetune
from icprune.planning import plan
from icprune.recalibrate import recalibrate_bn
from icprune.report import ModelSummary, comparison_table
from icprune.scoring import LayerScores, score
from icprune.sources import SYNTHETIC, DataLoadError, Source, load_source
from icprune.zoo import build_model

#: Calibration checkpoint while the run is under way (``--resume`` continues from it).
CALIBRATION_FILE = "calibration.pt"


def _model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int] | None]:
    torch.manual_seed(args.seed)  # a zoo model without --weights is seeded, so runs repeat
    model, zoo_shape = build_model(args.model, args.weights, args.num_classes)
    shape = args.input_shape or zoo_shape
    modules = dict(model.named_modules())
    unknown = [name for name in getattr(args, "ignore", None) or [] if name not in modules]
    if unknown:
        raise CommandError(
            f"--ignore: {args.model} has no layer {unknown[0]!r}; layer names are qualified "
            f"module names such as {next(n for n in modules if n)!r}",
            ExitCode.USAGE,
        )
    return model, shape


def _data(spec: str | None, shape, args: argparse.Namespace, what: str) -> Source | None:
    if spec is None:
        return None
    try:
        source = load_source(
            spec, shape, batch_size=args.batch_size, max_samples=args.max_samples, seed=args.seed
        )
    except DataLoadError as exc:
        raise DataLoadError(f"{what}: {exc}") from exc
    if what != "--data" and not source.labelled:
        raise DataLoadError(
            f"{what} {spec!r} has no labels: use a folder with one subfolder per class, or a "
            f"tensor file with 'targets'"
        )
    return source


def _example(data: Source | None, shape) -> torch.Tensor:
    if data is not None:
        return batch_input(data.batches[0])[:1]
    if shape is None:
        raise CommandError(
            "the model's input shape is unknown: pass --input-shape C,H,W (or --data)",
            ExitCode.USAGE,
        )
    return torch.zeros(1, *shape)


def _settings(args: argparse.Namespace, **extra) -> dict[str, object]:
    keep = {k: v for k, v in vars(args).items() if k not in ("handler", "force", "quiet")}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in keep.items()}, **extra}


def _scores(model, data, source_kind, args, out, launch) -> dict[str, LayerScores]:
    """Scores of every prunable layer: calibrated on ``data`` (this process's shard under
    torchrun) with a resumable checkpoint in ``out`` (features), or data-free (weights)."""
    if source_kind == "weights":
        return score(model, source="weights", lam=args.lam)
    name = CALIBRATION_FILE if not launch.distributed else f"calibration.rank{launch.rank}.pt"
    checkpoint = out / name
    if args.force and not args.resume:
        checkpoint.unlink(missing_ok=True)  # --force starts over, --resume continues
    with writing(out):
        out.mkdir(exist_ok=True)
    return score(
        model,
        data.shard(launch.rank, launch.world_size).batches,
        lam=args.lam,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        distributed=launch.distributed,
        progress=not args.quiet and launch.rank == 0,
    )


def _source_kind(args: argparse.Namespace) -> str:
    """``--source``, defaulting to features with ``--data`` and weights without."""
    source_kind = args.source or ("features" if args.data is not None else "weights")
    if source_kind == "features" and args.data is None:
        raise CommandError(
            "--source features needs --data (or use --source weights)", ExitCode.USAGE
        )
    return source_kind


def _check_prune_args(args: argparse.Namespace) -> str:
    """The scoring source, after checking the options that must combine."""
    source_kind = _source_kind(args)
    if args.finetune_epochs and args.data is None:
        raise CommandError("--finetune-epochs needs labelled --data", ExitCode.USAGE)
    return source_kind


def run_prune(args: argparse.Namespace) -> int:
    """``icprune prune``: score, plan, apply, recalibrate, fine-tune, measure, write ``--out``.

    Writes ``model.pt`` (:func:`icprune.save`), ``plan.json``, ``scores.json`` and the report
    (``report.json``, ``report.md``, PNG plots) into ``--out``; prints the before/after table.
    While calibrating, ``--out/calibration.pt`` checkpoints the statistics (what ``--resume``
    continues from); it is removed once the run has succeeded.
    """
    source_kind = _check_prune_args(args)
    launch = start(args.device)
    out = claim(args.out, force=args.force or args.resume, is_dir=True)
    launch.barrier()  # every process has checked --out before process 0 creates it
    model, shape = _model(args)
    model.to(launch.device)
    data = _data(args.data, shape, args, "--data")
    val = _data(args.val_data, shape, args, "--val-data")
    if args.finetune_epochs and not data.labelled:
        raise DataLoadError(
            f"--finetune-epochs needs labels, and --data {args.data!r} has none: use a folder "
            f"with one subfolder per class, or a tensor file with 'targets'"
        )
    example = _example(data, shape).to(launch.device)
    progress = not args.quiet
    timings = {}
    with timed(timings, "score_s"):
        scores = _scores(model, data, source_kind, args, out, launch)
    if launch.rank != 0:
        return ExitCode.OK  # process 0 plans, prunes, measures and writes
    targets = {
        "flops_reduction": args.flops_reduction,
        "params_reduction": args.params_reduction,
        "ratio": args.ratio,
    }
    with timed(timings, "plan_apply_s"):
        chosen = plan(
            model,
            scores,
            example_inputs=example,
            **{k: v for k, v in targets.items() if v is not None},
            round_to=args.round_to,
            max_layer_ratio=args.max_layer_ratio,
            ignored_layers=args.ignore or [],
        )
        pruned = apply(model, chosen)
    if data is not None and args.data != SYNTHETIC:
        with timed(timings, "recalibrate_bn_s"):
            recalibrate_bn(pruned, data.batches, progress=progress)
    if args.finetune_epochs:
        with timed(timings, "finetune_s"):
            finetune(
                pruned,
                data.batches,
                args.finetune_epochs,
                lr=args.lr,
                teacher=None if args.no_distill else model,
                progress=progress,
                inplace=True,
            )
    before, after = _measure(model, pruned, example, val, args.latency_batch)
    settings = _settings(args, source=source_kind, data_description=data and data.description)
    report = write_run(
        out,
        pruned=pruned,
        plan=chosen,
        scores=scores,
        before=before,
        after=after,
        settings=settings,
        timings=timings,
        title=f"icprune prune {args.model}",
    )
    with writing(out):
        for checkpoint in out.glob("calibration*.pt"):
            checkpoint.unlink()  # the run is complete: nothing to resume
    print(comparison_table(report))
    print(
        f"\nwrote {out}/: {MODEL_FILE} (load with icprune.load(path, <model factory>)), "
        f"{PLAN_FILE}, {SCORES_FILE}, report.md, report.json and plots"
    )
    return ExitCode.OK


def _measure(model, pruned, example, val, latency_batch):
    macs = [count(m, example) for m in (model, pruned)]
    accs = [accuracy(m, val.batches) if val is not None else None for m in (model, pruned)]
    times = [None, None]
    if latency_batch:
        batch = example.expand(latency_batch, *example.shape[1:]).contiguous()
        timed = latency({"unpruned": model, "pruned": pruned}, batch)
        times = [timed["unpruned"], timed["pruned"]]
    return tuple(ModelSummary(m[0], m[1], a, t) for m, a, t in zip(macs, accs, times, strict=True))


def run_score(args: argparse.Namespace) -> int:
    """``icprune score``: channel scores of every prunable layer, written to ``--out``
    (``.json`` or ``.csv``, see :func:`icprune.cli.output.write_scores`)."""
    check_scores_path(args.out)
    source_kind = _source_kind(args)
    if source_kind == "weights" and args.data is not None:
        raise CommandError("--source weights is data-free: drop --data", ExitCode.USAGE)
    launch = start(args.device)
    out = claim(args.out, force=args.force, is_dir=False)
    launch.barrier()
    model, shape = _model(args)
    model.to(launch.device)
    data = _data(args.data, shape, args, "--data")
    scores = score(
        model,
        data.shard(launch.rank, launch.world_size).batches if data is not None else None,
        source=source_kind,
        lam=args.lam,
        distributed=launch.distributed and data is not None,
        progress=not args.quiet and launch.rank == 0,
    )
    if launch.rank != 0:
        return ExitCode.OK  # process 0 writes
    settings = _settings(args, source=source_kind, data_description=data and data.description)
    with writing(out):
        write_scores(scores, out, settings)
    channels = sum(s.score.numel() for s in scores.values())
    print(f"scored {len(scores)} layers, {channels} channels ({source_kind}); wrote {out}")
    return ExitCode.OK
