"""Benchmark of data-free scoring: the float64 torch reference against the default backend.

``icprune.score(model)`` (data-free) reads every prunable layer's weight as C channels of K
samples; its cost is the C x C Gram ``W @ W.T`` (C*C*K MACs), which on VGG-16-BN is dominated by
the first classifier Linear (4096 x 25088). Timed side by side in one process, interleaved
(alternating which goes first), median of ``--repeat`` runs each:

- ``backend="torch"``: the float64 reference (a float64 copy of the weight, float64 GEMM), what
  data-free scoring used before;
- ``backend="auto"``: the default now (C++ extension on the CPU: histogram pass in place, float32
  BLAS GEMM on the weight in place, added in float64).

Before timing, the results are compared: histogram counts (hence capacities) must be identical,
Gram matrices within the documented 1e-5 of max|G|, and the default backend's scores must be
bit-identical run to run. The script exits non-zero if any of that fails.

Run: ``python bench/weight_stats.py [--model vgg16_bn] [--repeat R] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import icprune
from icprune import models
from icprune.stats.weights import weight_stats

#: Documented Gram tolerance of the float32 backends (docs/method.md), relative to max|G|.
GRAM_TOLERANCE = 1e-5
MODELS = {"vgg16_bn": models.vgg16_bn, "resnet50": models.resnet50, "resnet20": models.resnet20}


def build(name: str) -> torch.nn.Module:
    """The zoo model ``name`` with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return MODELS[name]().eval()


def compare(model: torch.nn.Module) -> dict[str, float]:
    """Differences between the float64 reference and the default backend on ``model``'s weights:
    worst relative Gram difference, worst relative score difference, and whether histograms
    and run-to-run default scores are identical."""
    ref = weight_stats(model, backend="torch")
    new = weight_stats(model, backend="auto")
    gram = max(
        float((ref[k].gram - new[k].gram).abs().max() / ref[k].gram.abs().max()) for k in ref
    )
    counts_equal = all(torch.equal(ref[k].counts, new[k].counts) for k in ref)
    s_ref, s_new = icprune.score(model, backend="torch"), icprune.score(model, backend="auto")
    again = icprune.score(model, backend="auto")
    score = max(
        float((s_ref[k].score - s_new[k].score).abs().max() / s_ref[k].score.abs().max())
        for k in s_ref
    )
    capacity_equal = all(torch.equal(s_ref[k].capacity, s_new[k].capacity) for k in s_ref)
    repeatable = all(torch.equal(s_new[k].score, again[k].score) for k in s_new)
    return {
        "gram": gram,
        "score": score,
        "counts_equal": counts_equal,
        "capacity_equal": capacity_equal,
        "repeatable": repeatable,
    }


def timed(model: torch.nn.Module, backend: str) -> float:
    start = time.perf_counter()
    icprune.score(model, backend=backend)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="vgg16_bn")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = build(args.model)
    check = compare(model)
    times = {"torch": [], "auto": []}
    for r in range(args.repeat):
        for backend in ("torch", "auto") if r % 2 == 0 else ("auto", "torch"):
            times[backend].append(timed(model, backend))
    old, new = statistics.median(times["torch"]), statistics.median(times["auto"])
    ok = (
        check["gram"] <= GRAM_TOLERANCE
        and check["counts_equal"]
        and check["capacity_equal"]
        and check["repeatable"]
    )
    lines = [
        f"# Data-free scoring on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "",
        f"`icprune.score(model)` on {args.model} (seeded random weights), median of "
        f"{args.repeat} interleaved runs each; `python bench/weight_stats.py --model "
        f"{args.model} --repeat {args.repeat}`.",
        "",
        "| float64 torch reference s | default backend s | speed-up (torch / default) |",
        "|---|---|---|",
        f"| {old:.2f} | {new:.2f} | {old / new:.2f}x |",
        "",
        f"- max\\|ΔG\\| / max\\|G\\| over layers: {check['gram']:.2e} (documented bound "
        f"{GRAM_TOLERANCE:g})",
        f"- max \\|Δscore\\| / max\\|score\\| over layers: {check['score']:.2e}",
        f"- histogram counts identical: {check['counts_equal']}; capacities identical: "
        f"{check['capacity_equal']}; default scores bit-identical run to run: "
        f"{check['repeatable']}",
        f"- all runs (s): torch {[round(t, 2) for t in times['torch']]}, default "
        f"{[round(t, 2) for t in times['auto']]}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if not ok:
        print("FAILED: the default backend is outside the documented tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
