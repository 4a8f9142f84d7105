"""The ``icprune`` command line: ``icprune prune``, ``icprune score``, ``icprune demo``.

Run ``icprune --help`` or ``icprune <command> --help``; ``python -m icprune`` is the same
program. Exit codes are listed in :mod:`icprune.cli.exit_codes`. Progress bars and notes go
to stderr (bars only on a terminal, none with ``--quiet``); results go to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from icprune.cli.exit_codes import describe
from icprune.cli.launch import stop
from icprune.cli.parser import build_parser


def _run(args: argparse.Namespace) -> int:
    from icprune.cli import commands  # imported here so --help stays fast
    from icprune.cli.demo import run_demo

    if args.handler == "prune":
        return commands.run_prune(args)
    if args.handler == "score":
        return commands.run_score(args)
    return run_demo(args.out, force=args.force, progress=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``icprune`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        the exit code (see :class:`ExitCode`); argparse itself exits with 2 on bad arguments.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(_run(args))
    except (Exception, KeyboardInterrupt) as exc:
        described = describe(exc)
        if described is None:
            raise  # a bug of icprune: its traceback is what a report needs
        message, code = described
    finally:
        stop()
    print(f"icprune: error: {message}", file=sys.stderr)
    return int(code)
