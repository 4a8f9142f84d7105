"""The files of the application layer: torch files read safely, results written atomically.

- :func:`load_weights_only` reads a ``torch.save`` file with ``weights_only=True`` and turns
  every failure into a :class:`FileReadError` that says what is wrong in plain words. It never
  repeats torch's advice to re-run with ``weights_only=False``: a file that holds pickled
  Python objects is refused, not unpickled.
- :func:`atomic_write` writes a file whole or not at all: the content goes to a hidden
  temporary file next to it, which is renamed over the target (``os.replace``) only once it is
  complete, so a crash, Ctrl-C or a full disk never leaves a half-written file, and an older
  file of that name survives a failed write.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class FileReadError(ValueError):
    """A torch file that cannot be read with ``weights_only=True`` (the message says why).

    Attributes:
        unsafe: True when the file holds Python objects that would need unpickling.
    """

    def __init__(self, message: str, *, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe


def load_weights_only(path: str | os.PathLike, *, mmap: bool = False) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with clear errors.

    Args:
        path: an existing file.
        mmap: map tensor storages instead of reading them (only for zip-format files; a cheap
            check that a large file is complete and safe to read).

    Returns:
        the loaded object (tensors, containers and plain types only).

    Raises:
        FileReadError: ``"cannot read '<path>' with torch.load(weights_only=True): ..."``: the
            file is empty, truncated or not a torch file, or it holds Python objects other
            than tensors and plain containers (``"it holds a <class> object, which icprune does
            not unpickle"``).
    """
    name = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise FileReadError(
                f"cannot read {name!r} with torch.load(weights_only=True): it holds an object "
                f"of class {found.group(1)}, which icprune does not unpickle (unpickling can "
                f"run any code)",
                unsafe=True,
            ) from None
        refused = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        error = pickle.UnpicklingError(refused.group(1)) if refused else exc
    except Exception as exc:  # EOF, zip, format and I/O errors all mean "not a torch file"
        error = exc
    lines = str(error).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else ""  # torch's zip errors run on for lines
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
    empty = os.path.isfile(path) and os.path.getsize(path) == 0
    state = "the file is empty" if empty else "it is not a complete torch.save file"
    raise FileReadError(
        f"cannot read {name!r} with torch.load(weights_only=True): {state} ({detail})"
    ) from None


def _temporary(path: Path) -> Path:
    """The hidden temporary file :func:`atomic_write` writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
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
