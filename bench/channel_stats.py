"""Benchmark of the reference ChannelStats: update throughput and calibration overhead.

Prints two tables, measured side by side in one run on this machine:

1. ``ChannelStats.update`` throughput (GB/s of fp32 feature map read) at ResNet-50 layer
   shapes, next to a plain ``x.clone()`` of the same tensor (the copy roofline of this device).
2. ResNet-50 calibration overhead: a forward with every prunable layer's statistics collected,
   divided by a plain forward on the same batches (both in eval mode, no grad).

Run: ``python bench/channel_stats.py [--batch N] [--repeat R] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from icprune.calibrate import calibrate
from icprune.models import resnet50
from icprune.stats import ChannelStats

#: (C, H, W) of ResNet-50 feature maps at 224x224: early wide maps to late narrow ones.
SHAPES = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def best_of(fn, repeat: int) -> float:
    """Fastest wall time of ``repeat`` calls, in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def throughput_table(batch: int, repeat: int) -> list[str]:
    """Markdown rows: update throughput (GB/s) of Tensor[batch, C, H, W] fp32 per SHAPES entry,
    beside the copy bandwidth of the same tensor."""
    rows = [
        "| C x H x W | MB | copy GB/s | reference GB/s | reference / copy |",
        "|---|---|---|---|---|",
    ]
    for c, h, w in SHAPES:
        x = torch.randn(batch, c, h, w)
        gb = x.numel() * x.element_size() / 1e9
        copy_s = best_of(x.clone, repeat)
        ref_s = best_of(lambda c=c, x=x: ChannelStats(c).update(x), repeat)
        rows.append(
            f"| {c}x{h}x{w} | {gb * 1e3:.0f} | {gb / copy_s:.2f} | {gb / ref_s:.3f} | "
            f"{copy_s / ref_s:.4f} |"
        )
    return rows


def overhead_table(batch: int, repeat: int) -> list[str]:
    """Markdown rows: seconds of a plain ResNet-50 forward on Tensor[batch, 3, 224, 224] and of a
    calibration forward on the same batch, and their ratio."""
    torch.manual_seed(0)
    model = resnet50().eval()
    batches = [torch.randn(batch, 3, 224, 224)]

    def plain():
        with torch.no_grad():
            model(batches[0])

    plain_s = best_of(plain, repeat)
    calib_s = best_of(lambda: calibrate(model, batches, progress=False), repeat)
    return [
        "| plain forward s | calibration forward s | overhead (calibration / plain) |",
        "|---|---|---|",
        f"| {plain_s:.3f} | {calib_s:.3f} | {calib_s / plain_s:.2f}x |",
    ]


def main() -> None:
    """Parse the command line, print both tables and optionally write them to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size N (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats, best kept")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()
    header = (
        f"# ChannelStats reference on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}"
    )
    lines = [header, "", "## update throughput (fp32 NCHW)", ""]
    lines += throughput_table(args.batch, args.repeat)
    lines += ["", "## ResNet-50 calibration overhead (every prunable layer, read_at='bn')", ""]
    lines += overhead_table(args.batch, args.repeat)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
