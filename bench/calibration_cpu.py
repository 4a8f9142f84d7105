"""CPU cost of calibration against the plain forward pass (issue 15's CPU targets), one run.

Prints, measured side by side in one run on this CPU:

1. ResNet-50 (224x224, every prunable layer) calibration / plain forward at batches 8 and 16,
   over one batch and over a calibration of 64 images (8 or 4 batches; what a calibration pays
   once - allocating the totals, deriving Gram matrices - weighs less there), as the median of
   paired ratios (each calibration timed right after plain forwards of the same batches, so
   load changes hit both), for:
   - ``calibrate()`` with default settings (``read_at="bn"``, histograms and Gram matrices,
     the C++ backend; the Gram matrices of expanding 1x1 conv + BatchNorm layers derived from
     their input, :mod:`icprune.input_gram`);
   - the same with ``gram_from_input=False`` (every Gram matrix from the feature map itself);
   - the same with histograms only (``parts=("histogram",)``: the capacity term alone);
   - the ``"input"`` read point with sums and Gram matrices (``parts=("gram",)``): every
     consumer conv/linear layer's input, each distinct input tensor read once - what issue 13's
     consumer-side criteria and repair read.
2. Scoring time of batched HRank over ours (statistics + scores) on CIFAR ResNet-56 feature maps
   (``bench.channel_stats.baselines_table``, one layer per stage).
3. Peak memory (VmHWM) over a plain forward, one fresh process per variant: the peak resident
   memory after calibration minus the peak after a plain forward of the same batch, and the
   size of the statistics kept.

Each table ends with the issue's target and whether this run meets it, computed from the
numbers above it. Run: ``python -m bench.calibration_cpu [--repeat R] [--out FILE]`` (about
10-15 minutes on 2 cores); results in ``bench/results/cpu-calibration.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.channel_stats import baselines_table
from icprune.calibrate import calibrate
from icprune.models import resnet50
from icprune.stats.channel_stats import ChannelStats
from icprune.structure.graph import prunable_layers

BATCHES = (8, 16)
#: Images of the longer calibration timed next to one batch (8 batches of 8, 4 of 16).
STREAM_IMAGES = 64
#: Issue 15's CPU targets.
TARGET_RATIO = 1.5
TARGET_HRANK = 10.0
TARGET_MIB = 250.0
VARIANTS = ("default", "direct", "histogram", "input")
LABELS = {
    "default": "calibrate(), default settings (read_at='bn', histogram + Gram)",
    "direct": "calibrate(gram_from_input=False) (every Gram from the feature map itself)",
    "histogram": "calibrate(parts=('histogram',)) (read_at='bn', no Gram)",
    "input": "'input' read point, sums + Gram (parts=('gram',))",
}


def consumer_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """{consumer name: input channels} for one consumer per distinct input tensor: every
    Conv2d/Linear module except those reading the model input, found by one forward of
    ``example`` (consumers reading the same tensor, e.g. a block's conv1 and its downsample,
    share it; the first in module order owns it)."""
    seen: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold the tensors so that ids stay unique during the pass
    owners: dict[str, int] = {}
    hooks = []

    def pre(name):
        def hook(_module, inputs):
            x = inputs[0]
            if x is not example and id(x) not in seen:
                seen[id(x)] = name
                keep.append(x)
                owners[name] = x.shape[1]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_pre_hook(pre(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return owners


def calibrate_inputs(model: nn.Module, xs: list[torch.Tensor], owners: dict[str, int]) -> dict:
    """Statistics of the 'input' read point (sums + Gram) of every owner, one forward per
    batch of ``xs``."""
    modules = dict(model.named_modules())
    stats = {
        name: ChannelStats(c, name=name, read_at="input", parts=("gram",))
        for name, c in owners.items()
    }
    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, inp, s=s: s.update(inp[0]))
        for name, s in stats.items()
    ]
    try:
        with torch.no_grad():
            for x in xs:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return stats


def run_variant(
    variant: str, model: nn.Module, xs: list[torch.Tensor], owners: dict[str, int]
) -> dict:
    """One calibration over the batches ``xs`` for ``variant`` (fresh statistics)."""
    if variant == "default":
        return calibrate(model, xs, progress=False)
    if variant == "direct":
        return calibrate(model, xs, progress=False, gram_from_input=False)
    if variant == "histogram":
        return calibrate(model, xs, progress=False, parts=("histogram",))
    return calibrate_inputs(model, xs, owners)


def ratio_rows(repeat: int) -> tuple[list[str], dict[str, float]]:
    """Markdown rows of section 1 and the worst ratio of the default variant, keyed
    ``"one batch"`` and ``"64 images"``."""
    torch.manual_seed(0)
    model = resnet50().eval()
    owners = consumer_inputs(model, torch.randn(1, 3, 224, 224))
    rows = [
        f"ResNet-50: {len(prunable_layers(model))} prunable layers ('bn' points); "
        f"{len(owners)} distinct consumer inputs ('input' point).",
        "",
        "| batch | batches | variant | plain forward s | calibration s | calibration / forward |",
        "|---|---|---|---|---|---|",
    ]
    worst = {"one batch": 0.0, f"{STREAM_IMAGES} images": 0.0}
    gen = torch.Generator().manual_seed(0)
    for batch in BATCHES:
        stream = [
            torch.randn(batch, 3, 224, 224, generator=gen) for _ in range(STREAM_IMAGES // batch)
        ]
        for xs, key in ((stream[:1], "one batch"), (stream, f"{STREAM_IMAGES} images")):

            def plain(xs=xs):
                with torch.no_grad():
                    for x in xs:
                        model(x)

            for variant in VARIANTS:  # warm-up
                plain(xs[:1])
                run_variant(variant, model, xs[:1], owners)
            for variant in VARIANTS:
                pairs = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    plain()
                    p = time.perf_counter() - t
                    t = time.perf_counter()
                    run_variant(variant, model, xs, owners)
                    pairs.append((p, time.perf_counter() - t))
                ratio = statistics.median(c / p for p, c in pairs)
                if variant == "default":
                    worst[key] = max(worst[key], ratio)
                rows.append(
                    f"| {batch} | {len(xs)} | {LABELS[variant]} | "
                    f"{statistics.median(p for p, _ in pairs):.3f} | "
                    f"{statistics.median(c for _, c in pairs):.3f} | {ratio:.2f}x |"
                )
    return rows, worst


def peak_mib() -> float:
    """Peak resident memory of this process so far (VmHWM), in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def memory_child(variant: str, batch: int) -> None:
    """In a fresh process: print 'plain_peak calib_peak state_bytes' for one variant."""
    torch.manual_seed(0)
    model = resnet50().eval()
    x = torch.randn(batch, 3, 224, 224)
    owners = consumer_inputs(model, x[:1]) if variant == "input" else {}
    with torch.no_grad():
        model(x)
    base = peak_mib()
    stats = run_variant(variant, model, [x], owners)
    after = peak_mib()
    kept = sum(
        v.numel() * v.element_size()
        for s in stats.values()
        for v in s.state_dict().values()
        if isinstance(v, torch.Tensor)
    )
    print(f"{base:.1f} {after:.1f} {kept}")


def memory_rows() -> tuple[list[str], list[float]]:
    """Markdown rows of section 3 and the measured MiB over forward of the default variant."""
    rows = [
        "| batch | variant | peak after plain forward MiB | peak after calibration MiB | "
        "over forward MiB | statistics kept MiB |",
        "|---|---|---|---|---|---|",
    ]
    default = []
    for batch in BATCHES:
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.calibration_cpu", "--memory", variant, str(batch)],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parent.parent,
            ).stdout.split()
            base, after, kept = float(out[0]), float(out[1]), int(out[2])
            if variant == "default":
                default.append(after - base)
            rows.append(
                f"| {batch} | {LABELS[variant]} | {base:.0f} | {after:.0f} | {after - base:.0f} "
                f"| {kept / 2**20:.0f} |"
            )
    return rows, default


def verdict(ok: bool) -> str:
    """How a target reads in the report."""
    return "met" if ok else "**MISSED**"


def section_ratios(repeat: int) -> list[str]:
    """Section 1 with its target lines (one batch, and a calibration of STREAM_IMAGES)."""
    rows, worst = ratio_rows(repeat)
    targets = [
        f"Target: default calibration <= {TARGET_RATIO}x the forward at batches 8 and 16, "
        f"{key}: {verdict(ratio <= TARGET_RATIO)} (worst {ratio:.2f}x)."
        for key, ratio in worst.items()
    ]
    return [
        "## 1. Calibration / plain forward, ResNet-50 at 224x224",
        "",
        *rows,
        "",
        *targets,
        "",
    ]


def section_hrank(repeat: int) -> list[str]:
    """Section 2 with its target line."""
    hrank = baselines_table(16, repeat, torch.device("cpu"))
    ratios = [float(r.split("|")[6].strip().rstrip("x")) for r in hrank[2:]]
    return [
        "## 2. Scoring vs batched HRank (CIFAR ResNet-56 feature maps, batch 16)",
        "",
        *hrank,
        "",
        f"Target: HRank / ours >= {TARGET_HRANK:.0f}x on every layer: "
        f"{verdict(min(ratios) >= TARGET_HRANK)} (lowest {min(ratios):.1f}x).",
        "",
    ]


def section_memory() -> list[str]:
    """Section 3 with its target line."""
    rows, mib = memory_rows()
    return [
        "## 3. Peak memory over a plain forward (fresh process per row)",
        "",
        *rows,
        "",
        f"Target: default calibration <= {TARGET_MIB:.0f} MiB over the forward: "
        f"{verdict(max(mib) <= TARGET_MIB)} (worst {max(mib):.0f} MiB).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="paired timings per variant")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--sections", default="1,2,3", help="comma-separated sections to run (default all)"
    )
    parser.add_argument("--memory", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        memory_child(args.memory[0], int(args.memory[1]))
        return
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"# Calibration on the CPU ({platform.machine()}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, medians of {args.repeat} paired runs, load average {load} "
        f"at the start",
        "",
        "Generated by `python -m bench.calibration_cpu`. Speed is a ratio measured side by side "
        "in this run; the machine is shared, so absolute seconds vary between runs.",
        "",
    ]
    sections = set(args.sections.split(","))
    if "1" in sections:
        lines += section_ratios(args.repeat)
    if "2" in sections:
        lines += section_hrank(args.repeat)
    if "3" in sections:
        lines += section_memory()
    lines.append(f"Load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
