"""``python -m bench.quality``: see :mod:`bench.quality.run`."""

from bench.quality.run import main

if __name__ == "__main__":
    main()
