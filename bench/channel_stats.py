"""Benchmark of the ChannelStats backends: throughput, calibration overhead, HRank/CHIP ratios.

Prints four tables, all measured side by side in one run on this device (medians of repeats):

1. Batch-statistics throughput (GB/s of fp32 feature map read) at ResNet-50 layer shapes, per
   backend, next to ``y.copy_(x)`` of the same tensor into a preallocated ``y`` (the copy
   roofline of this device, measured here) and the naive per-channel ``torch.histc`` loop.
   "histogram pass" is the one-pass kernel alone (histogram, extremes, sums); "update" is a whole
   ``ChannelStats.update`` (plus the Gram matrix and the exact rebinning).
2. Where an update's time goes on ResNet-50 (every prunable layer, one batch): histogram pass
   vs Gram matrix, and the FLOPs of all Gram matrices vs the forward pass.
3. ResNet-50 calibration overhead: a forward with every prunable layer's statistics collected
   (default ``read_at="bn"``), divided by a plain forward on the same batch, per backend.
4. Scoring time of HRank-style (matrix rank of every H x W map) and CHIP-style (nuclear norm with
   each channel removed) baselines, batched (:mod:`icprune.baselines`), over ours (statistics +
   scores) on the same feature maps of a CIFAR ResNet-56, as their-time / our-time.

Run: ``python bench/channel_stats.py [--batch N] [--repeat R] [--out FILE | --write]``;
``make bench`` (``--write``) writes ``bench/results/<device>-channel_stats.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from icprune.baselines import chip, hrank
from icprune.calibrate import calibrate
from icprune.models import resnet50, resnet56
from icprune.scoring import layer_scores
from icprune.stats import backends
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.gram import gram_syrk
from icprune.structure.graph import prunable_layers, read_points

#: (C, H, W) of ResNet-50 feature maps at 224x224: early wide maps to late narrow ones.
SHAPES = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
BINS = 64


def device_name() -> str:
    """Short name of the device the benchmark runs on: ``cpu``, or e.g. ``h100`` for a GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    words = torch.cuda.get_device_name().lower().replace("nvidia", "").split()
    return next((w for w in words if any(ch.isdigit() for ch in w)), words[0])


def median_time(fn, repeat: int, device: torch.device) -> float:
    """Median wall time of ``repeat`` calls of ``fn``, in seconds (after one warm-up call)."""

    def wait():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    wait()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fast_backends(device: torch.device) -> list[str]:
    """Backends that run natively on ``device`` besides the torch reference."""
    if device.type == "cuda":
        return ["triton"] if backends.HAVE_TRITON else []
    return ["cpp"] if backends.HAVE_EXT else []


def histc_loop(x: torch.Tensor) -> torch.Tensor:
    """The naive baseline: one ``torch.histc`` per channel of Tensor[N, C, H, W] over the
    channel's own range. Returns Tensor[C, BINS] float counts."""
    return torch.stack(
        [
            torch.histc(x[:, c], BINS, float(x[:, c].min()), float(x[:, c].max()))
            for c in range(x.shape[1])
        ]
    )


def histogram_pass(backend: str, x: torch.Tensor):
    """The one-pass histogram/extremes/sums kernel of ``backend`` alone (no Gram matrix)."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    if backend == "cpp":
        return backends.ext.channel_stats(x3.numpy(), 2, BINS)
    return backends.triton_kernels().channel_stats(x3, BINS, gram=False)


def ratio(value: float) -> str:
    """A speed ratio for a table: two significant digits below 10 (``0.39x``), whole above."""
    return f"{value:.2g}x" if value < 10 else f"{value:.0f}x"


def throughput_table(batch: int, repeat: int, device: torch.device) -> list[str]:
    """Markdown rows: GB/s of each way to compute one batch's statistics, per SHAPES entry."""
    fast = fast_backends(device)
    head = ["C x H x W", "MB", "copy", "histc loop", "reference update"]
    for b in fast:
        head += [f"{b} histogram pass", f"{b} update", f"{b} pass / reference", f"{b} / histc"]
    rows = ["| " + " | ".join(head) + " | (GB/s) |", "|" + "---|" * (len(head) + 1)]
    for c, h, w in SHAPES:
        x = torch.randn(batch, c, h, w, device=device)
        gb = x.numel() * x.element_size() / 1e9

        def run(fn, gb=gb):
            return gb / median_time(fn, repeat, device)

        target = torch.empty_like(x)
        copy = run(lambda x=x, target=target: target.copy_(x))
        naive = run(lambda x=x: histc_loop(x))
        ref = run(lambda c=c, x=x: ChannelStats(c, device=device, backend="torch").update(x))
        cells = [f"{c}x{h}x{w}", f"{gb * 1e3:.0f}", f"{copy:.2f}", f"{naive:.3f}", f"{ref:.3f}"]
        for b in fast:
            one_pass = run(lambda b=b, x=x: histogram_pass(b, x))
            update = run(lambda b=b, c=c, x=x: ChannelStats(c, device=device, backend=b).update(x))
            cells += [f"{one_pass:.2f}", f"{update:.3f}", ratio(one_pass / ref)]
            cells += [ratio(one_pass / naive)]
        rows.append("| " + " | ".join(cells) + " | |")
    return rows


def feature_maps(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The feature map every prunable layer's statistics read (default ``read_at``), one batch."""
    maps: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for point in read_points(model, prunable_layers(model), "bn").values():

        def keep(_module, _inputs, output, point=point):
            activation = point.activation
            maps[point.layer] = output if activation is None else activation(output)

        handles.append(modules[point.module].register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def breakdown_table(batch: int, repeat: int, device: torch.device) -> list[str]:
    """Markdown rows: seconds of the histogram passes and of the Gram matrices over the feature
    maps of every prunable ResNet-50 layer (one batch), and Gram FLOPs vs forward FLOPs."""
    fast = fast_backends(device)
    if not fast:
        return ["(no fast backend on this device)"]
    torch.manual_seed(0)
    model = resnet50().eval().to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    maps = feature_maps(model, images)
    gram_flops = sum(2 * x.numel() * x.shape[1] for x in maps.values())
    forward_flops = 2 * 4.09e9 * batch  # ResNet-50 at 224x224: 4.09 GMACs per image
    b = fast[0]
    hist_s = median_time(lambda: [histogram_pass(b, x) for x in maps.values()], repeat, device)
    gram_s = median_time(
        lambda: [gram_syrk(x.reshape(*x.shape[:2], -1), 1.0) for x in maps.values()],
        repeat,
        device,
    ) if b == "cpp" else float("nan")  # fmt: skip
    with torch.no_grad():
        forward_s = median_time(lambda: model(images), repeat, device)
    return [
        "| layers | feature maps MB | Gram GFLOP / forward GFLOP | forward s | "
        f"{b} histogram passes s | float32 Gram matrices s |",
        "|---|---|---|---|---|---|",
        f"| {len(maps)} | {sum(x.numel() for x in maps.values()) * 4 / 1e6:.0f} | "
        f"{gram_flops / 1e9:.0f} / {forward_flops / 1e9:.0f} = {gram_flops / forward_flops:.2f} | "
        f"{forward_s:.3f} | {hist_s:.3f} | {gram_s:.3f} |",
    ]


def overhead_table(batch: int, repeat: int, device: torch.device) -> list[str]:
    """Markdown rows: a plain ResNet-50 forward on Tensor[batch, 3, 224, 224] and calibration
    forwards on the same batch, per backend, in seconds, and their ratio."""
    torch.manual_seed(0)
    model = resnet50().eval().to(device)
    batches = [torch.randn(batch, 3, 224, 224, device=device)]

    def plain():
        with torch.no_grad():
            model(batches[0])

    rows = [
        "| backend | plain forward s | calibration forward s | overhead (median of paired "
        "calibration / plain) |",
        "|---|---|---|---|",
    ]
    for b in [*fast_backends(device), "torch"]:
        pairs = []  # plain and calibration timed back to back, so that load changes hit both
        for _ in range(repeat):
            plain_s = median_time(plain, 1, device)
            calib = lambda b=b: calibrate(model, batches, progress=False, backend=b)  # noqa: E731
            pairs.append((plain_s, median_time(calib, 1, device)))
        plain_s = statistics.median(p for p, _ in pairs)
        calib_s = statistics.median(c for _, c in pairs)
        ratio = statistics.median(c / p for p, c in pairs)
        rows.append(f"| {b} | {plain_s:.3f} | {calib_s:.3f} | {ratio:.2f}x |")
    return rows


def baselines_table(batch: int, repeat: int, device: torch.device) -> list[str]:
    """Markdown rows: seconds of our scoring (statistics + scores, default backend), HRank and
    CHIP on the same CIFAR ResNet-56 feature maps (one layer per stage), and the ratios."""
    torch.manual_seed(0)
    model = resnet56().eval().to(device)
    maps = feature_maps(model, torch.randn(batch, 3, 32, 32, device=device))
    names = [name for name in prunable_layers(model) if name.endswith(".0.conv1")]
    rows = [
        "| layer | N x C x H x W | ours s | HRank s | CHIP s | HRank / ours | CHIP / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        x = maps[name]

        def ours(x=x):
            stats = ChannelStats(x.shape[1], device=device)
            stats.update(x)
            return layer_scores(stats).score

        ours_s = median_time(ours, repeat, device)
        hrank_s = median_time(lambda x=x: hrank(x), repeat, device)
        chip_s = median_time(lambda x=x: chip(x), 1, device)
        shape = "x".join(map(str, x.shape))
        rows.append(
            f"| {name} | {shape} | {ours_s:.4f} | {hrank_s:.3f} | {chip_s:.2f} | "
            f"{ratio(hrank_s / ours_s)} | {ratio(chip_s / ours_s)} |"
        )
    return rows


def main() -> None:
    """Parse the command line, print the tables and optionally write them to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="N (default 8 CPU, 64 GPU)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats, median kept")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument(
        "--write", action="store_true", help="write bench/results/<device>-channel_stats.md"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    what = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    info = backends.ext.build_info() if backends.HAVE_EXT else {}
    lines = [
        f"# ChannelStats backends on {device_name()} ({what}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, batch {batch}, medians of {args.repeat}, load average "
        f"{os.getloadavg()[0]:.1f} at the start",
        "",
        f"Generated by `python bench/channel_stats.py` (C++ extension: {info or 'not built'}).",
        "",
        "## 1. Batch statistics throughput (fp32 NCHW, GB/s of feature map read)",
        "",
        *throughput_table(batch, args.repeat, device),
        "",
        "## 2. Where the time goes: every prunable ResNet-50 layer, one batch",
        "",
        *breakdown_table(batch, args.repeat, device),
        "",
        "## 3. ResNet-50 calibration overhead (every prunable layer, read_at='bn')",
        "",
        *overhead_table(batch, max(args.repeat // 2, 1), device),
        "",
        "## 4. Scoring vs batched HRank and CHIP on the same CIFAR ResNet-56 feature maps",
        "",
        *baselines_table(2 * batch, args.repeat, device),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.out = Path(__file__).parent / "results" / f"{device_name()}-channel_stats.md"
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
