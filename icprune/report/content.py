"""What a pruning report holds, and :func:`write_report`, which writes it: ``report.json``
(machine-readable), ``report.md`` (a person's summary, :mod:`icprune.report.text`) and three PNG
plots (:mod:`icprune.report.plots`), into one directory.

The same inputs give byte-identical ``report.json`` and ``report.md`` (for the same icprune
and torch versions, which the report records).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from icprune.files import atomic_write
from icprune.planning import PruningPlan
from icprune.report.text import markdown
from icprune.scoring import LayerScores, normalize

#: The plot files of a report, in the order report.md shows them, with their captions.
PLOTS = {
    "channels_kept.png": "Channels kept per layer",
    "capacity_vs_independence.png": "Capacity vs independence per layer",
    "score_distributions.png": "Score distributions per layer",
}
#: Every file :func:`write_report` writes.
REPORT_FILES = ("report.json", "report.md", *PLOTS)


@dataclass(frozen=True)
class ModelSummary:
    """What a report says about one model (before or after pruning).

    Attributes:
        macs: multiply-accumulates of one forward pass at the report's input size (int >= 0;
            e.g. from :func:`icprune.count`).
        params: number of parameters (int >= 0).
        accuracy: top-1 accuracy as a fraction in [0, 1] (e.g. from
            :func:`icprune.evaluation.accuracy`), or None if not measured.
        latency_s: seconds per forward pass (> 0; e.g. from :func:`icprune.evaluation.latency`),
            or None if not measured.
    """

    macs: int
    params: int
    accuracy: float | None = None
    latency_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("macs", "params"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelSummary: {name} must be an int >= 0, got {value!r}")
        if self.accuracy is not None and not _finite(self.accuracy, 0.0, 1.0):
            raise ValueError(
                f"ModelSummary: accuracy must be a fraction in [0, 1] or None, got "
                f"{self.accuracy!r}"
            )
        if self.latency_s is not None and not (
            _finite(self.latency_s, 0.0, math.inf) and self.latency_s > 0
        ):
            raise ValueError(
                f"ModelSummary: latency_s must be seconds > 0 or None, got {self.latency_s!r}"
            )

    def to_dict(self) -> dict:
        """``{"macs": int, "params": int, "accuracy": float | None, "latency_s": float | None}``."""
        return asdict(self)


def _finite(value: object, low: float, high: float) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value) and low <= value <= high


def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def _layers(plan: PruningPlan, scores: Mapping[str, LayerScores]) -> list[dict]:
    """One row per layer of ``scores`` (in its order), then per planned layer without scores;
    each row carries the kept-channel mask and the normalised scores for the plots."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"write_report: scores must map layer -> LayerScores, got {type(scores)}")
    if not scores:
        raise ValueError(
            "write_report: scores is empty; pass the LayerScores the plan was made from"
        )
    keep = plan.keep
    rows = []
    for name, value in scores.items():
        if not isinstance(value, LayerScores):
            raise TypeError(
                f"write_report: scores[{name!r}] is a {type(value).__name__}; pass the "
                f"LayerScores of icprune.score"
            )
        # capacity and independence are None for the consumer-side criteria
        parts = [p for p in (value.capacity, value.independence, value.score) if p is not None]
        c = value.score.numel()
        if any(p.dim() != 1 or p.numel() != c for p in parts):
            raise ValueError(
                f"write_report: scores[{name!r}] has capacity, independence and score of shapes "
                f"{[tuple(p.shape) for p in parts]}; all must be Tensor[C]"
            )
        capacity, independence, score = (
            None if p is None else p.detach().to("cpu", torch.float64)
            for p in (value.capacity, value.independence, value.score)
        )
        if not all(torch.isfinite(p).all() for p in parts):
            raise ValueError(f"write_report: scores[{name!r}] holds NaN or Inf")
        if name in plan.sizes and plan.sizes[name][0] != c:
            raise ValueError(
                f"write_report: scores[{name!r}] has {c} channels but the plan's layer has "
                f"{plan.sizes[name][0]}; the scores and the plan must come from the same model"
            )
        indices = keep.get(name)
        mask = torch.ones(c, dtype=torch.bool)
        if indices is not None:
            mask = torch.zeros(c, dtype=torch.bool)
            mask[indices] = True
        rows.append(_row(name, mask, capacity, independence, score))
    for name, indices in keep.items():
        if name not in scores and indices is not None:
            mask = torch.zeros(plan.sizes[name][0], dtype=torch.bool)
            mask[indices] = True
            rows.append(_row(name, mask))
    return rows


def _row(
    name: str,
    mask: torch.Tensor,
    capacity: torch.Tensor | None = None,
    independence: torch.Tensor | None = None,
    score: torch.Tensor | None = None,
) -> dict:
    """The report row of one layer (``mask``: Tensor[C] bool, True = kept; the score parts
    Tensor[C] float64 or None), plus ``_mask`` and ``_scores`` for the plots."""
    c, kept = mask.numel(), int(mask.sum())

    def mean(values: torch.Tensor | None, where: torch.Tensor | None = None) -> float | None:
        if values is not None and where is not None:
            values = values[where]
        return None if values is None or values.numel() == 0 else float(values.mean())

    margin = None
    if score is not None and 0 < kept < c:
        margin = float(score[mask].min() - score[~mask].max())
    return {
        "layer": name,
        "channels": c,
        "kept": kept,
        "pruned_share": 1 - kept / c,
        "capacity_mean": mean(capacity),
        "capacity_mean_kept": mean(capacity, mask),
        "capacity_mean_pruned": mean(capacity, ~mask),
        "independence_mean": mean(independence),
        "independence_mean_kept": mean(independence, mask),
        "independence_mean_pruned": mean(independence, ~mask),
        "score_mean": mean(score),
        "score_mean_kept": mean(score, mask),
        "score_mean_pruned": mean(score, ~mask),
        "score_margin": margin,
        "kept_indices": mask.nonzero().flatten().tolist(),
        "_mask": mask.numpy(),
        "_scores": None if score is None else (capacity, independence, normalize(score, "minmax")),
    }


def _check_json(name: str, value: object) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"write_report: {name} must hold only JSON values (str, finite numbers, bool, None, "
            f"lists, dicts with str keys): {exc}"
        ) from None


def write_report(
    out_dir: str | Path,
    *,
    plan: PruningPlan,
    scores: Mapping[str, LayerScores],
    before: ModelSummary,
    after: ModelSummary,
    settings: dict,
    timings: Mapping[str, float] | None = None,
    title: str = "icprune report",
) -> dict:
    """Write ``report.json``, ``report.md`` and the PNG plots of :data:`PLOTS` into ``out_dir``.

    Args:
        out_dir: an existing directory; only the five files above are written (overwritten if
            present).
        plan: the :class:`PruningPlan` that was applied; ``plan.keep`` gives each planned
            layer's kept output channels.
        scores: ``layer -> LayerScores`` (each Tensor[C] float64: capacity in nats,
            independence, fused score), e.g. from :func:`icprune.score`. A scored layer absent
            from the plan keeps all its channels; a planned layer without scores is listed
            with its channel counts only.
        before: the unpruned model's :class:`ModelSummary`.
        after: the pruned (and possibly fine-tuned) model's :class:`ModelSummary`.
        settings: the options of the run, JSON values (e.g. ``{"flops_reduction": 0.5}``).
        timings: ``step -> seconds`` (finite, >= 0), e.g. ``{"calibrate": 2.1}``, or None.
        title: the report's heading (one line).

    Returns:
        the content of ``report.json`` as a dict: ``title``, ``versions`` (icprune, torch),
        ``settings``, ``before``/``after`` (:meth:`ModelSummary.to_dict`), ``change``
        (``macs_ratio``, ``params_ratio``, ``latency_ratio``: after/before; ``speedup``:
        before/after latency; ``accuracy_change``: after - before; None where unknown),
        ``plan`` (``macs``/``params`` [before, after] from the analytic count,
        ``flops_reduction``, ``params_reduction``, the plan's ``settings``), ``layers`` (one
        row per layer: ``layer``, ``channels``, ``kept``, ``pruned_share``; the means of
        capacity, independence and score over all, the kept and the pruned channels
        (``capacity_mean``, ``capacity_mean_kept``, ``capacity_mean_pruned``, likewise
        ``independence_mean*`` and ``score_mean*``; ``score_mean`` is 0 under z-score
        normalisation); ``score_margin``, the lowest kept score minus the highest pruned one
        (negative where a coupled group outvoted a layer's own scores) - all None without
        scores or channels to average - and ``kept_indices``),
        ``timings`` and ``plots`` (file names).

    Every file is written atomically (a temporary file renamed over it): a failed write
    leaves an older file of that name as it was.

    Raises:
        FileNotFoundError: ``out_dir`` is not an existing directory.
        OSError: a file cannot be written.
        TypeError: arguments of the wrong type, or settings/timings that are not JSON values.
        ValueError: empty scores, scores that do not match the plan (channel counts) or hold
            NaN/Inf; a title with a line break; negative or non-finite
            timings.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(
            f"write_report: out_dir {str(out)!r} is not an existing directory; create it first"
        )
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"write_report: plan must be a PruningPlan, got {type(plan).__name__}")
    for name, summary in (("before", before), ("after", after)):
        if not isinstance(summary, ModelSummary):
            raise TypeError(
                f"write_report: {name} must be a ModelSummary, got {type(summary).__name__}"
            )
    if not isinstance(title, str) or "\n" in title or not title.strip():
        raise ValueError(f"write_report: title must be one non-empty line, got {title!r}")
    if not isinstance(settings, Mapping):
        raise TypeError(f"write_report: settings must be a dict, got {type(settings).__name__}")
    settings = dict(settings)
    _check_json("settings", settings)
    timings = dict(timings or {})
    for step, seconds in timings.items():
        if not isinstance(step, str) or not _finite(seconds, 0.0, math.inf):
            raise ValueError(
                f"write_report: timings must map step names to seconds >= 0, got "
                f"{step!r}: {seconds!r}"
            )
    rows = _layers(plan, scores)
    # capacity vs independence exists for the paper's criterion ("icii") only
    icii = all(r["_scores"][0] is not None for r in rows if r["_scores"] is not None)
    plots = {k: v for k, v in PLOTS.items() if icii or k != "capacity_vs_independence.png"}
    report = {
        "title": title,
        "versions": {"icprune": version("icprune"), "torch": torch.__version__},
        "settings": settings,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "change": {
            "macs_ratio": _ratio(after.macs, before.macs),
            "params_ratio": _ratio(after.params, before.params),
            "latency_ratio": _ratio(after.latency_s, before.latency_s),
            "speedup": _ratio(before.latency_s, after.latency_s),
            "accuracy_change": None
            if before.accuracy is None or after.accuracy is None
            else after.accuracy - before.accuracy,
        },
        "plan": {
            "macs": list(plan.macs),
            "params": list(plan.params),
            "flops_reduction": plan.flops_reduction,
            "params_reduction": plan.params_reduction,
            "settings": plan.settings,
        },
        "layers": [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows],
        "timings": timings,
        "plots": list(plots),
    }
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    for name, content in (("report.json", text), ("report.md", markdown(report, plots))):
        with atomic_write(out / name) as tmp:
            tmp.write_text(content)
    _plot(out, rows)
    return json.loads(text)


def _plot(out: Path, rows: list[dict]) -> None:
    from icprune.report import (
        plots,  # matplotlib takes ~0.5 s to import: only when a report is made
    )

    names = [r["layer"] for r in rows]
    scored = [r for r in rows if r["_scores"] is not None]
    layers = [r["layer"] for r in scored]
    masks = [r["_mask"] for r in scored]
    capacity, independence, normalised = (
        [None if r["_scores"][i] is None else r["_scores"][i].numpy() for r in scored]
        for i in range(3)
    )
    with atomic_write(out / "channels_kept.png") as tmp:
        plots.channels_kept(tmp, names, [r["channels"] for r in rows], [r["kept"] for r in rows])
    if all(r["_scores"][0] is not None for r in scored):  # "icii" scores only
        with atomic_write(out / "capacity_vs_independence.png") as tmp:
            plots.capacity_vs_independence(tmp, layers, capacity, independence, masks)
    with atomic_write(out / "score_distributions.png") as tmp:
        plots.score_distributions(tmp, layers, normalised, masks)
