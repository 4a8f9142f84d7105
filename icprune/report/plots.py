"""The report's PNG plots, drawn with matplotlib's object API (``matplotlib.figure.Figure``
rendered by the Agg canvas): no pyplot, no global state changed, no display needed.

Each function takes per-layer data in forward order (plain lists and numpy arrays) and writes
one PNG; figure sizes grow with the number of layers so that ~50 layers stay readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

#: Colours of kept and pruned channels (matplotlib's default blue and red).
KEPT_COLOR = "#1f77b4"
PRUNED_COLOR = "#d62728"
BEFORE_COLOR = "#c7c7c7"
DPI = 100
_LABEL_SIZE = 8
_SMALL_SIZE = 6


def _check(layers: Sequence[str], *columns: Sequence) -> None:
    if not layers:
        raise ValueError("plots: no layers to plot; pass at least one layer")
    for column in columns:
        if len(column) != len(layers):
            raise ValueError(
                f"plots: {len(layers)} layer names but {len(column)} values in a column; pass "
                f"one entry per layer"
            )


def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI)


def _kept_pruned() -> list[Line2D]:
    """Legend entries of the kept and pruned markers."""
    return [
        Line2D([], [], marker="o", ls="", color=KEPT_COLOR, label="kept"),
        Line2D([], [], marker="x", ls="", color=PRUNED_COLOR, label="pruned"),
    ]


def channels_kept(
    path: str | Path, layers: Sequence[str], channels: Sequence[int], kept: Sequence[int]
) -> None:
    """Horizontal bar chart of each layer's output channels before pruning and kept.

    Args:
        path: the PNG file to write.
        layers: layer names, first layer drawn on top.
        channels: output channels of each layer before pruning (ints).
        kept: output channels each layer keeps (ints, <= channels).
    """
    _check(layers, channels, kept)
    n = len(layers)
    height = max(3.0, 1.5 + 0.22 * n)
    fig = Figure(figsize=(8.0, height))
    ax = fig.add_axes((0.25, 0.9 / height, 0.68, (height - 1.5) / height))
    y = np.arange(n)
    ax.barh(y, channels, height=0.75, color=BEFORE_COLOR, label="before")
    ax.barh(y, kept, height=0.75, color=KEPT_COLOR, label="kept")
    for i, (c, k) in enumerate(zip(channels, kept, strict=True)):
        ax.text(c, i, f" {k}/{c}", va="center", fontsize=_SMALL_SIZE)
    ax.set_yticks(y, labels=list(layers), fontsize=_LABEL_SIZE)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, max(channels) * 1.15)
    ax.set_xlabel("output channels", fontsize=_LABEL_SIZE)
    ax.tick_params(axis="x", labelsize=_LABEL_SIZE)
    ax.set_title("Channels kept per layer", fontsize=10, pad=20)
    ax.legend(
        loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False, fontsize=_LABEL_SIZE
    )
    _save(fig, path)


def capacity_vs_independence(
    path: str | Path,
    layers: Sequence[str],
    capacity: Sequence[np.ndarray],
    independence: Sequence[np.ndarray],
    kept: Sequence[np.ndarray],
) -> None:
    """Small multiples, one scatter per layer: capacity (x) against independence (y) of every
    channel, kept and pruned channels in different colours and markers.

    Args:
        path: the PNG file to write.
        layers: layer names, drawn row by row.
        capacity: per layer, float array [C] of capacities (nats).
        independence: per layer, float array [C] of independences.
        kept: per layer, bool array [C], True for kept channels.
    """
    _check(layers, capacity, independence, kept)
    n = len(layers)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    width, height = 2.3 * cols, 1.2 + 2.0 * rows
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(
        rows,
        cols,
        left=0.6 / width,
        right=1 - 0.15 / width,
        bottom=0.55 / height,
        top=1 - 0.9 / height,
        wspace=0.35,
        hspace=0.55,
    )
    for i, name in enumerate(layers):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        mask = np.asarray(kept[i], dtype=bool)
        x, y = np.asarray(capacity[i]), np.asarray(independence[i])
        ax.scatter(x[mask], y[mask], s=6, c=KEPT_COLOR, marker="o", linewidths=0)
        ax.scatter(x[~mask], y[~mask], s=10, c=PRUNED_COLOR, marker="x", linewidths=0.8)
        ax.set_title(f"{name} ({mask.sum()}/{mask.size})", fontsize=_SMALL_SIZE + 1)
        ax.tick_params(labelsize=_SMALL_SIZE)
        ax.locator_params(nbins=4)
    fig.suptitle("Capacity vs independence per layer", fontsize=10, y=1 - 0.12 / height)
    fig.supxlabel("capacity (histogram entropy, nats)", fontsize=_LABEL_SIZE, y=0.1 / height)
    fig.supylabel("independence", fontsize=_LABEL_SIZE, x=0.1 / width)
    fig.legend(
        handles=_kept_pruned(),
        loc="upper center",
        ncols=2,
        frameon=False,
        fontsize=_LABEL_SIZE,
        bbox_to_anchor=(0.5, 1 - 0.3 / height),
    )
    _save(fig, path)


def score_distributions(
    path: str | Path,
    layers: Sequence[str],
    scores: Sequence[np.ndarray],
    kept: Sequence[np.ndarray],
) -> None:
    """One row per layer: every channel's score as a jittered dot (kept and pruned in different
    colours), the interquartile range as a grey bar with the median, and a black bar at the
    highest score of a pruned channel (the layer's effective threshold).

    Args:
        path: the PNG file to write.
        layers: layer names, first layer drawn on top.
        scores: per layer, float array [C] of scores on a common scale (the report passes
            scores min-max normalised within the layer, the scale the plan ranks on).
        kept: per layer, bool array [C], True for kept channels.
    """
    _check(layers, scores, kept)
    n = len(layers)
    height = max(3.0, 1.4 + 0.3 * n)
    fig = Figure(figsize=(8.0, height))
    ax = fig.add_axes((0.25, 0.9 / height, 0.68, (height - 1.4) / height))
    rng = np.random.default_rng(0)  # jitter only; fixed seed keeps the image reproducible
    for i in range(n):
        values = np.asarray(scores[i], dtype=np.float64)
        mask = np.asarray(kept[i], dtype=bool)
        jitter = i + rng.uniform(-0.28, 0.28, values.size)
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        ax.hlines(i, q1, q3, colors=BEFORE_COLOR, linewidth=7, zorder=1)
        ax.vlines(median, i - 0.3, i + 0.3, colors="#7f7f7f", linewidth=1.5, zorder=2)
        ax.scatter(values[mask], jitter[mask], s=4, c=KEPT_COLOR, linewidths=0, zorder=3)
        ax.scatter(values[~mask], jitter[~mask], s=8, c=PRUNED_COLOR, marker="x", zorder=3)
        if (~mask).any():
            ax.vlines(values[~mask].max(), i - 0.42, i + 0.42, colors="black", lw=1.5, zorder=4)
    ax.set_yticks(np.arange(n), labels=list(layers), fontsize=_LABEL_SIZE)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("score (min-max normalised within the layer)", fontsize=_LABEL_SIZE)
    ax.tick_params(axis="x", labelsize=_LABEL_SIZE)
    ax.set_title("Score distributions per layer", fontsize=10, pad=22)
    handles = [
        *_kept_pruned(),
        Line2D([], [], color="black", lw=1.5, label="highest pruned score"),
        Line2D([], [], color=BEFORE_COLOR, lw=6, label="quartiles"),
    ]
    ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=4,
        frameon=False,
        fontsize=_SMALL_SIZE + 1,
    )
    _save(fig, path)
