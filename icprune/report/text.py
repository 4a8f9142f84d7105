"""How a report reads: ``report.md`` and the before/after table for a terminal.

Pure functions of the report dict that :func:`icprune.report.write_report` returns (and writes
as ``report.json``), so the same report always reads the same.
"""

from __future__ import annotations

import json


def _si(value: float) -> str:
    """1234567 -> '1.23 M' (three significant digits, k/M/G/T prefixes)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:g}"


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec`` ("n/a" for None; no negative zero)."""
    if value is None:
        return "n/a"
    text = spec.format(value)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _cell(value: object) -> str:
    """A JSON value as a markdown table cell (pipes escaped)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _ms(x: float | None) -> str:
    """Seconds as milliseconds with three significant digits, never in exponent notation."""
    if x is None:
        return "n/a"
    ms = 1e3 * x
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def _ratio_text(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _speed(speedup: float | None) -> str:
    """before/after latency as words: ``" (1.48x faster)"``, ``" (1.12x slower)"``, or ``""``
    when unknown; ``" (same speed)"`` when both round to 1.00x."""
    if speedup is None:
        return ""
    if f"{speedup:.2f}" == "1.00" or f"{1 / speedup:.2f}" == "1.00":
        return " (same speed)"
    return f" ({speedup:.2f}x faster)" if speedup > 1 else f" ({1 / speedup:.2f}x slower)"


def _comparison_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """``(quantity, before, after, after / before)`` for accuracy, MACs, parameters, latency."""
    b, a, change = report["before"], report["after"], report["change"]
    accuracy_change = change["accuracy_change"]
    speedup = change["speedup"]
    return [
        (
            "top-1 accuracy",
            _pct(b["accuracy"]),
            _pct(a["accuracy"]),
            "n/a" if accuracy_change is None else f"{100 * accuracy_change:+.2f} pp",
        ),
        ("MACs", _si(b["macs"]), _si(a["macs"]), _ratio_text(change["macs_ratio"])),
        ("parameters", _si(b["params"]), _si(a["params"]), _ratio_text(change["params_ratio"])),
        (
            "latency",
            _ms(b["latency_s"]),
            _ms(a["latency_s"]),
            _ratio_text(change["latency_ratio"]) + _speed(speedup),
        ),
    ]


def comparison_table(report: dict) -> str:
    """The before/after table of a report (the dict :func:`write_report` returns) as aligned
    plain text for a terminal: accuracy, MACs, parameters and latency, with after/before."""
    rows = [("", "before", "after", "after / before"), *_comparison_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"{row[0]:<{widths[0]}}  "
        + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    ]
    return "\n".join(lines)


def markdown(report: dict, plots: dict[str, str]) -> str:
    """``report.md``: the report (the dict :func:`icprune.report.write_report` returns) for a
    person - the before/after table, the plan's reductions, the settings, the timings, one row
    per layer, and the plots (``file name -> caption``, in the order shown)."""
    lines = [
        f"# {report['title']}",
        "",
        f"icprune {report['versions']['icprune']}, torch {report['versions']['torch']}.",
        "",
        "## Before and after",
        "",
        "| | before | after | after / before |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(row)} |" for row in _comparison_rows(report)),
        "",
    ]
    plan = report["plan"]
    lines += [
        f"The plan removes {_pct(plan['flops_reduction'])} of the MACs ({plan['macs'][0]:,} -> "
        f"{plan['macs'][1]:,}) and {_pct(plan['params_reduction'])} of the parameters "
        f"({plan['params'][0]:,} -> {plan['params'][1]:,}), counted analytically at the "
        "plan's example input.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {_cell(k)} | {_cell(v)} |" for k, v in report["settings"].items()),
        "",
    ]
    if report["timings"]:
        lines += ["## Timings", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {_cell(k)} | {v:.3f} |" for k, v in report["timings"].items()]
        lines.append("")
    lines += [
        "## Layers",
        "",
        "Means over the layer's kept and pruned channels of the capacity (histogram entropy, "
        "nats), the independence and the fused score as scored (higher = keep; the score is "
        "normalised per layer, so its mean over all channels says nothing). Margin: the lowest "
        "kept score minus the highest pruned one; negative where channels coupled across layers "
        "were ranked by their group and outvoted this layer's own scores.",
        "",
        "| layer | channels | kept | pruned | capacity kept | capacity pruned | "
        "independence kept | independence pruned | score kept | score pruned | margin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    parts = ("capacity_mean", "independence_mean")
    scores = ("score_mean_kept", "score_mean_pruned", "score_margin")
    for row in report["layers"]:
        cells = [_number(row[f"{k}_{w}"], "{:.4g}") for k in parts for w in ("kept", "pruned")]
        cells += [_number(row[k], "{:.3f}") for k in scores]
        lines.append(
            f"| `{row['layer']}` | {row['channels']} | {row['kept']} | "
            f"{100 * row['pruned_share']:.1f} % | " + " | ".join(cells) + " |"
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{caption}]({name})\n" for name, caption in plots.items()]
    return "\n".join(lines)
