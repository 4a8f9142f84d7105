"""The defaults chosen on the selection split (see docs/quality.md), for the tracks that do not
choose for themselves (bench.quality.lite0) and for the package's later adoption.

:func:`bench.quality.run.choose` recomputes the choice from the selection rows on every full
run; docs/quality.md says whether it still agrees with these constants.
"""

#: Best criterion with data (consumer-side, with repair + BN re-estimation).
DATA_DEFAULT = "greedy"
#: Best data-free criterion (with BN re-estimation).
DATA_FREE_DEFAULT = "wbn"
