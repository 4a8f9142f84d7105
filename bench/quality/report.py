"""The report of a comparison: docs/quality.md (tables), docs/quality.png (plot) and the timings
file under bench/results/. Everything in them is computed from the measured rows."""

from __future__ import annotations

import platform
from pathlib import Path
from statistics import mean, stdev
from typing import TYPE_CHECKING

import torch

from bench.quality import criteria

if TYPE_CHECKING:
    from bench.quality.run import Results

#: The row that measures icprune's defaults, ``icprune.score(model)``.
DEFAULT = "icprune default"
#: Criteria drawn in the plot, besides the best ICII variant.
PLOTTED = ("random", "L1 norm", "BN scale", "FPGM", "HRank", "ICII feat", "ICII wts")


def _per_seed(results: Results, archs, **where) -> list[float]:
    """Per seed, the mean accuracy over ``archs`` of the rows matching ``where``."""
    return [
        mean(results.mean(arch=a, seed=s, **where) for a in archs) for s in results.config.seeds
    ]


def _cell(values: list[float]) -> str:
    spread = stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean(values):.1f} ± {100 * spread:.1f}"


def _reached(results: Results, arch: str, target: float) -> float:
    """The MAC reduction (fraction) that ``same counts`` reached for ``arch`` at ``target``."""
    return mean(
        r.reduction
        for r in results.rows
        if r.arch == arch and r.target == target and r.allocation == "same counts"
    )


def _has(results: Results, **where) -> bool:
    return any(all(getattr(r, k) == v for k, v in where.items()) for r in results.rows)


def _table(results: Results, names: list[str], allocation: str, stage: str) -> list[str]:
    cfg = results.config
    columns = [(a, t) for a in cfg.archs for t in cfg.targets]
    header = [f"{a} -{t:.0%}" for a, t in columns]
    lines = [
        "| criterion | " + " | ".join(header) + " | mean |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    where = dict(allocation=allocation, stage=stage)
    names = [n for n in names if _has(results, criterion=n, **where)]
    cells = {
        (n, col): _per_seed(results, [col[0]], criterion=n, target=col[1], **where)
        for n in names
        for col in columns
    }
    overall = {n: [mean(v) for v in zip(*(cells[n, c] for c in columns), strict=True)]
               for n in names}  # fmt: skip
    best = {c: max(mean(cells[n, c]) for n in names) for c in columns}
    best_all = max(mean(overall[n]) for n in names)
    for n in names:
        row = [
            f"**{_cell(cells[n, c])}**" if mean(cells[n, c]) == best[c] else _cell(cells[n, c])
            for c in columns
        ]
        total = _cell(overall[n])
        row.append(f"**{total}**" if mean(overall[n]) == best_all else total)
        label = f"{n} (best ICII)" if n == results.best else n
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def _verdict(results: Results) -> list[str]:
    cfg = results.config
    if not results.best or not _has(results, criterion="L1 norm"):
        return ["(no ICII variant or no L1 norm in this run: no verdict)"]
    lines = [
        "| allocation | models | " + " | ".join(f"-{t:.0%}" for t in cfg.targets) + " |",
        "|---|---|" + "---:|" * len(cfg.targets),
    ]
    failures = []
    for how in ("same counts", "own"):
        for archs in [list(cfg.archs), *[[a] for a in cfg.archs]]:
            row = []
            for t in cfg.targets:
                where = dict(target=t, allocation=how, stage="recalibrated")
                ours = mean(_per_seed(results, archs, criterion=results.best, **where))
                l1 = mean(_per_seed(results, archs, criterion="L1 norm", **where))
                mark = "≥" if ours >= l1 else "<"
                row.append(f"{100 * ours:.1f} {mark} {100 * l1:.1f}")
                if ours < l1:
                    failures.append(f"{how}, {'+'.join(archs)}, -{t:.0%}: {ours:.3f} < {l1:.3f}")
            lines.append(f"| {how} | {' + '.join(archs)} | " + " | ".join(row) + " |")
    lines.append("")
    if failures:
        lines.append(
            f"**Not met everywhere**: `{results.best}` is less accurate than the L1 norm in "
            f"{len(failures)} of {2 * (len(cfg.archs) + 1) * len(cfg.targets)} cells: "
            + "; ".join(failures)
            + "."
        )
    else:
        lines.append(
            f"**Met**: `{results.best}` is at least as accurate as the L1 norm at every target, "
            f"with both allocations, pooled and per model."
        )
    return lines


def _defaults_check(results: Results) -> list[str]:
    """Whether ``icprune.score(model)`` (the ``icprune default`` row) kept the same accuracy as
    the best ICII variant in every measured cell."""
    if not results.best or not _has(results, criterion=DEFAULT):
        return []

    def cells(name: str) -> dict:
        return {
            (r.arch, r.seed, r.target, r.allocation, r.stage): r.accuracy
            for r in results.rows
            if r.criterion == name and r.stage == "recalibrated"
        }

    same = cells(DEFAULT) == cells(results.best)
    verdict = (
        "the same accuracy as the best ICII variant in every cell: icprune's defaults are the "
        "best variant."
        if same
        else "accuracies that differ from the best ICII variant: icprune's defaults are not the "
        "best variant of this run; set them to it."
    )
    return [
        "",
        f"The `{DEFAULT}` row, `icprune.score(model)` with no other argument, has {verdict}",
    ]


def _plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results.config
    names = [n for n in (*PLOTTED, results.best) if n and _has(results, criterion=n)]
    names = list(dict.fromkeys(names))
    fig, axes = plt.subplots(
        len(cfg.archs), 2, figsize=(11, 4 * len(cfg.archs)), squeeze=False, sharey=True
    )
    targets = [100 * t for t in cfg.targets]
    for i, arch in enumerate(cfg.archs):
        unpruned = mean(results.unpruned[arch, s] for s in cfg.seeds)
        for j, how in enumerate(("same counts", "own")):
            ax = axes[i][j]
            ax.axhline(100 * unpruned, color="grey", linestyle=":", label="unpruned")
            for n in names:
                per = [
                    _per_seed(results, [arch], criterion=n, target=t, allocation=how,
                              stage="recalibrated")
                    for t in cfg.targets
                ]  # fmt: skip
                ys = [100 * mean(v) for v in per]
                es = [100 * (stdev(v) if len(v) > 1 else 0.0) for v in per]
                style = "-" if n.startswith(("ICII", "IC ", "II ")) else "--"
                width = 2.5 if n == results.best else 1.2
                label = f"{n} (best ICII)" if n == results.best else n
                ax.errorbar(targets, ys, yerr=es, linestyle=style, linewidth=width, marker="o",
                            capsize=3, label=label)  # fmt: skip
            ax.set_title(f"{arch}, {how}, after BN recalibration")
            ax.set_xlabel("MAC reduction (%)")
            ax.set_xticks(targets)
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("test accuracy (%)")
    axes[0][1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def write(results: Results, out: Path, results_file: Path, quick: bool = False) -> None:
    """Write ``out/quality.md``, ``out/quality.png`` and the timings file ``results_file``."""
    cfg = results.config
    out.mkdir(parents=True, exist_ok=True)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.quality" + (" --quick" if quick else "")
    names = list(dict.fromkeys(r.criterion for r in results.rows))
    variants = criteria.variants()
    lines = [
        "# Which channels does each criterion keep?",
        "",
        f"Generated by `{command}` (`make quality`); do not edit by hand. The protocol, fixed "
        "before any criterion was compared, is in [bench/quality/\\_\\_init\\_\\_.py]"
        "(../bench/quality/__init__.py): scikit-learn's digits upsampled to 16x16, a fixed "
        f"held-out test split, {len(cfg.seeds)} seed(s) per model, targets "
        + ", ".join(f"{t:.0%}" for t in cfg.targets)
        + " fewer MACs, channels masked at their BatchNorm, accuracy on the test split after "
        "`icprune.recalibrate_bn`. Cells: test accuracy in %, mean ± standard deviation over "
        "seeds; the best mean of each column in bold.",
        "",
        "Unpruned accuracy: "
        + ", ".join(f"{a} {_cell([results.unpruned[a, s] for s in cfg.seeds])}" for a in cfg.archs)
        + ". MAC reduction reached by `same counts`: "
        + ", ".join(
            f"{a} -{t:.0%} → {100 * _reached(results, a, t):.1f} %"
            for a in cfg.archs
            for t in cfg.targets
        )
        + ".",
        "",
        "![accuracy against MAC reduction](quality.png)",
        "",
        "## Verdict: the best ICII variant against the L1 norm",
        "",
    ]
    if results.best:
        lines += [
            f"The best ICII variant (highest recalibrated accuracy with `same counts`, averaged "
            f"over models, targets and seeds) is **{results.best}**: "
            f"`icprune.score(model, ..., {variants[results.best].arguments()})`.",
            "",
            "Accuracy after recalibration (%, mean over seeds), best ICII vs L1 norm:",
            "",
        ]
    lines += _verdict(results)
    lines += _defaults_check(results)
    sections = [
        ("1. Same per-layer channel counts, after BN recalibration", "same counts", "recalibrated"),
        ("2. Each criterion's own allocation, after BN recalibration", "own", "recalibrated"),
        (
            f"3. Same counts, after BN recalibration and a {cfg.fine_tune.epochs}-epoch fine-tune",
            "same counts",
            "fine-tuned",
        ),
    ]
    for title, how, stage in sections:
        lines += ["", f"## {title}", "", *_table(results, names, how, stage)]
    lines += [
        "",
        "Criteria: `ICII feat` / `ICII wts` are `icprune.score` on feature maps / weights (base "
        "arguments in [bench/quality/criteria.py](../bench/quality/criteria.py)); each "
        "`ICII ..., x=y` row changes one argument of its base; `IC` and `II` rows use capacity "
        "or independence alone; `icprune default` is `icprune.score(model)` and `icprune default, "
        "feat` is `icprune.score(model, data)`, each with no other argument. `own` ranks the "
        "per-layer min-max normalised scores of all pruned layers together (at least one "
        "channel stays per layer).",
        "",
    ]
    (out / "quality.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(results, out / "quality.png")
    timing = [
        f"# bench.quality on {platform.processor() or platform.machine()} (CPU)",
        "",
        f"`{command}`: {results.seconds['total']:.0f} s wall-clock with "
        f"{torch.get_num_threads()} torch threads (train {results.seconds['train']:.0f} s, "
        f"scores {results.seconds['score']:.0f} s, prune + recalibrate + test "
        f"{results.seconds['prune+recalibrate']:.0f} s, fine-tune "
        f"{results.seconds['fine-tune']:.0f} s); torch {torch.__version__}, Python "
        f"{platform.python_version()}. Results: [docs/quality.md](../../docs/quality.md).",
        "",
    ]
    results_file.write_text("\n".join(timing), encoding="utf-8")
