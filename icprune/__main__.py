"""``python -m icprune``: the ``icprune`` command line (see :mod:`icprune.cli`)."""

from icprune.cli import main

raise SystemExit(main())
