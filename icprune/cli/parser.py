"""The ``icprune`` argument parser: one small function per command and per group of options.

:func:`build_parser` is all the command line knows about its arguments (names, types, ranges,
defaults, help); :mod:`icprune.cli` runs it, :mod:`icprune.cli.commands` acts on what it parsed.
"""

from __future__ import annotations

import argparse
import math

from icprune.cli.zoo import ZOO
from icprune.scoring import CRITERIA

EPILOG = (
    "exit codes: 0 ok, 1 the run failed, 2 bad arguments, 3 model cannot be loaded, "
    "4 data cannot be read, 5 --out exists, is in use or cannot be written, 130 interrupted"
)
MODEL_HELP = (
    f"a zoo model ({', '.join(ZOO)}) or your own as 'package.module:factory' (a function "
    f"taking no arguments that returns the nn.Module)"
)
DATA_HELP = (
    "an image folder (one subfolder per class gives labels), a .pt/.npy/.npz tensor file of "
    "normalised inputs [N, C, H, W] (optionally with 'targets'), or 'synthetic' (noise)"
)


def _number(cast, what: str, low: float, high: float = math.inf, open_low=False, open_high=True):
    """An argparse type: ``cast(text)`` checked to lie in the interval ``what`` describes."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below and math.isfinite(float(value))):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_fraction = _number(float, "a number in (0, 1)", 0, 1, open_low=True)
_positive_int = _number(int, "an integer >= 1", 1)
_count = _number(int, "an integer >= 0", 0)
_positive = _number(float, "a finite number > 0", 0, open_low=True)
#: The largest --latency-batch: larger batches say nothing more about speed, and can exhaust
#: the memory after all the work (the results are written before latency is measured).
MAX_LATENCY_BATCH = 1024
_latency_batch = _number(
    int, f"an integer in [0, {MAX_LATENCY_BATCH}]", 0, MAX_LATENCY_BATCH, open_high=False
)
#: The largest --lam: beyond it the fused score is independence alone, and overflows soon.
MAX_LAM = 1e6
_lam = _number(float, f"a number in [0, {MAX_LAM:g}]", 0, MAX_LAM, open_high=False)
_seed = _number(int, "an integer in [-2**63, 2**64)", -(2**63), 2**64)


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,224,224, got {text!r}")
    return shape


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The options every model command takes: the model, its data sizes, scoring, device, seed
    and output."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="checkpoint of a zoo model (state_dict; read with weights_only=True)",
    )
    parser.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="classes of a zoo model (default: the checkpoint's, else the zoo's)",
    )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="input of one sample (default: the zoo model's, e.g. 3,224,224)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="N",
        help="samples per batch (default 32)",
    )
    parser.add_argument(
        "--max-samples",
        type=_positive_int,
        default=256,
        metavar="N",
        help="use at most N samples of --data (default 256)",
    )
    _scoring_options(parser)
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N; under torchrun each "
        "process uses cuda:LOCAL_RANK (default auto)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of random initialisation, image subsets and noise (default 0)",
    )
    _output_options(parser)


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    """How channels are scored: --criterion, --source, --lam, --nan-policy."""
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="how channels are scored (docs/quality.md): greedy (default with --data: what the "
        "layers reading a channel lose after a least-squares re-fit), wbn (default without "
        "--data: consumer weight energy x BatchNorm second moment), wcondvar, wvar, wE2, or "
        "icii (the paper's capacity + independence; default when --source is given)",
    )
    parser.add_argument(
        "--source",
        choices=("features", "weights"),
        help="--criterion icii: score from feature maps over --data, or data-free from the "
        "weights (default: features with --data, else weights)",
    )
    parser.add_argument(
        "--lam",
        type=_lam,
        default=1.0,
        help=f"--criterion icii: weight of independence against capacity, in [0, {MAX_LAM:g}] "
        f"(default 1)",
    )
    parser.add_argument(
        "--nan-policy",
        choices=("raise", "zero"),
        default="raise",
        help="a NaN/Inf value in a feature map (or weight): stop with an error naming the layer "
        "(raise, the default), or count it and score it as 0 (zero)",
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    """--force and --quiet."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite the files icprune writes in an existing --out",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``icprune`` argument parser with its three subcommands (``prune``, ``score``,
    ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="icprune",
        description="Prune CNN filters by information capacity and independence.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (summary, description, add_options) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description, epilog=EPILOG)
        add_options(command)
        command.set_defaults(handler=name)
    return parser


def _prune_command(parser: argparse.ArgumentParser) -> None:
    """``icprune prune``: the model and data options, the target, the limits, recovery, output."""
    _model_options(parser)
    parser.add_argument("--data", metavar="SRC", help=DATA_HELP)
    _target_options(parser)
    _limit_options(parser)
    _recovery_options(parser)
    _calibration_options(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create")


def _target_options(parser: argparse.ArgumentParser) -> None:
    """The pruning target: exactly one of --flops-reduction, --params-reduction, --ratio."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--flops-reduction",
        type=_fraction,
        metavar="F",
        help="remove this fraction of MACs, in (0, 1)",
    )
    target.add_argument(
        "--params-reduction",
        type=_fraction,
        metavar="F",
        help="remove this fraction of parameters, in (0, 1)",
    )
    target.add_argument(
        "--ratio",
        type=_fraction,
        metavar="F",
        help="remove this fraction of scored channels, in (0, 1)",
    )


def _limit_options(parser: argparse.ArgumentParser) -> None:
    """What the plan may not do: --round-to, --max-layer-ratio, --min-channels, --ignore."""
    parser.add_argument(
        "--round-to",
        type=_positive_int,
        default=1,
        metavar="N",
        help="keep a multiple of N channels per group (default 1)",
    )
    parser.add_argument(
        "--max-layer-ratio",
        type=_fraction,
        default=0.9,
        metavar="F",
        help="prune at most this fraction of any group (default 0.9)",
    )
    parser.add_argument(
        "--min-channels",
        type=_positive_int,
        default=1,
        metavar="N",
        help="every group keeps at least N channels (default 1)",
    )
    parser.add_argument(
        "--ignore",
        nargs="+",
        action="extend",
        metavar="LAYER",
        help="qualified names of layers never pruned",
    )


def _recovery_options(parser: argparse.ArgumentParser) -> None:
    """Repair, BatchNorm re-estimation, fine-tuning and the measurements after them:
    --no-repair, --no-bn-recalibration, --finetune-epochs, --lr, --no-distill, --val-data,
    --latency-batch."""
    parser.add_argument(
        "--no-repair",
        action="store_true",
        help="do not repair the layers that read pruned channels (default with --data: "
        "least-squares re-fit of their kept weights and bias compensation from the "
        "statistics of their inputs)",
    )
    parser.add_argument(
        "--no-bn-recalibration",
        action="store_true",
        help="do not re-estimate the BatchNorm statistics on --data after pruning (advised "
        "when --data is small or unrepresentative: it can hurt then)",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=_count,
        default=0,
        metavar="N",
        help="fine-tune on labelled --data for N epochs (default 0)",
    )
    parser.add_argument(
        "--lr", type=_positive, default=0.01, help="fine-tuning learning rate (default 0.01)"
    )
    parser.add_argument(
        "--no-distill",
        action="store_true",
        help="fine-tune on labels only (default: also distil the unpruned model)",
    )
    parser.add_argument(
        "--val-data", metavar="SRC", help="labelled data to measure accuracy before and after"
    )
    parser.add_argument(
        "--latency-batch",
        type=_latency_batch,
        default=8,
        metavar="N",
        help=f"time both models on N copies of one sample, after the results are written "
        f"(default 8; 0: skip; at most {MAX_LATENCY_BATCH})",
    )


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    """Resumable calibration: --checkpoint-every, --resume."""
    parser.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=10,
        metavar="K",
        help="checkpoint the calibration statistics to --out/calibration.pt every K batches "
        "(default 10)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted or failed run from its --out/calibration.pt (same model, "
        "data and scoring options; the pruning options may change)",
    )


def _score_command(parser: argparse.ArgumentParser) -> None:
    """``icprune score``: the model and data options, and the file to write."""
    _model_options(parser)
    parser.add_argument("--data", metavar="SRC", help=DATA_HELP)
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="scores.json or scores.csv to create"
    )


def _demo_command(parser: argparse.ArgumentParser) -> None:
    """``icprune demo``: the output folder only."""
    parser.add_argument(
        "--out",
        default="icprune-demo",
        metavar="DIR",
        help="folder to create (default ./icprune-demo)",
    )
    _output_options(parser)


#: The subcommands: name -> (one-line help, description, the function adding its options).
COMMANDS = {
    "prune": (
        "prune a model to a FLOPs/params/channel target and report",
        "Score every channel, plan the pruning (coupled channels together), build the smaller "
        "model, re-estimate BatchNorm statistics on --data, optionally fine-tune, then write "
        "the model, its plan, scores and a report to --out.",
        _prune_command,
    ),
    "score": (
        "write every channel's capacity, independence and score",
        "Score every output channel of every prunable layer and write the scores as JSON or "
        "CSV (one row per channel).",
        _score_command,
    ),
    "demo": (
        "the whole job on bundled digits, no downloads (what `make demo` runs)",
        "Train a small residual CNN on scikit-learn's bundled digits, score it, prune about "
        "half its FLOPs, re-estimate BatchNorm, fine-tune briefly, and print accuracy, MACs, "
        "parameters and latency before and after; write the report to --out.",
        _demo_command,
    ),
}
