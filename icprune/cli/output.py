"""Where the command writes: a fresh ``--out`` folder or file, never anything outside it.

:func:`claim` checks ``--out`` before any work (it may be written, it exists only with
``--force``); :class:`RunFolder` holds a prune or demo run's folder while the run writes it:
it creates the folder, takes an exclusive lock on it, writes every file atomically
(:func:`icprune.files.atomic_write`) and, if the run fails, removes a folder it created that
holds nothing, or says how to continue (``--resume``) or rerun (``--force``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from icprune.cli.exit_codes import CommandError, ExitCode, describe
from icprune.files import atomic_write
from icprune.planning import PruningPlan
from icprune.report import REPORT_FILES, write_report
from icprune.scoring import LayerScores
from icprune.serialization import save

SCORE_FORMATS = (".json", ".csv")
#: Files a pruning run writes into its folder besides the report.
MODEL_FILE = "model.pt"
PLAN_FILE = "plan.json"
SCORES_FILE = "scores.json"
#: The lock a run holds on its folder while it writes (an ``flock``, released when it ends).
LOCK_FILE = ".icprune.lock"


def _unused(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but possibly a lock file left by a killed run."""
    return all(entry.name == LOCK_FILE for entry in folder.iterdir())


def _probe(folder: Path, text: str) -> None:
    """Create and remove a file in ``folder``: fail now, not after the work, if it is read-only."""
    probe = folder / f".icprune-probe.{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise CommandError(
            f"--out {text!r}: cannot write in folder {os.fspath(folder)!r} "
            f"({exc.strerror or exc}); choose a writable --out",
            ExitCode.OUTPUT,
        ) from None


def claim(
    path: str | os.PathLike, *, force: bool, is_dir: bool, resumable: Iterable[str] = ()
) -> Path:
    """Check that the command may write ``path`` (before any work is done).

    Args:
        path: the ``--out`` folder (``is_dir=True``) or file.
        force: allow an existing one; files the command writes are replaced, others are left.
            An existing folder that is empty (or holds only a lock file left by a killed run)
            needs no ``force``.
        is_dir: whether ``path`` is a folder to create.
        resumable: names of checkpoints in the folder that ``--resume`` continues from: the
            message refusing an existing folder that holds one suggests ``--resume``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CommandError (USAGE): an empty ``path``.
        CommandError (OUTPUT): it exists and ``force`` is False, it exists as the wrong kind
            (a file for a folder or the reverse), it is a broken symbolic link, its parent
            folder does not exist, or the folder it would be written in is not writable (a
            file is created and removed there to find out).
    """
    text = os.fspath(path)
    if not text.strip():
        raise CommandError("--out is empty: name the folder or file to write", ExitCode.USAGE)
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CommandError(
            f"--out {text!r} is a broken symbolic link (to {os.readlink(path)!r}); choose "
            f"another path",
            ExitCode.OUTPUT,
        )
    if path.exists():
        if path.is_dir() != is_dir:
            kind = "a folder" if path.is_dir() else "a file"
            raise CommandError(f"--out {text!r} is {kind}; choose another path", ExitCode.OUTPUT)
        if not force and not (is_dir and _unused(path)):
            saved = [name for name in resumable if (path / name).is_file()]
            if saved:
                raise CommandError(
                    f"--out {text!r} already exists and holds the calibration checkpoint "
                    f"{saved[0]} of a run that stopped: pass --resume to continue it, --force "
                    f"to start over, or choose another path",
                    ExitCode.OUTPUT,
                )
            raise CommandError(
                f"--out {text!r} already exists; pass --force to overwrite the files "
                f"icprune writes there, or choose another path",
                ExitCode.OUTPUT,
            )
    parent = path.resolve().parent
    if not parent.is_dir():
        raise CommandError(
            f"--out {text!r}: folder {os.fspath(parent)!r} does not exist", ExitCode.OUTPUT
        )
    _probe(path if is_dir and path.is_dir() else parent, text)
    return path


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (disk full, permissions) into a
    :class:`CommandError` with the OUTPUT exit code."""
    try:
        yield
    except OSError as exc:
        where = os.fspath(path)
        if exc.filename is not None:  # name the file, not atomic_write's temporary one
            name = os.path.basename(os.fspath(exc.filename))
            temporary = re.fullmatch(r"\.(.+)\.\d+\.tmp", name)
            where = (
                os.path.join(os.path.dirname(os.fspath(exc.filename)), temporary[1])
                if temporary
                else os.fspath(exc.filename)
            )
        raise CommandError(
            f"--out {os.fspath(path)!r}: cannot write {where!r} ({exc.strerror or exc})",
            ExitCode.OUTPUT,
        ) from exc


def _lock(folder: Path) -> int:
    """Take the exclusive lock of ``folder`` (an ``flock`` on :data:`LOCK_FILE`, which holds
    the owner's pid and host); returns its file descriptor."""
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise CommandError(
                f"--out {os.fspath(folder)!r} is in use by another icprune run ({holder}); "
                f"wait until it ends, or choose another --out",
                ExitCode.OUTPUT,
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous owner removed the file between our open and flock
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


class RunFolder:
    """The ``--out`` folder of a ``prune`` or ``demo`` run, while the run writes it.

    Use it as a context manager around the whole run. Entering creates the folder (unless it
    exists) and takes its lock, so a second run into the same folder fails at once (OUTPUT).
    Leaving releases the lock. If the run failed (any exception, Ctrl-C included), a folder the
    run created and that holds nothing is removed, so the same command can simply be rerun;
    otherwise the error's message gets a hint: ``--resume`` when one of ``checkpoints`` exists,
    ``--force`` when the run left files behind.

    Args:
        path: the folder (checked by :func:`claim`).
        checkpoints: names of the calibration checkpoints this run writes in the folder.
        primary: whether this process owns the folder (process 0 under torchrun); the others
            only write their checkpoints into it, once the primary has created it.
    """

    def __init__(self, path: Path, *, checkpoints: Iterable[str] = (), primary: bool = True):
        self.path = path
        self.checkpoints = tuple(checkpoints)
        self.primary = primary
        self.created = False
        self._lock: int | None = None

    def __enter__(self) -> RunFolder:
        if not self.primary:
            return self  # the primary process creates the folder before the others write
        with writing(self.path):
            try:
                self.path.mkdir()
                self.created = True
            except FileExistsError:
                if not self.path.is_dir():
                    raise CommandError(
                        f"--out {os.fspath(self.path)!r} was created as a file meanwhile; "
                        f"choose another path",
                        ExitCode.OUTPUT,
                    ) from None
            try:
                self._lock = _lock(self.path)
            except BaseException:
                self._remove_if_unused()
                raise
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if not self.primary:
            return False
        if self._lock is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)  # before closing: see _lock
            os.close(self._lock)
            self._lock = None
        if exc is None:
            return False
        self._remove_if_unused()
        hint = self._hint()
        described = describe(exc)
        if hint and described is not None:
            message, code = described
            if "--resume" in message or "--force" in message:
                return False  # the message already says how to go on
            raise CommandError(f"{message}; {hint}", code) from exc
        return False

    def _remove_if_unused(self) -> None:
        if self.created and self.path.is_dir() and _unused(self.path):
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.path.rmdir()

    def _hint(self) -> str | None:
        where = os.fspath(self.path)
        saved = [name for name in self.checkpoints if (self.path / name).is_file()]
        if saved:
            return (
                f"the calibration so far is saved in {where}/{saved[0]}: rerun the command "
                f"with --resume to continue from it (the pruning options may change), or with "
                f"--force to start over"
            )
        if self.path.is_dir() and self.created:
            return (
                f"{where} holds the files this run wrote before it stopped; rerun with --force "
                f"to replace them"
            )
        return None

    def discard(self, names: Iterable[str]) -> None:
        """Remove these files of icprune's from the folder, where present."""
        with writing(self.path):
            for name in names:
                (self.path / name).unlink(missing_ok=True)

    def write_results(
        self,
        *,
        pruned: nn.Module,
        plan: PruningPlan,
        scores: Mapping[str, LayerScores],
        settings: Mapping[str, object],
    ) -> None:
        """Write ``model.pt`` (:func:`icprune.save`), ``plan.json`` and ``scores.json``
        (as :func:`write_scores`). All three are written completely to temporary files first;
        only then are an older run's report files removed and the three renamed into place, so
        a failed write (a full disk) leaves the folder's files as they were, and the folder
        never mixes the model of one run with the plan or report of another.

        Raises:
            CommandError (OUTPUT): a file cannot be written.
        """
        text = _scores_text(scores, ".json", settings)
        with (
            writing(self.path),
            atomic_write(self.path / MODEL_FILE) as model_tmp,
            atomic_write(self.path / PLAN_FILE) as plan_tmp,
            atomic_write(self.path / SCORES_FILE) as scores_tmp,
        ):
            try:
                save(pruned, model_tmp)
            except RuntimeError as exc:  # torch.save reports I/O failures as RuntimeError
                lines = str(exc).strip().splitlines() or ["torch.save failed"]
                raise OSError(errno.EIO, lines[-1], os.fspath(model_tmp)) from exc
            plan_tmp.write_text(plan.to_json())
            scores_tmp.write_text(text)
            self.discard(REPORT_FILES)

    def write_report(self, **report) -> dict:
        """:func:`icprune.write_report` into the folder (arguments as there, without
        ``out_dir``); returns the report dict.

        Raises:
            CommandError (OUTPUT): a file cannot be written.
        """
        with writing(self.path):
            return write_report(self.path, **report)


def _rows(scores: Mapping[str, LayerScores]) -> list[dict[str, object]]:
    """One row per channel, in layer order then channel order."""
    rows = []
    for layer, s in scores.items():
        n = s.score.numel()
        capacity = s.capacity.tolist() if s.capacity is not None else [None] * n
        independence = s.independence.tolist() if s.independence is not None else [None] * n
        columns = zip(capacity, independence, s.score.tolist(), strict=True)
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


def _cell(value: float | None) -> str:
    """A CSV cell: the float's repr, empty for None (a criterion without that part)."""
    return "" if value is None else repr(value)


def _scores_text(scores: Mapping[str, LayerScores], suffix: str, settings) -> str:
    if suffix == ".json":
        layers = {
            name: {
                "capacity": None if s.capacity is None else s.capacity.tolist(),
                "independence": None if s.independence is None else s.independence.tolist(),
                "score": s.score.tolist(),
            }
            for name, s in scores.items()
        }
        return json.dumps({"settings": dict(settings), "layers": layers}, indent=1)
    lines = ["layer,channel,capacity,independence,score"]
    lines += [
        f"{r['layer']},{r['channel']},{_cell(r['capacity'])},{_cell(r['independence'])},"
        f"{r['score']!r}"
        for r in _rows(scores)
    ]
    return "\n".join(lines) + "\n"


def write_scores(
    scores: Mapping[str, LayerScores],
    path: str | os.PathLike,
    settings: Mapping[str, object],
    *,
    replace: bool = True,
) -> None:
    """Write scores as JSON (``{"settings": ..., "layers": {layer: {"capacity": [...],
    "independence": [...], "score": [...]}}}``) or CSV (``layer,channel,capacity,independence,
    score``, one row per channel), chosen by the suffix of ``path``. Floats are written with
    full precision (``repr``), so they read back bit-identical. The file is written atomically.

    Args:
        scores, settings: what to write.
        path: the ``.json`` or ``.csv`` file.
        replace: replace an existing file (True), or fail if one exists (False: e.g. another
            run wrote it while this one was working).

    Raises:
        CommandError (USAGE): a suffix other than ``.json`` or ``.csv``.
        CommandError (OUTPUT): the file cannot be written, or exists and ``replace`` is False.
    """
    check_scores_path(path)
    path = Path(path)
    text = _scores_text(scores, path.suffix.lower(), settings)
    try:
        with writing(path), atomic_write(path, replace=replace) as tmp:
            tmp.write_text(text)
    except CommandError as exc:
        if isinstance(exc.__cause__, FileExistsError):
            raise CommandError(
                f"--out {os.fspath(path)!r} was created by someone else while this run was "
                f"working; it is left alone: pass --force to overwrite it, or choose another path",
                ExitCode.OUTPUT,
            ) from None
        raise


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the wall-clock seconds of the ``with`` block as ``timings[step]``."""
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start
