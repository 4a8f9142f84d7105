"""Exit codes of the ``icprune`` command, and the error that carries one.

Scripts can rely on these numbers:

==  ===========  ==============================================================================
0   OK           the command did what it was asked
1   FAILURE      the run itself failed: e.g. an unreachable target, NaN activations, a layer the
                 pruner cannot handle (the message says what to change)
2   USAGE        bad arguments: unknown options, values out of range, options that do not combine
3   MODEL        the model spec, factory or checkpoint cannot be loaded
4   DATA         the data spec cannot be read: no such path, an empty folder, an unreadable image
5   OUTPUT       ``--out`` exists (pass ``--force``) or cannot be written
130 INTERRUPTED  stopped with Ctrl-C
==  ===========  ==============================================================================
"""

from __future__ import annotations

from enum import IntEnum


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
