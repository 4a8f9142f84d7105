"""The measured rows of a comparison and what is computed from them (no I/O, no running).

:mod:`bench.quality.run` fills a :class:`Results`; :mod:`bench.quality.report` reads it. Both
import this module and neither imports the other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, stdev


@dataclass(frozen=True)
class Row:
    """One measurement: test accuracy (fraction in [0, 1]) of one pruned model.

    Attributes:
        split: ``"selection"`` or ``"confirmation"``.
        arch, kind: network name and its architecture kind (:data:`bench.quality.models.KINDS`).
        seed: training seed of the network.
        criterion: name in :func:`bench.quality.criteria.registry`.
        target: MAC reduction asked for; reduction: the one reached (fractions).
        pipeline: recovery steps (:data:`bench.quality.pipeline.PIPELINES`).
    """

    split: str
    arch: str
    kind: str
    seed: int
    criterion: str
    target: float
    pipeline: str
    accuracy: float
    reduction: float


@dataclass
class Results:
    """Rows, unpruned accuracies ``"arch/seed" -> accuracy``, the defaults chosen on the
    selection split (``"data"``/``"data-free"`` -> criterion name), diagnosis tables and
    wall-clock seconds per phase."""

    rows: list[Row] = field(default_factory=list)
    unpruned: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict)
    diagnosis: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def select(self, **where) -> list[Row]:
        """Rows whose fields equal ``where``."""
        return [r for r in self.rows if all(getattr(r, k) == v for k, v in where.items())]

    def values(self, **where) -> list[float]:
        return [r.accuracy for r in self.select(**where)]

    def seed_means(self, archs, seeds, **where) -> list[float]:
        """Per seed, the mean accuracy over ``archs`` of the matching rows (seeds with no row are
        left out)."""
        out = []
        for s in seeds:
            per = [self.values(arch=a, seed=s, **where) for a in archs]
            per = [mean(v) for v in per if v]
            if per:
                out.append(mean(per))
        return out

    def save(self, path: Path) -> None:
        data = asdict(self)
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Results:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["rows"] = [Row(**r) for r in data["rows"]]
        return cls(**data)


def cell(values: list[float]) -> str:
    """``mean ± std`` in percent (std over the values, 0 for one value)."""
    if not values:
        return "-"
    spread = stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean(values):.1f} ± {100 * spread:.1f}"
