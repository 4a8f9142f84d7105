"""Reading and writing icprune's files safely: one loader, one atomic writer, one lock.

- :func:`load_torch_file` reads with ``torch.load(weights_only=True)`` only (tensors and plain
  Python values: no pickled code ever runs) and turns torch's errors into a
  :class:`FileReadError` that says what is wrong with the file, never inviting
  ``weights_only=False``.
- :func:`atomic_write` writes a file whole or not at all: the content goes to a hidden
  temporary file next to it, renamed over the target (``os.replace``) only once it is complete,
  so a crash, Ctrl-C or a full disk never leaves a half-written file, and an older file of that
  name survives a failed write. :func:`save_atomically` is ``torch.save`` through it.
- :func:`exclusive` holds an advisory lock so that two processes do not write one file at once.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (documented where they are used)
    fcntl = None


class FileReadError(ValueError):
    """A torch file that cannot be read with ``weights_only=True`` (the message says why).

    Attributes:
        unsafe: True when the file holds Python objects that would need unpickling.
    """

    def __init__(self, message: str, *, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe


def load_torch_file(
    path: str | os.PathLike, what: str = "file", *, map_location="cpu", mmap: bool = False
) -> object:
    """``torch.load(path, weights_only=True)`` with clear errors.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"calibration checkpoint"``).
        map_location: passed to ``torch.load`` (default: CPU).
        mmap: map tensor storages instead of reading them (zip-format files only; a cheap check
            that a large file is complete and safe to read).

    Returns:
        the loaded object (tensors, containers and plain Python values only).

    Raises:
        FileNotFoundError: there is no such file.
        FileReadError (a ``ValueError``): ``"<what> '<path>' cannot be read: <why>"`` - the path
            is a folder, the file is empty, truncated, damaged or not a torch file, or it holds
            Python objects other than tensors and plain values (``unsafe=True``; icprune never
            unpickles them).
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"{what} {name!r} does not exist")
    if os.path.isdir(name):
        raise FileReadError(f"{what} {name!r} cannot be read: it is a folder, not a file")
    prefix = f"{what} {name!r} cannot be read"
    try:
        return torch.load(name, map_location=map_location, weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found is not None:
            raise FileReadError(
                f"{prefix}: it holds Python objects icprune does not load (an object of class "
                f"{found.group(1)}); icprune reads only tensors and plain values from files and "
                f"never unpickles code, which could run anything",
                unsafe=True,
            ) from None
    except (FileNotFoundError, PermissionError):
        raise
    except Exception:  # EOF, zip, format and I/O errors all mean "not a complete torch file"
        pass
    if os.path.getsize(name) == 0:
        raise FileReadError(f"{prefix}: the file is empty") from None
    raise FileReadError(
        f"{prefix}: it is not a complete torch.save file (truncated, damaged or another format)"
    ) from None


def writable_folder(path: str | os.PathLike, what: str) -> str:
    """The absolute path of ``path``, after checking that its folder exists and that ``path``
    is not itself a folder.

    Raises:
        FileNotFoundError: the folder does not exist (create it first).
        IsADirectoryError: ``path`` is a folder.
    """
    name = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} {name!r}: the folder {folder!r} does not exist")
    if os.path.isdir(name):
        raise IsADirectoryError(f"{what} {name!r} is a folder; pass a file path")
    return name


def _temporary(path: Path) -> Path:
    """The hidden temporary file :func:`atomic_write` writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Write ``path`` atomically: the ``with`` block writes the yielded temporary path (in the
    same folder, so the rename cannot cross file systems), which then becomes ``path``.

    Args:
        path: the file to create or replace.
        replace: replace an existing ``path`` (True), or fail if one exists by the time the
            content is complete (False; ``os.link`` creates ``path`` only if it is absent).

    Yields:
        the temporary path to write (any suffix-based format must be chosen from ``path``).

    Raises:
        FileExistsError: ``replace=False`` and ``path`` exists.
        OSError: the folder cannot be written (permissions, a full disk); any error of the
            ``with`` block is re-raised. In every failure the temporary file is removed and an
            existing ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # FileExistsError if another run wrote path meanwhile
    finally:
        tmp.unlink(missing_ok=True)


def save_atomically(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`, flushed to disk before the rename.

    An interrupted or failed write leaves ``path`` as it was (and no temporary file behind).

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        OSError: the folder is not writable, the disk is full, ... (``path`` unchanged).
    """
    name = writable_folder(path, "file")
    with atomic_write(name) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path + ".lock"`` while the block runs.

    The lock is released (and its file removed) when the block ends, and by the operating system
    when the process dies, so a crash leaves no stale lock. A no-op where ``fcntl`` is missing
    (Windows).

    Raises:
        RuntimeError: another process holds the lock (the message names ``what`` and the file).
        FileNotFoundError, IsADirectoryError: as :func:`writable_folder`.
    """
    if fcntl is None:
        yield
        return
    lock = f"{writable_folder(path, what)}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another process is writing {what} {os.fspath(path)!r} (it holds {lock!r}); "
                f"wait for it to finish, or use another path"
            ) from None
        try:  # the file may have been removed by its previous holder after we opened it
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
