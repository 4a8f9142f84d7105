"""Gram matrices derived from a layer's input (``gram_from_input``): accuracy and plans.

Prints, for the derivation of :mod:`icprune.input_gram`:

1. Accuracy on ResNet-50 (random weights and BatchNorm statistics, 8 images at 224x224, two
   batches of 4): for the layers whose Gram matrix was derived, the largest error of the
   derived and of the direct (``gram_from_input=False``) float32 Gram matrix against the
   float64 reference of the real feature maps, relative to its largest entry, and the largest
   correlation error of each.
2. Rankings and plans on the confirmation split of ``bench/quality`` (digits-trained nets that
   played no part in choosing any default; nets without a derivable layer are listed and
   skipped): calibrated on 512 training images in batches of 64, the paper's ``icii`` scores
   with and without the derivation - the lowest per-layer Kendall tau over the derived layers,
   the layers whose ranking is identical, and whether the plans at 30 / 50 / 70 % fewer FLOPs
   are identical.

Run: ``python -m bench.gram_from_input [--cache DIR] [--out FILE]`` (trains the confirmation
nets into ``bench/quality``'s cache first if they are not there; results in
``bench/results/cpu-gram_from_input.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from scipy.stats import kendalltau
from torch import nn

import icprune
from bench.quality import data, models
from bench.quality.run import Config, default_cache
from bench.quality.train import TRAIN, trained
from icprune.calibrate import calibrate
from icprune.config import StatsConfig
from icprune.input_gram import input_gram_layers
from icprune.models import resnet50
from icprune.scoring import score
from icprune.structure.graph import prunable_layers, read_points

TARGETS = (0.3, 0.5, 0.7)
CALIBRATION_IMAGES, CALIBRATION_BATCH = 512, 64


def candidates(model: nn.Module) -> list[str]:
    """The layers of ``model`` whose Gram matrix calibration may derive from their input."""
    points = read_points(model, prunable_layers(model), "bn")
    return list(input_gram_layers(model, points, StatsConfig(), torch.device("cpu")))


def accuracy(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float | int]:
    """Errors of the derived and the direct Gram matrices against the float64 reference over
    the layers that were derived (more samples than their break-even): ``gram_derived``,
    ``gram_direct`` (largest entry error / largest entry, worst layer), ``corr_derived``,
    ``corr_direct`` (largest correlation error), ``derived`` and ``candidates`` (layer counts)."""
    derived = calibrate(model, batches, progress=False)
    direct = calibrate(model, batches, progress=False, gram_from_input=False)
    reference = calibrate(model, batches, progress=False, backend="torch")
    points = read_points(model, prunable_layers(model), "bn")
    inputs = input_gram_layers(model, points, StatsConfig(), torch.device("cpu"))
    used = [name for name, g in inputs.items() if derived[name].count > g.break_even]
    out = {"gram_derived": 0.0, "gram_direct": 0.0, "corr_derived": 0.0, "corr_direct": 0.0}
    for name in used:
        ref = reference[name]
        scale = float(ref.gram.abs().max())
        for key, stats in (("derived", derived[name]), ("direct", direct[name])):
            gram = float((stats.gram - ref.gram).abs().max()) / scale
            corr = float((stats.correlation() - ref.correlation()).abs().max())
            out[f"gram_{key}"] = max(out[f"gram_{key}"], gram)
            out[f"corr_{key}"] = max(out[f"corr_{key}"], corr)
    return {**out, "derived": len(used), "candidates": len(inputs)}


def accuracy_rows() -> list[str]:
    """Markdown lines of section 1."""
    torch.manual_seed(0)
    model = resnet50().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 224, 224, generator=gen) for _ in range(2)]
    r = accuracy(model, batches)
    return [
        f"ResNet-50, 8 images: {r['derived']} of its {r['candidates']} derivable layers derived "
        f"(the others stay below their break-even and keep the direct matrix).",
        "",
        "| Gram matrix | largest error / largest entry | largest correlation error |",
        "|---|---|---|",
        f"| derived from the input | {r['gram_derived']:.2e} | {r['corr_derived']:.2e} |",
        f"| direct (gram_from_input=False) | {r['gram_direct']:.2e} | {r['corr_direct']:.2e} |",
    ]


def compare(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, object]:
    """``icii`` scores and plans of ``model`` with and without the derivation."""
    derived = score(model, stats=calibrate(model, batches, progress=False), criterion="icii")
    direct_stats = calibrate(model, batches, progress=False, gram_from_input=False)
    direct = score(model, stats=direct_stats, criterion="icii")
    layers = candidates(model)
    tau = min(kendalltau(derived[n].score, direct[n].score)[0] for n in layers)
    same = sum(torch.equal(derived[n].score.argsort(stable=True),
                           direct[n].score.argsort(stable=True)) for n in derived)  # fmt: skip
    plans = []
    example = models.example_input()
    for target in TARGETS:
        try:
            a = icprune.plan(model, derived, example_inputs=example, flops_reduction=target)
            b = icprune.plan(model, direct, example_inputs=example, flops_reduction=target)
        except ValueError:
            plans.append("infeasible")
            continue
        plans.append("identical" if repr(a) == repr(b) else "**differ**")
    return {"layers": len(layers), "tau": tau, "same": same, "total": len(derived), "plans": plans}


def plan_rows(cache: Path | None) -> list[str]:
    """Markdown lines of section 2."""
    digits = data.load()
    batches = list(digits.train_x[:CALIBRATION_IMAGES].split(CALIBRATION_BATCH))
    nets, seeds = Config().confirmation
    rows = [
        "| net | seed | derived layers | lowest Kendall tau | identical layer rankings | "
        + " | ".join(f"plan at {t:.0%}" for t in TARGETS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(TARGETS),
    ]
    skipped = []
    for arch in nets:
        if not candidates(models.build(arch)):
            skipped.append(arch)
            continue
        for seed in seeds:
            model = trained(arch, seed, digits.train_x, digits.train_y, TRAIN, cache, False)
            r = compare(model, batches)
            rows.append(
                f"| {arch} | {seed} | {r['layers']} | {r['tau']:.4f} | {r['same']}/{r['total']} | "
                + " | ".join(r["plans"])
                + " |"
            )
    if skipped:
        rows += ["", f"No derivable layer (skipped): {', '.join(skipped)}."]
    return rows


def main() -> None:
    """Parse the command line, print the report and optionally write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache(), help="trained-net cache")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    lines = [
        f"# Gram matrices derived from a layer's input (CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__})",
        "",
        "Generated by `python -m bench.gram_from_input`.",
        "",
        "## 1. Accuracy against the float64 reference",
        "",
        *accuracy_rows(),
        "",
        "## 2. icii rankings and plans, confirmation split of bench/quality",
        "",
        f"{CALIBRATION_IMAGES} training images in batches of {CALIBRATION_BATCH}; with vs "
        f"without the derivation.",
        "",
        *plan_rows(args.cache),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
