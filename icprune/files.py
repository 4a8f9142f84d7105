"""Reading and writing icprune's ``torch.save`` files safely.

- :func:`load_torch_file` reads with ``torch.load(weights_only=True)`` only (tensors and plain
  Python values: no pickled code ever runs) and turns torch's errors into messages that say what
  is wrong with the file, never inviting ``weights_only=False``.
- :func:`save_atomically` writes through a temporary file in the same folder and
  ``os.replace``: readers see the old file or the new one, never a half-written one, also when
  the writer is interrupted.
- :func:`exclusive` holds an advisory lock so that two processes do not write one file at once.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from collections.abc import Iterator

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (documented where they are used)
    fcntl = None


def load_torch_file(path: str | os.PathLike, what: str, map_location=None) -> object:
    """``torch.load(path, weights_only=True)`` with clear errors.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"calibration checkpoint"``).
        map_location: passed to ``torch.load``.

    Returns:
        the loaded object (tensors and plain Python values only).

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is empty, truncated or damaged, not a torch file, or holds Python
            objects other than tensors and plain values (which icprune never unpickles); the
            message names the file and what was found.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"{what} {name!r} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"{what} {name!r} is a folder, not a file")
    try:
        return torch.load(name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise ValueError(
                f"{what} {name!r} cannot be read: it is not a torch file (damaged, or another "
                f"format)"
            ) from None
        raise ValueError(
            f"{what} {name!r} cannot be read: it holds Python objects icprune does not load "
            f"({found.group(1)}); icprune reads only tensors and plain values from files, never "
            f"pickled code, so this file was not written by icprune (or was altered)"
        ) from None
    except EOFError:
        raise ValueError(f"{what} {name!r} cannot be read: it is empty or truncated") from None
    except (RuntimeError, OSError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        if "zip archive" in detail or "PytorchStreamReader" in detail:
            detail = "it is truncated or damaged"
        else:
            detail = f"{type(exc).__name__}: {detail}"
        raise ValueError(f"{what} {name!r} cannot be read: {detail}") from None


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


def save_atomically(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``.

    An interrupted or failed write leaves ``path`` as it was (and no temporary file behind).

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        OSError: the folder is not writable, the disk is full, ... (``path`` unchanged).
    """
    name = writable_folder(path, "file")
    folder, base = os.path.split(name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
