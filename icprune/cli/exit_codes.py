"""Exit codes of the ``icprune`` command, and the error that carries one.

Scripts can rely on these numbers:

==  ===========  ==============================================================================
0   OK           the command did what it was asked
1   FAILURE      the run itself failed: e.g. an unreachable target, NaN activations, a layer the
                 pruner cannot handle, out of memory (the message says what to change)
2   USAGE        bad arguments: unknown options, values out of range, options that do not combine
3   MODEL        the model spec, factory or checkpoint cannot be loaded
4   DATA         the data spec cannot be read: no such path, an empty folder, an unreadable image,
                 labels outside the model's classes, data the model cannot run on
5   OUTPUT       ``--out`` exists (pass ``--force``), is in use by another run or cannot be
                 written; a ``--resume`` checkpoint that is missing or damaged
130 INTERRUPTED  stopped with Ctrl-C
==  ===========  ==============================================================================

:func:`describe` maps an exception to the message and code the command reports.
"""

from __future__ import annotations

from enum import IntEnum

from icprune.cli.data_specs import DataLoadError
from icprune.cli.zoo import ModelLoadError


class ExitCode(IntEnum):
    """Process exit status of ``icprune`` (see the module docstring)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    MODEL = 3
    DATA = 4
    OUTPUT = 5
    INTERRUPTED = 130


class CommandError(Exception):
    """An error the command reports as ``icprune: error: <message>`` and exits with ``code``."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text
    )


def describe(exc: BaseException) -> tuple[str, ExitCode] | None:
    """The one-line report of ``exc`` and the exit code of the command that raised it.

    ``CommandError`` keeps its code; :class:`~icprune.cli.zoo.ModelLoadError` is MODEL,
    :class:`~icprune.cli.data_specs.DataLoadError` DATA, ``KeyboardInterrupt`` INTERRUPTED, and the
    errors of a failed run (``ValueError``, ``TypeError``, ``RuntimeError``, ``MemoryError``,
    and an ``OSError`` no check turned into a clearer error) FAILURE, an exhausted memory said
    so. Anything else is a bug of icprune: None (the caller
    lets it propagate with its traceback).
    """
    if isinstance(exc, CommandError):
        return str(exc), exc.code
    if isinstance(exc, ModelLoadError):
        return str(exc), ExitCode.MODEL
    if isinstance(exc, DataLoadError):
        return str(exc), ExitCode.DATA
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", ExitCode.INTERRUPTED
    if _out_of_memory(exc):
        detail = str(exc).strip() or type(exc).__name__
        return f"out of memory ({detail}); use smaller batches or inputs", ExitCode.FAILURE
    if isinstance(exc, (ValueError, TypeError, RuntimeError, OSError)):
        return str(exc), ExitCode.FAILURE
    return None
