"""What ``icprune prune`` and ``icprune score`` do, given parsed arguments.

Everything that can be checked before the work is checked first, in this order: the options,
``--out`` (exists only with ``--force``/``--resume``, writable, not in use by another run), the
model, the data (readable, every image decoded), one forward pass of the model on a sample of
each data spec (``--input-shape`` or the data fit the model), and the labels that will be
used (within the model's classes). Library errors are reported in the words of the command
line (``--max-layer-ratio``, not ``max_layer_ratio``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from icprune.applying import apply
from icprune.batches import batch_input
from icprune.calibrate import CONSUMER_PARTS, InputStats, calibrate
from icprune.cli.data_specs import (
    IMAGE_EXTENSIONS,
    SYNTHETIC,
    TENSOR_EXTENSIONS,
    DataLoadError,
    DataSpec,
    load_data_spec,
)
from icprune.cli.exit_codes import CommandError, ExitCode
from icprune.cli.launch import Launch, start
from icprune.cli.output import (
    MODEL_FILE,
    PLAN_FILE,
    SCORES_FILE,
    RunFolder,
    check_scores_path,
    claim,
    timed,
    write_scores,
)
from icprune.cli.zoo import build_model
from icprune.criteria import DATA_CRITERIA
from icprune.evaluation import accuracy, latency
from icprune.files import FileReadError, load_torch_file
from icprune.planning import PruningPlan, plan
from icprune.recovery.batchnorm import LittleDataWarning, recalibrate_bn
from icprune.recovery.finetune import finetune
from icprune.report import ModelSummary, comparison_table
from icprune.scoring import LayerScores, score
from icprune.structure.counting import count
from icprune.structure.layers import PRUNABLE_TYPES, in_channels

#: Calibration checkpoint while the run is under way (``--resume`` continues from it).
CALIBRATION_FILE = "calibration.pt"
#: Library argument -> command-line option, to phrase library errors in the command's words.
_OPTIONS = {
    "flops_reduction": "--flops-reduction",
    "params_reduction": "--params-reduction",
    "max_layer_ratio": "--max-layer-ratio",
    "min_channels": "--min-channels",
    "round_to": "--round-to",
    "ignored_layers": "--ignore",
    "nan_policy": "--nan-policy",
    "ratio": "--ratio",
    "lr": "--lr",
    "train_data": "--data",
}
_ARGUMENT = re.compile(rf"(?<![\w-])({'|'.join(_OPTIONS)})(?:=(['\"]?)([^\s,;'\")]+)\2)?(?![\w-])")


def in_cli_words(message: str) -> str:
    """``message`` with the library's argument names replaced by the command's options:
    ``"max_layer_ratio=0.9"`` -> ``"--max-layer-ratio 0.9"``, ``"nan_policy='zero'"`` ->
    ``"--nan-policy zero"``."""

    def option(match: re.Match) -> str:
        flag = _OPTIONS[match.group(1)]
        return flag if match.group(3) is None else f"{flag} {match.group(3)}"

    return _ARGUMENT.sub(option, message)


@contextmanager
def _reworded() -> Iterator[None]:
    """Re-raise a library ``ValueError`` with its message :func:`in_cli_words`."""
    try:
        yield
    except ValueError as exc:
        if type(exc) is not ValueError:
            raise
        raise ValueError(in_cli_words(str(exc))) from None


def _checkpoint_name(rank: int, world_size: int) -> str:
    return CALIBRATION_FILE if world_size == 1 else f"calibration.rank{rank}.pt"


def _model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int] | None]:
    torch.manual_seed(args.seed)  # a zoo model without --weights is seeded, so runs repeat
    model, zoo_shape = build_model(args.model, args.weights, args.num_classes)
    shape = args.input_shape or zoo_shape
    modules = dict(model.named_modules())
    ignored = getattr(args, "ignore", None) or []
    example = next((n for n in modules if n), "conv1")
    if any(not name.strip() for name in ignored):
        raise CommandError(
            f"--ignore: an empty layer name; name layers by their qualified module names such "
            f"as {example!r}",
            ExitCode.USAGE,
        )
    unknown = [name for name in ignored if name not in modules]
    if unknown:
        raise CommandError(
            f"--ignore: {args.model} has no layer {unknown[0]!r}; layer names are qualified "
            f"module names such as {example!r}",
            ExitCode.USAGE,
        )
    return model, shape


def _is_tensor_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in TENSOR_EXTENSIONS and not Path(spec).is_dir()


def _data(spec: str | None, shape, args: argparse.Namespace, what: str) -> DataSpec | None:
    if spec is None:
        return None
    try:
        data = load_data_spec(
            spec, shape, batch_size=args.batch_size, max_samples=args.max_samples, seed=args.seed
        )
    except DataLoadError as exc:
        raise DataLoadError(f"{what}: {exc}") from exc
    given = args.input_shape
    if given is not None and _is_tensor_file(spec) and data.input_shape != tuple(given):
        raise DataLoadError(
            f"{what} {spec!r} holds samples of shape {data.input_shape}, but --input-shape "
            f"says {tuple(given)}: drop --input-shape (a tensor file gives the shape) or pass "
            f"the matching data"
        )
    if what != "--data" and not data.labelled:
        raise DataLoadError(f"{what} {spec!r} has no labels: {_labels_hint(spec)}")
    return data


def _labels_hint(spec: str) -> str:
    """How to give ``spec`` labels (naming an image that makes a folder unlabelled)."""
    folder = Path(spec)
    if folder.is_dir():
        loose = next(
            (p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS), None
        )
        if loose is not None:
            return (
                f"images directly in the folder (such as {loose.name!r}) carry no class; put "
                f"every image in a subfolder named after its class"
            )
    return "use a folder with one subfolder per class, or a tensor file with 'targets'"


def _example(data: DataSpec | None, shape) -> torch.Tensor:
    if data is not None:
        return batch_input(data.batches[0])[:1]
    if shape is None:
        raise CommandError(
            "the model's input shape is unknown: pass --input-shape C,H,W (or --data)",
            ExitCode.USAGE,
        )
    return torch.zeros(1, *shape)


def _first_layer(model: nn.Module) -> tuple[str, int] | None:
    """``(name, input channels)`` of the model's first conv or linear layer, if any."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            return name, in_channels(module)
    return None


def _fits(model: nn.Module, x: torch.Tensor, blame: str, code: ExitCode) -> int | None:
    """Run ``model`` once on one sample ``x`` ``[1, C, H, W]``: an error now, not after the
    work, if the input does not fit. Returns the number of outputs per sample (the classes)
    of a model whose output is ``[1, K]``, else None.

    Raises:
        CommandError (``code``): the forward pass failed; the message names ``blame`` (the
            option that gave the input) and the model's first layer if its channels differ.
    """
    try:
        with torch.no_grad():
            output = model(x)
    except Exception as exc:  # any failure of the forward means "this input does not fit"
        first = _first_layer(model)
        hint = ""
        if first is not None and first[1] != x.shape[1]:
            hint = f"; the model's first layer {first[0]!r} takes {first[1]} channels"
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CommandError(
            f"{blame}: the model cannot run on an input of shape {tuple(x.shape[1:])} "
            f"({type(exc).__name__}: {text}){hint}",
            code,
        ) from None
    if isinstance(output, torch.Tensor) and output.ndim == 2:
        return int(output.shape[1])
    return None


def _check_labels(data: DataSpec | None, spec: str, what: str, classes: int | None) -> None:
    """The labels of ``data`` lie in [0, classes) (unchecked when ``classes`` is None)."""
    if data is None or data.targets is None or classes is None:
        return
    low, high = int(data.targets.min()), int(data.targets.max())
    if low >= 0 and high < classes:
        return
    if Path(spec).is_dir():
        raise DataLoadError(
            f"{what} {spec!r} has {high + 1} class folders (labels 0 to {high}) but the model "
            f"has {classes} outputs; use a folder of at most {classes} classes (or a zoo model "
            f"with --num-classes {high + 1})"
        )
    bad = low if low < 0 else high
    raise DataLoadError(
        f"{what} {spec!r}: label {bad} is outside the model's {classes} classes (labels must "
        f"lie in [0, {classes})); fix the 'targets' of the file"
    )


def _check_inputs(model, args, data, val, shape, launch: Launch) -> torch.Tensor:
    """The example input of the run, after one forward pass of every data spec and a check
    of the labels the run will use (see the module docstring)."""
    example = _example(data, shape).to(launch.device)
    from_file = data is not None and _is_tensor_file(args.data)
    blame = f"--data {args.data!r}" if from_file else "--input-shape"
    classes = _fits(model, example, blame, ExitCode.DATA if from_file else ExitCode.USAGE)
    if getattr(args, "finetune_epochs", 0):
        _check_labels(data, args.data, "--data", classes)
    if val is not None:
        sample = batch_input(val.batches[0])[:1].to(launch.device)
        blame = f"--val-data {args.val_data!r}"
        from_file = _is_tensor_file(args.val_data)
        _fits(model, sample, blame, ExitCode.DATA if from_file else ExitCode.USAGE)
        _check_labels(val, args.val_data, "--val-data", classes)
    return example


def _settings(args: argparse.Namespace, **extra) -> dict[str, object]:
    keep = {k: v for k, v in vars(args).items() if k not in ("handler", "force", "quiet")}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in keep.items()}, **extra}


def _score(model, batches, source, args, launch, checkpoint=None) -> dict[str, LayerScores]:
    """:func:`icprune.score` with the command's options (``--criterion icii``: ``source``
    is ``"features"`` or ``"weights"``); its errors in the command's words."""
    options = {}
    if checkpoint is not None:
        options = {"checkpoint": checkpoint, "checkpoint_every": args.checkpoint_every}
    try:
        return score(
            model,
            batches,
            criterion="icii",
            source=source,
            lam=args.lam,
            nan_policy=args.nan_policy,
            distributed=launch.distributed and batches is not None,
            progress=not args.quiet and launch.rank == 0,
            **options,
        )
    except ValueError as exc:
        if type(exc) is not ValueError:
            raise
        message = in_cli_words(str(exc))
        if checkpoint is not None and repr(os.fspath(checkpoint)) in message:
            statement = message.split("; ")[0]  # the library's advice names its arguments
            raise CommandError(
                f"--resume: {statement}; resuming needs the model, data and scoring options of "
                f"the interrupted run: rerun it so, or with --force to start calibration over",
                ExitCode.OUTPUT,
            ) from None
        raise ValueError(message) from None


def _input_stats(model, batches, args) -> InputStats:
    """``icprune.calibrate(read_at="input")``: what every consumer layer reads, for the
    consumer-side criteria and for repair."""
    with _reworded():
        return calibrate(
            model,
            batches,
            read_at="input",
            parts=CONSUMER_PARTS,
            nan_policy=args.nan_policy,
            progress=not args.quiet,
        )


def _consumer_scores(model, data, criterion, args, example) -> tuple[dict, InputStats | None]:
    """Scores of a consumer-side criterion, and the input statistics they came from (None for
    the data-free ``wbn``)."""
    stats = None
    with _reworded():
        if criterion in DATA_CRITERIA:
            stats = _input_stats(model, data.batches, args)
            return score(model, stats=stats, criterion=criterion), stats
        return score(model, criterion=criterion, example_inputs=example), stats


def _scores(model, data, source, args, folder: RunFolder, launch) -> dict[str, LayerScores]:
    """Scores of every prunable layer under ``--criterion icii``: calibrated on ``data`` (this
    process's shard under torchrun) with a resumable checkpoint in the folder (features), or
    data-free (weights)."""
    if source == "weights":
        return _score(model, None, "weights", args, launch)
    checkpoint = folder.path / _checkpoint_name(launch.rank, launch.world_size)
    if args.force:  # --force starts over (taken after the folder's lock: see RunFolder)
        checkpoint.unlink(missing_ok=True)
    batches = data.shard(launch.rank, launch.world_size).batches
    return _score(model, batches, "features", args, launch, checkpoint)


def _criterion(args: argparse.Namespace) -> str:
    """``--criterion``, by default ``icii`` with ``--source``, else ``greedy`` with ``--data`` and
    ``wbn`` without (docs/quality.md)."""
    criterion = args.criterion
    if criterion is None:
        if args.source is not None:
            return "icii"
        return "greedy" if args.data is not None else "wbn"
    if criterion != "icii" and args.source is not None:
        raise CommandError(
            f"--source chooses the feature maps or the weights of --criterion icii; drop it "
            f"with --criterion {criterion}",
            ExitCode.USAGE,
        )
    if criterion in DATA_CRITERIA and args.data is None:
        raise CommandError(
            f"--criterion {criterion} scores from what each layer reads over --data: pass "
            f"--data, or use --criterion wbn (data-free)",
            ExitCode.USAGE,
        )
    return criterion


def _source(args: argparse.Namespace) -> str:
    """``--source``, defaulting to features with ``--data`` and weights without."""
    source = args.source or ("features" if args.data is not None else "weights")
    if source == "features" and args.data is None:
        raise CommandError(
            "--source features needs --data (or use --source weights)", ExitCode.USAGE
        )
    return source


def _check_prune_args(args: argparse.Namespace) -> tuple[str, str | None]:
    """The criterion and, for ``icii``, the scoring source, after checking the options that
    must combine."""
    criterion = _criterion(args)
    source = _source(args) if criterion == "icii" else None
    if args.finetune_epochs and args.data is None:
        raise CommandError("--finetune-epochs needs labelled --data", ExitCode.USAGE)
    if args.resume and args.force:
        raise CommandError(
            "--resume continues the calibration saved in --out and --force starts it over: "
            "pass one of them",
            ExitCode.USAGE,
        )
    if args.resume and source != "features":
        raise CommandError(
            "--resume continues an interrupted feature-map calibration of --criterion icii "
            "--source features; the other criteria calibrate in one pass without a checkpoint "
            "(rerun without --resume)",
            ExitCode.USAGE,
        )
    return criterion, source


def _check_resume(checkpoint: Path) -> None:
    """``--resume``: the checkpoint exists and is a complete, safe torch file."""
    if not checkpoint.is_file():
        why = "the run finished, or stopped before its first checkpoint"
        if not checkpoint.parent.is_dir():
            why = "--out does not exist"
        raise CommandError(
            f"--resume: there is no {os.fspath(checkpoint)!r} to continue from ({why}); run "
            f"without --resume (with --force to replace the files of an earlier run)",
            ExitCode.OUTPUT,
        )
    try:
        load_torch_file(checkpoint, "calibration checkpoint", mmap=True)  # tensors mapped, not read
    except FileReadError as exc:
        raise CommandError(
            f"--resume: {exc}; rerun with --force to start calibration over",
            ExitCode.OUTPUT,
        ) from None


def run_prune(args: argparse.Namespace) -> int:
    """``icprune prune``: score, plan, apply, recalibrate, fine-tune, write ``--out``, measure.

    Writes ``model.pt`` (:func:`icprune.save`), ``plan.json`` and ``scores.json`` into
    ``--out`` as soon as the model is pruned (and fine-tuned), then measures both models and
    writes the report (``report.json``, ``report.md``, PNG plots); prints the before/after
    table. While calibrating, ``--out/calibration.pt`` checkpoints the statistics (what
    ``--resume`` continues from); it is removed once the run has succeeded. ``--out`` is
    locked while the run writes it (see :class:`icprune.cli.output.RunFolder`).
    """
    criterion, source = _check_prune_args(args)
    launch = start(args.device)
    _check_single_process(criterion, launch)
    features = source == "features"
    own = _checkpoint_name(launch.rank, launch.world_size)
    resumable = [own] if features else []
    out = claim(args.out, force=args.force or args.resume, is_dir=True, resumable=resumable)
    if args.resume:
        _check_resume(out / own)
    launch.barrier()  # every process has checked --out before process 0 creates it
    names = [_checkpoint_name(r, launch.world_size) for r in range(launch.world_size)]
    folder = RunFolder(out, checkpoints=names if features else (), primary=launch.rank == 0)
    with folder:
        launch.barrier()  # process 0 has created and locked --out
        return _prune(args, criterion, source, launch, folder, names if features else [])


def _target(args: argparse.Namespace) -> tuple[str, float]:
    targets = {
        "flops_reduction": args.flops_reduction,
        "params_reduction": args.params_reduction,
        "ratio": args.ratio,
    }
    return next((k, v) for k, v in targets.items() if v is not None)


def _plan(model, scores, example, args) -> PruningPlan:
    """:func:`icprune.plan` with the command's options; its errors in the command's words, and
    a plan that prunes nothing refused."""
    name, value = _target(args)
    with _reworded():
        chosen = plan(
            model,
            scores,
            example_inputs=example,
            **{name: value},
            round_to=args.round_to,
            max_layer_ratio=args.max_layer_ratio,
            min_channels=args.min_channels,
            ignored_layers=args.ignore or [],
        )
    if chosen.params[1] == chosen.params[0]:
        raise CommandError(
            f"{_OPTIONS[name]} {value} prunes no channel here: it is less than one step of "
            f"pruning under --round-to {args.round_to}, --min-channels {args.min_channels}, "
            f"--max-layer-ratio {args.max_layer_ratio} and --ignore; raise the target or relax "
            f"those limits",
            ExitCode.FAILURE,
        )
    return chosen


def _check_single_process(criterion: str, launch: Launch) -> None:
    """Only ``--criterion icii`` combines the statistics of several processes."""
    if criterion != "icii" and launch.distributed:
        raise CommandError(
            f"--criterion {criterion} runs in one process; under torchrun use --criterion icii "
            f"(its statistics are combined across processes), or run without torchrun",
            ExitCode.USAGE,
        )


def _prune(
    args, criterion: str, source: str | None, launch: Launch, folder: RunFolder, checkpoints
) -> int:
    model, shape = _model(args)
    model.to(launch.device)
    data = _data(args.data, shape, args, "--data")
    val = _data(args.val_data, shape, args, "--val-data")
    if args.finetune_epochs and not data.labelled:
        raise DataLoadError(
            f"--finetune-epochs needs labels, and --data {args.data!r} has none: "
            f"{_labels_hint(args.data)}"
        )
    example = _check_inputs(model, args, data, val, shape, launch)
    progress = not args.quiet
    timings = {}
    stats = None
    with timed(timings, "score_s"):
        if criterion == "icii":
            scores = _scores(model, data, source, args, folder, launch)
        else:
            scores, stats = _consumer_scores(model, data, criterion, args, example)
    # Process 0 plans, prunes, measures and writes; under torchrun every process fine-tunes
    # (DistributedDataParallel), so each first makes the same plan from the same scores, and
    # repairs and re-estimates BatchNorm from all of the data: the same in every process.
    if launch.rank != 0 and not args.finetune_epochs:
        return ExitCode.OK
    progress = progress and launch.rank == 0
    real_data = data is not None and args.data != SYNTHETIC
    repair = real_data and not args.no_repair
    if repair and stats is None:
        with timed(timings, "repair_calibrate_s"):
            stats = _input_stats(model, data.batches, args)
    with timed(timings, "plan_apply_s"):
        chosen = _plan(model, scores, example, args)
        with _reworded():
            pruned = apply(model, chosen, stats=stats if repair else None)
    if real_data and not args.no_bn_recalibration:
        with timed(timings, "recalibrate_bn_s"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LittleDataWarning)
            recalibrate_bn(pruned, data.batches, progress=progress)
        for warning in caught:
            if issubclass(warning.category, LittleDataWarning):
                message = str(warning.message).replace(
                    "recalibrate_bn: ", "BatchNorm re-estimation: "
                )
                print(f"icprune: warning: {message}", file=sys.stderr)
            else:
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
    if args.finetune_epochs:
        train = data.batches
        if launch.distributed:  # complete rounds of full batches: the same steps everywhere
            train = data.shard(launch.rank, launch.world_size, batch_size=args.batch_size).batches
        with timed(timings, "finetune_s"), _reworded():
            finetune(
                pruned,
                train,
                args.finetune_epochs,
                lr=args.lr,
                teacher=None if args.no_distill else model,
                progress=progress,
                inplace=True,
                distributed=launch.distributed,
            )
    if launch.rank != 0:
        return ExitCode.OK
    _check_finite(model, pruned, example, args)
    settings = _settings(
        args,
        criterion=criterion,
        source=source,
        repaired=repair,
        data_description=data and data.description,
    )
    folder.write_results(pruned=pruned, plan=chosen, scores=scores, settings=settings)
    before, after, failure = _measure(model, pruned, example, val, args.latency_batch)
    if failure is not None:
        settings["latency_error"] = failure
        print(
            f"icprune: warning: latency not measured ({failure}); the report says n/a. The "
            f"model, plan and scores are written; try a smaller --latency-batch",
            file=sys.stderr,
        )
    report = folder.write_report(
        plan=chosen,
        scores=scores,
        before=before,
        after=after,
        settings=settings,
        timings=timings,
        title=f"icprune prune {args.model}",
    )
    folder.discard(checkpoints)  # the run is complete: nothing to resume
    print(comparison_table(report))
    print(
        f"\nwrote {folder.path}/: {MODEL_FILE} (load with icprune.load(path, <model factory>)), "
        f"{PLAN_FILE}, {SCORES_FILE}, report.md, report.json and plots"
    )
    return ExitCode.OK


def _finite_output(model: nn.Module, example: torch.Tensor) -> bool:
    with torch.no_grad():
        output = model(example)
    return not isinstance(output, torch.Tensor) or bool(torch.isfinite(output).all())


def _check_finite(model, pruned, example, args) -> None:
    """A pruned model whose output holds NaN/Inf where the unpruned model's does not (e.g.
    fine-tuning diverged at a huge ``--lr``) is an error, not a result."""
    if _finite_output(pruned, example) or not _finite_output(model, example):
        return
    if args.finetune_epochs:
        why = f"fine-tuning diverged (--finetune-epochs {args.finetune_epochs}, --lr {args.lr})"
        fix = "lower --lr"
    else:
        why = "pruning and BatchNorm re-estimation broke it"
        fix = "check --data"
    raise CommandError(
        f"the pruned model's output holds NaN/Inf on the example input, the unpruned model's "
        f"does not: {why}; nothing was written: {fix}",
        ExitCode.FAILURE,
    )


def _measure(model, pruned, example, val, latency_batch):
    """Before/after :class:`ModelSummary` and, if timing failed (e.g. out of memory), why."""
    macs = [count(m, example) for m in (model, pruned)]
    accs = [accuracy(m, val.batches) if val is not None else None for m in (model, pruned)]
    times, failure = [None, None], None
    if latency_batch:
        try:
            batch = example.expand(latency_batch, *example.shape[1:]).contiguous()
            timed = latency({"unpruned": model, "pruned": pruned}, batch)
            times = [timed["unpruned"], timed["pruned"]]
        except (RuntimeError, MemoryError) as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            failure = f"--latency-batch {latency_batch}: {lines[0]}"
    summaries = (ModelSummary(m[0], m[1], a, t) for m, a, t in zip(macs, accs, times, strict=True))
    return (*summaries, failure)


def run_score(args: argparse.Namespace) -> int:
    """``icprune score``: channel scores of every prunable layer, written to ``--out``
    (``.json`` or ``.csv``, see :func:`icprune.cli.output.write_scores`), atomically; without
    ``--force`` a file another run wrote meanwhile is left alone (OUTPUT)."""
    check_scores_path(args.out)
    criterion = _criterion(args)
    source = _source(args) if criterion == "icii" else None
    if source == "weights" and args.data is not None:
        raise CommandError("--source weights is data-free: drop --data", ExitCode.USAGE)
    if criterion == "wbn" and args.data is not None:
        raise CommandError("--criterion wbn is data-free: drop --data", ExitCode.USAGE)
    launch = start(args.device)
    _check_single_process(criterion, launch)
    out = claim(args.out, force=args.force, is_dir=False)
    launch.barrier()
    model, shape = _model(args)
    model.to(launch.device)
    data = _data(args.data, shape, args, "--data")
    example = None
    if data is not None:
        example = _check_inputs(model, args, data, None, shape, launch)
    if criterion == "icii":
        batches = data.shard(launch.rank, launch.world_size).batches if data is not None else None
        scores = _score(model, batches, source, args, launch)
    else:
        if example is None:
            example = _example(None, shape).to(launch.device)
        scores, _ = _consumer_scores(model, data, criterion, args, example)
    if launch.rank != 0:
        return ExitCode.OK  # process 0 writes
    settings = _settings(
        args, criterion=criterion, source=source, data_description=data and data.description
    )
    write_scores(scores, out, settings, replace=args.force)
    channels = sum(s.score.numel() for s in scores.values())
    what = criterion if source is None else f"{criterion}, {source}"
    print(f"scored {len(scores)} layers, {channels} channels ({what}); wrote {out}")
    return ExitCode.OK
