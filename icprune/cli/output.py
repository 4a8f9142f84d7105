"""Where the command writes: a fresh ``--out`` folder or file, never anything outside it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from icprune.cli.exit_codes import CommandError, ExitCode
from icprune.scoring import LayerScores

SCORE_FORMATS = (".json", ".csv")


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
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        layers = {
            name: {
                "capacity": s.capacity.tolist(),
                "independence": s.independence.tolist(),
                "score": s.score.tolist(),
            }
            for name, s in scores.items()
        }
        path.write_text(json.dumps({"settings": dict(settings), "layers": layers}, indent=1))
    elif suffix == ".csv":
        lines = ["layer,channel,capacity,independence,score"]
        lines += [
            f"{r['layer']},{r['channel']},{r['capacity']!r},{r['independence']!r},{r['score']!r}"
            for r in _rows(scores)
        ]
        path.write_text("\n".join(lines) + "\n")
    else:
        raise CommandError(
            f"--out {os.fspath(path)!r}: write scores to a {' or '.join(SCORE_FORMATS)} file",
            ExitCode.USAGE,
        )
