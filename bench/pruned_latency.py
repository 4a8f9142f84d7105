"""Benchmark: CPU latency of pruned ResNet-50 against the unpruned model, in the same run.

ResNet-50 (torchvision layout, seeded random weights) is scored data-free (``source="weights"``),
planned at 50 % and 77 % FLOPs reduction, each with ``round_to=1`` and ``round_to=8``, and
applied. All five models (unpruned + four pruned) are then timed on the same input by
:func:`icprune.latency`: interleaved round-robin (the order rotates every round), in eval mode
under ``torch.inference_mode()``, after warm-up; the median per model is reported with its
ratio to the unpruned median.
MACs come from ``icprune.count`` (FlopCounterMode) of each model, params from its parameters.

Run: ``python bench/pruned_latency.py [--batch N] [--size S] [--rounds R] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import icprune
from icprune.models import resnet50

TARGETS = [(0.5, 1), (0.5, 8), (0.77, 1), (0.77, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = resnet50().eval()
    example = torch.randn(1, 3, args.size, args.size)
    scores = icprune.score(base, source="weights", progress=False)
    models = {"unpruned": (base, None)}
    for reduction, round_to in TARGETS:
        plan = icprune.plan(
            base, scores, example_inputs=example, flops_reduction=reduction, round_to=round_to
        )
        models[f"-{reduction:.0%} FLOPs, round_to={round_to}"] = (icprune.apply(base, plan), plan)
    x = torch.randn(args.batch, 3, args.size, args.size)
    times = icprune.latency({name: m for name, (m, _) in models.items()}, x, rounds=args.rounds)
    base_s = times["unpruned"]
    base_macs, base_params = icprune.count(base, example)
    lines = [
        f"# Pruned ResNet-50 latency on {platform.machine()} CPU, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}",
        "",
        f"Batch {args.batch} x 3 x {args.size} x {args.size}, fp32, eval + inference_mode, "
        f"median of {args.rounds} interleaved rounds; scores data-free (source='weights'). "
        "MACs per image.",
        "",
        "| model | MACs (G) | MACs ratio | params (M) | params ratio | latency ms | "
        "latency ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (model, _) in models.items():
        macs, params = icprune.count(model, example)
        median = times[name]
        lines.append(
            f"| {name} | {macs / 1e9:.2f} | {macs / base_macs:.3f} | {params / 1e6:.2f} | "
            f"{params / base_params:.3f} | {median * 1e3:.1f} | {median / base_s:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
