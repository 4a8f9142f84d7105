"""The report of a comparison: docs/quality.md (tables), docs/quality.png (plot) and the timings
file under bench/results/. Everything in them is computed from the measured rows, except the
hand-written section between :data:`HAND_BEGIN` and :data:`HAND_END`, which is carried over
from the existing file unchanged."""

from __future__ import annotations

import platform
from pathlib import Path
from statistics import mean, stdev

import torch

from bench.quality import models
from bench.quality.defaults import DATA_DEFAULT, DATA_FREE_DEFAULT
from bench.quality.results import Results, cell

HAND_BEGIN = "<!-- hand-written: begin (kept by bench.quality.report) -->"
HAND_END = "<!-- hand-written: end -->"
KIND_ORDER = ("plain", "residual", "inverted residual", "concat")


def _kinds(results: Results, split: str) -> list[str]:
    present = {r.kind for r in results.select(split=split)}
    return [k for k in KIND_ORDER if k in present]


def _targets(results: Results) -> list[float]:
    return sorted({r.target for r in results.rows})


def _seeds(results: Results, split: str) -> list[int]:
    return sorted({r.seed for r in results.select(split=split)})


def _archs(results: Results, split: str, kind: str | None = None) -> list[str]:
    found = {r.arch for r in results.select(split=split) if kind is None or r.kind == kind}
    return [a for a in models.ARCHS if a in found]


def _criteria(results: Results, split: str, pipeline: str) -> list[str]:
    return list(dict.fromkeys(r.criterion for r in results.select(split=split, pipeline=pipeline)))


def _pipelines(results: Results, split: str) -> list[str]:
    return list(dict.fromkeys(r.pipeline for r in results.select(split=split)))


def seed_cell(results: Results, split: str, kind: str | None, target: float | None, **where):
    """Per-seed means over the split's nets of ``kind`` (all kinds if None) and the target (all
    targets if None)."""
    archs = _archs(results, split, kind)
    targets = _targets(results) if target is None else [target]
    per_target = [results.seed_means(archs, _seeds(results, split), split=split, target=t,
                                     **where) for t in targets]  # fmt: skip
    per_target = [v for v in per_target if v]
    return [mean(x) for x in zip(*per_target, strict=True)] if per_target else []


def table(results: Results, split: str, pipeline: str, names: list[str] | None = None) -> list[str]:
    """Rows = criteria, columns = kind x target (+ mean), cells = mean ± std over seeds."""
    kinds, targets = _kinds(results, split), _targets(results)
    names = names or _criteria(results, split, pipeline)
    cols = [(k, t) for k in kinds for t in targets]
    head = [f"{k} -{t:.0%}" for k, t in cols]
    lines = ["| criterion | " + " | ".join(head) + " | mean |", "|---|" + "---:|" * (len(cols) + 1)]
    cells = {(n, c): seed_cell(results, split, c[0], c[1], criterion=n, pipeline=pipeline)
             for n in names for c in cols}  # fmt: skip
    totals = {n: seed_cell(results, split, None, None, criterion=n, pipeline=pipeline)
              for n in names}  # fmt: skip
    best = {c: max((mean(cells[n, c]) for n in names if cells[n, c]), default=None) for c in cols}
    best_total = max((mean(totals[n]) for n in names if totals[n]), default=None)
    for n in names:
        row = []
        for c in cols:
            text = cell(cells[n, c])
            row.append(f"**{text}**" if cells[n, c] and mean(cells[n, c]) == best[c] else text)
        total = cell(totals[n])
        row.append(f"**{total}**" if totals[n] and mean(totals[n]) == best_total else total)
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return lines


def verdict(results: Results) -> list[str]:
    """The done-when checks of issue 13, on the confirmation split only."""
    split = "confirmation"
    chosen = results.chosen
    if not results.select(split=split) or not chosen:
        return ["(no confirmation split in this run: no verdict)"]
    kinds, targets = _kinds(results, split), _targets(results)
    lines = []
    failures, informative = [], []
    lines += [
        "**1. The default scorer against L1 at the same per-group counts**, both with BN "
        "re-estimation (pipeline `bn`: the goal), and both with repair + BN re-estimation "
        "(`repair+bn`: for information). Cells: default − L1 in percentage points, mean over "
        "seeds; ✓ when ≥ 0.",
        "",
        "| scorer | pipeline | "
        + " | ".join(f"{k} -{t:.0%}" for k in kinds for t in targets)
        + " |",
        "|---|---|" + "---:|" * (len(kinds) * len(targets)),
    ]
    for kind_name in ("data", "data-free"):
        name = chosen.get(kind_name)
        if name is None:
            continue
        for pipe in ("bn", "repair+bn"):
            row = []
            for k in kinds:
                for t in targets:
                    ours = seed_cell(results, split, k, t, criterion=name, pipeline=pipe)
                    l1 = seed_cell(results, split, k, t, criterion="L1", pipeline=pipe)
                    if not ours or not l1:
                        row.append("-")
                        continue
                    diff = 100 * (mean(ours) - mean(l1))
                    ok = diff >= 0
                    row.append(f"{diff:+.1f} {'✓' if ok else '✗'}")
                    if not ok:
                        where = f"{kind_name} `{name}`, {pipe}, {k} -{t:.0%}: {diff:+.1f} pp"
                        (failures if pipe == "bn" else informative).append(where)
            lines.append(f"| {kind_name}: `{name}` | {pipe} | " + " | ".join(row) + " |")
    lines += [""]
    lines += [
        "**2. The default pipeline (data default + repair + BN re-estimation, no fine-tune) "
        "against L1 + BN re-estimation.** Cells: accuracy of both (%, mean over seeds) and the "
        "difference; the goal is ≥ +3.0 pp at -50 %.",
        "",
        "| kind | " + " | ".join(f"-{t:.0%}" for t in targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    name = chosen.get("data")
    for k in kinds:
        row = []
        for t in targets:
            ours = seed_cell(results, split, k, t, criterion=name, pipeline="repair+bn")
            l1 = seed_cell(results, split, k, t, criterion="L1", pipeline="bn")
            if not ours or not l1:
                row.append("-")
                continue
            diff = 100 * (mean(ours) - mean(l1))
            mark = ""
            if abs(t - 0.5) < 1e-9:
                mark = " ✓" if diff >= 3.0 else " ✗"
                if diff < 3.0:
                    failures.append(f"pipeline at -50 % on {k}: {diff:+.1f} pp (< +3.0)")
            row.append(f"{100 * mean(ours):.1f} vs {100 * mean(l1):.1f} ({diff:+.1f}){mark}")
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    lines.append("")
    if failures:
        lines.append(f"**Not met** in {len(failures)} cell(s): " + "; ".join(failures) + ".")
    else:
        lines.append("**Met**: every goal cell above passes on the confirmation split.")
    if informative:
        lines += ["", f"Informative rows below L1 ({len(informative)}): " + "; ".join(informative)
                  + "."]  # fmt: skip
    return lines


def _diagnosis(results: Results) -> list[str]:
    diag = results.diagnosis
    if not diag:
        return ["(no diagnosis in this run)"]
    lines = [
        f"Net `{diag['arch']}`, seeds {diag['seeds']} (selection split). Spearman rank "
        "correlation between each criterion's group scores (as `icprune.plan` aggregates them) "
        "and the oracle damage of removing each channel alone (KL of the outputs, no "
        "recovery); mean ± std over seeds of the per-seed mean over groups. *stream*: the "
        "residual-stream groups (several convs write each channel); *inner*: one-conv groups.",
        "",
        "| criterion | stream groups | inner groups |",
        "|---|---:|---:|",
    ]
    for name, parts in diag["criteria"].items():
        s, i = parts["stream"], parts["inner"]
        lines.append(f"| {name} | {_rho(s)} | {_rho(i)} |")
    lines += [
        "",
        "Members of the stream groups: the mean standard deviation of each member's BatchNorm "
        "output (its scale in the residual sum) and the Spearman correlation of that member's "
        "own `ICII feat` scores with the oracle (mean over seeds).",
        "",
        "| member | channels | BN output std | ρ(ICII feat, oracle) |",
        "|---|---:|---:|---:|",
    ]
    layers = list(dict.fromkeys(m["layer"] for m in diag["members"]))
    for layer in layers:
        ms = [m for m in diag["members"] if m["layer"] == layer]
        lines.append(
            f"| {layer} | {ms[0]['channels']} | {mean(m['std'] for m in ms):.3f} | "
            f"{mean(m['rho'] for m in ms):+.2f} |"
        )
    return lines


def _rho(values: list[float]) -> str:
    if not values:
        return "-"
    spread = stdev(values) if len(values) > 1 else 0.0
    return f"{mean(values):+.2f} ± {spread:.2f}"


def _plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "confirmation" if results.select(split="confirmation") else "selection"
    kinds, targets = _kinds(results, split), _targets(results)
    data_default = results.chosen.get("data")
    curves = [("L1", "bn", "L1 + BN re-est."), ("random", "bn", "random + BN re-est."),
              ("L1", "repair+bn", "L1 + repair + BN re-est.")]  # fmt: skip
    if data_default:
        curves.append((data_default, "repair+bn", f"{data_default} + repair + BN re-est."))
        curves.append((data_default, "bn", f"{data_default} + BN re-est."))
    free = results.chosen.get("data-free")
    if free:
        curves.append((free, "bn", f"{free} (data-free) + BN re-est."))
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.2 * max(1, len(kinds)), 4),
                             squeeze=False, sharey=True)  # fmt: skip
    xs = [100 * t for t in targets]
    for ax, kind in zip(axes[0], kinds, strict=False):
        for name, pipe, label in curves:
            per = [seed_cell(results, split, kind, t, criterion=name, pipeline=pipe)
                   for t in targets]  # fmt: skip
            if not all(per):
                continue
            ys = [100 * mean(v) for v in per]
            es = [100 * (torch.tensor(v).std().item() if len(v) > 1 else 0.0) for v in per]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label,
                        linewidth=2.5 if name == data_default else 1.2)  # fmt: skip
        ax.set_title(f"{kind} ({split})")
        ax.set_xlabel("MAC reduction (%)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), no fine-tune")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hand_written(path: Path) -> list[str]:
    if not path.exists():
        return [HAND_BEGIN, "", HAND_END]
    text = path.read_text(encoding="utf-8")
    if HAND_BEGIN not in text or HAND_END not in text:
        return [HAND_BEGIN, "", HAND_END]
    start = text.index(HAND_BEGIN)
    end = text.index(HAND_END) + len(HAND_END)
    return text[start:end].split("\n")


def write(results: Results, out: Path, results_file: Path, command: str) -> None:
    """Write ``out/quality.md``, ``out/quality.png`` and ``results_file``."""
    out.mkdir(parents=True, exist_ok=True)
    sel_nets, sel_seeds = results.settings["selection"]
    conf_nets, conf_seeds = results.settings["confirmation"]
    targets = ", ".join(f"{t:.0%}" for t in results.settings["targets"])
    lines = [
        "# Which channels does each criterion keep, and what repairs the rest?",
        "",
        f"Generated by `{command}` (`make quality`); do not edit by hand, except between the "
        "hand-written markers. Protocol: [bench/quality/\\_\\_init\\_\\_.py]"
        "(../bench/quality/__init__.py). scikit-learn's digits upsampled to 16x16, a fixed "
        f"held-out test split; targets {targets} fewer MACs; pruning by `icprune.plan` with "
        "one fraction for every dependency group (the same per-group counts for every "
        "criterion) and `icprune.apply`; the accuracy is measured **right after pruning and "
        "recovery, without fine-tuning**. Cells: test accuracy in %, mean ± standard "
        "deviation over seeds (each seed's value is the mean over the nets of that kind).",
        "",
        f"- **Selection split** (defaults are chosen here): nets {', '.join(sel_nets)}; seeds "
        f"{sel_seeds}.",
        f"- **Confirmation split** (never looked at while choosing; the verdict): nets "
        f"{', '.join(conf_nets)}; seeds {conf_seeds}.",
        "",
    ]
    unpruned = []
    for nets in (sel_nets, conf_nets):
        for a in nets:
            vals = [v for k, v in results.unpruned.items() if k.split("/")[0] == a]
            if vals:
                unpruned.append(f"{a} {cell(vals)}")
    lines += ["Unpruned accuracy: " + ", ".join(unpruned) + ".", ""]
    if results.chosen:
        recorded = {"data": DATA_DEFAULT, "data-free": DATA_FREE_DEFAULT}
        same = all(results.chosen.get(k) == v for k, v in recorded.items())
        lines += [
            "Defaults chosen on the selection split: with data **`"
            f"{results.chosen.get('data', '-')}`** (highest mean accuracy after `repair+bn`), "
            f"data-free **`{results.chosen.get('data-free', '-')}`** (highest after `bn`); "
            + ("the same as recorded in [bench/quality/defaults.py](../bench/quality/defaults.py)."
               if same else "**not** those recorded in bench/quality/defaults.py ("
               f"`{DATA_DEFAULT}`, `{DATA_FREE_DEFAULT}`)."),
            "",
        ]  # fmt: skip
    lines += ["![accuracy against MAC reduction](quality.png)", "",
              "## Verdict (confirmation split)", "", *verdict(results), ""]  # fmt: skip
    pipes_doc = (
        "Pipelines: `none` - pruned only; `bn` - `icprune.recalibrate_bn` on the calibration "
        "images; `repair` - bias compensation and least-squares re-fit of every consumer from "
        "the unpruned model's input statistics ([icprune/recovery/repair.py]"
        "(../icprune/recovery/repair.py)); `repair+bn` - both; `, 64 img` - with only the "
        "first 64 calibration images; `r=` - the ridge of the fit (default 1e-2)."
    )
    for split in ("confirmation", "selection"):
        if not results.select(split=split):
            continue
        lines += [f"## {split.capitalize()} split", "", pipes_doc, ""]
        for pipe in _pipelines(results, split):
            lines += [f"### {split}, pipeline `{pipe}`", "", *table(results, split, pipe), ""]
    lines += ["## Diagnosis: feature-map scores on residual nets", "", *_diagnosis(results), ""]
    lines += _hand_written(out / "quality.md")
    lines.append("")
    (out / "quality.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(results, out / "quality.png")
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in results.seconds.items() if k != "total")
    timing = [
        f"# bench.quality on {platform.processor() or platform.machine()} (CPU)",
        "",
        f"`{command}`: {results.seconds.get('total', 0):.0f} s wall-clock with "
        f"{results.settings.get('threads', 1)} torch thread(s) ({secs}); "
        f"torch {torch.__version__}, "
        f"Python {platform.python_version()}. Results: [docs/quality.md](../../docs/quality.md).",
        "",
    ]
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text("\n".join(timing), encoding="utf-8")
