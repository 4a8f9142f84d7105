"""Where the command writes: a fresh ``--out`` folder or file, never anything outside it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from icprune.cli.exit_codes import CommandError, ExitCode
from icprune.planning import PruningPlan
from icprune.report import ModelSummary, write_report
from icprune.scoring import LayerScores
from icprune.serialization import save

SCORE_FORMATS = (".json", ".csv")
#: Files a pruning run writes into its folder besides the report.
MODEL_FILE = "model.pt"
PLAN_FILE = "plan.json"
SCORES_FILE = "scores.json"


def claim(path: str | os.PathLike, *, force: bool, is_dir: bool) -> Path:
    """Check that the command may write ``path`` (before any work is done).

    Args:
        path: the ``--out`` folder (``is_dir=True``) or file.
        force: allow an existing one; files the command writes are replaced, others are left.
        is_dir: whether ``path`` is a folder to create.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CommandError (OUTPUT): it exists and ``force`` is False, it exists as the wrong kind
            (a file for a folder or the reverse), or its parent folder does not exist.
    """
    path = Path(path)
    if path.exists():
        if path.is_dir() != is_dir:
            kind = "a folder" if path.is_dir() else "a file"
            raise CommandError(
                f"--out {os.fspath(path)!r} is {kind}; choose another path", ExitCode.OUTPUT
            )
        if not force:
            raise CommandError(
                f"--out {os.fspath(path)!r} already exists; pass --force to overwrite the files "
                f"icprune writes there, or choose another path",
                ExitCode.OUTPUT,
            )
    parent = path.resolve().parent
    if not parent.is_dir():
        raise CommandError(
            f"--out {os.fspath(path)!r}: folder {os.fspath(parent)!r} does not exist",
            ExitCode.OUTPUT,
        )
    return path


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (disk full, permissions) into a
    :class:`CommandError` with the OUTPUT exit code."""
    try:
        yield
    except OSError as exc:
        raise CommandError(
            f"--out {os.fspath(path)!r}: cannot write ({exc})", ExitCode.OUTPUT
        ) from exc


def _rows(scores: Mapping[str, LayerScores]) -> list[dict[str, object]]:
    """One row per channel, in layer order then channel order."""
    rows = []
    for layer, s in scores.items():
        columns = zip(s.capacity.tolist(), s.independence.tolist(), s.score.tolist(), strict=True)
        for channel, (cap, ind, fused) in enumerate(columns):
            rows.append(
                {
                    "layer": layer,
                    "channel": channel,
                    "capacity": cap,
                    "independence": ind,
                    "score": fused,
                }
            )
    return rows


def check_scores_path(path: str | os.PathLike) -> None:
    """Check that ``path`` names a scores file :func:`write_scores` can write.

    Raises:
        CommandError (USAGE): a suffix other than ``.json`` or ``.csv``.
    """
    if Path(path).suffix.lower() not in SCORE_FORMATS:
        raise CommandError(
            f"--out {os.fspath(path)!r}: write scores to a {' or '.join(SCORE_FORMATS)} file",
            ExitCode.USAGE,
        )


def write_scores(
    scores: Mapping[str, LayerScores], path: str | os.PathLike, settings: Mapping[str, object]
) -> None:
    """Write scores as JSON (``{"settings": ..., "layers": {layer: {"capacity": [...],
    "independence": [...], "score": [...]}}}``) or CSV (``layer,channel,capacity,independence,
    score``, one row per channel), chosen by the suffix of ``path``. Floats are written with
    full precision (``repr``), so they read back bit-identical.

    Raises:
        CommandError (USAGE): a suffix other than ``.json`` or ``.csv``.
    """
    check_scores_path(path)
    path = Path(path)
    if path.suffix.lower() == ".json":
        layers = {
            name: {
                "capacity": s.capacity.tolist(),
                "independence": s.independence.tolist(),
                "score": s.score.tolist(),
            }
            for name, s in scores.items()
        }
        path.write_text(json.dumps({"settings": dict(settings), "layers": layers}, indent=1))
    else:
        lines = ["layer,channel,capacity,independence,score"]
        lines += [
            f"{r['layer']},{r['channel']},{r['capacity']!r},{r['independence']!r},{r['score']!r}"
            for r in _rows(scores)
        ]
        path.write_text("\n".join(lines) + "\n")


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the wall-clock seconds of the ``with`` block as ``timings[step]``."""
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start


def write_run(
    out: Path,
    *,
    pruned: nn.Module,
    plan: PruningPlan,
    scores: Mapping[str, LayerScores],
    before: ModelSummary,
    after: ModelSummary,
    settings: Mapping[str, object],
    timings: Mapping[str, float],
    title: str,
) -> dict:
    """Write a finished pruning run into ``out`` (created if missing): ``model.pt``
    (:func:`icprune.save`), ``plan.json``, ``scores.json`` (:func:`write_scores`) and the report
    (:func:`icprune.write_report`).

    Returns:
        the report as a dict (see :func:`icprune.write_report`).

    Raises:
        CommandError (OUTPUT): a file cannot be written.
    """
    with writing(out):
        out.mkdir(exist_ok=True)
        save(pruned, out / MODEL_FILE)
        (out / PLAN_FILE).write_text(plan.to_json())
        write_scores(scores, out / SCORES_FILE, settings)
        return write_report(
            out,
            plan=plan,
            scores=scores,
            before=before,
            after=after,
            settings=dict(settings),
            timings=timings,
            title=title,
        )
