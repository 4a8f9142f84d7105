"""Cost of the compensated (double-double) sums of ChannelStats: update time with them / without.

For each ResNet-50 layer shape (:data:`bench.channel_stats.SHAPES`, one batch of ``--batch``
images) it times a whole ``ChannelStats.update`` with the compensated accumulation of sums and
Gram (:func:`icprune.stats.compensated.add_`) and with a plain float64 ``+=`` in its place,
alternating the two in every round on the same tensor, and reports the medians and the median of the
per-round ratios. It also times the accumulation step alone (``add_`` on a C x C Gram against
``+=``). Backend: ``auto`` (the C++ extension on the CPU, Triton on CUDA).

Run: ``python -m bench.compensated [--batch N] [--repeat R] [--out FILE]``; ``make bench`` writes
``bench/results/<device>-compensated.md``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from bench.channel_stats import SHAPES, device_name
from icprune.stats import channel_stats as stats_module
from icprune.stats.compensated import add_


def _plain_add(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor, x_lo=None) -> None:
    """The accumulation before compensated sums: ``hi += x`` (``lo`` stays 0)."""
    hi += x


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired(fn_plain, fn_comp, repeat: int, device: torch.device) -> tuple[float, float, float]:
    """(median plain s, median compensated s, median of per-round compensated/plain ratios)."""
    fn_plain(), fn_comp()  # warm-up
    plain, comp = [], []
    for _ in range(repeat):
        plain.append(_timed(fn_plain, device))
        comp.append(_timed(fn_comp, device))
    ratios = [c / p for p, c in zip(plain, comp, strict=True)]
    return statistics.median(plain), statistics.median(comp), statistics.median(ratios)


def _update_with(accumulate, stats: stats_module.ChannelStats, x: torch.Tensor):
    def run() -> None:
        saved = stats_module.add_
        stats_module.add_ = accumulate
        try:
            stats.update(x)
        finally:
            stats_module.add_ = saved

    return run


def run(batch: int, repeat: int) -> str:
    """The results table as Markdown."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = [
        "| C x H x W | update, plain += (ms) | update, compensated (ms) | ratio "
        "| accumulate C x C, += (ms) | add_ (ms) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, h, w in SHAPES:
        x = torch.randn(batch, c, h, w, generator=gen, device=device)
        stats = stats_module.ChannelStats(c, device=device, name=f"{c}x{h}x{w}")
        upd = paired(
            _update_with(_plain_add, stats, x), _update_with(add_, stats, x), repeat, device
        )
        f64 = {"dtype": torch.float64, "device": device}
        hi, lo, g = torch.zeros(c, c, **f64), torch.zeros(c, c, **f64), torch.rand(c, c, **f64)
        acc = paired(
            functools.partial(_plain_add, hi, lo, g),
            functools.partial(add_, hi, lo, g),
            repeat,
            device,
        )
        rows.append(
            f"| {c} x {h} x {w} | {upd[0] * 1e3:.2f} | {upd[1] * 1e3:.2f} | {upd[2]:.2f} "
            f"| {acc[0] * 1e3:.3f} | {acc[1] * 1e3:.3f} | {acc[2]:.1f} |"
        )
    head = (
        f"# Compensated sums: cost on {device_name()} ({torch.get_num_threads()} threads), "
        f"batch {batch}, median of {repeat} alternating rounds\n\n"
        "`python -m bench.compensated` (ratio = compensated / plain, median of per-round ratios)"
        "\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    """Parse the command line, print the table and optionally write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--repeat", type=int, default=15, help="alternating rounds (default 15)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    text = run(args.batch, args.repeat)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
