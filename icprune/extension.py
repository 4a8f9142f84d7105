"""The optional C++ extension ``icprune._C``, loaded once.

If it is missing (no compiler at install time, or ``ICPRUNE_BUILD_EXT=0``), icprune works on
torch code alone and says so once, at import, with a ``RuntimeWarning`` - unless
``ICPRUNE_BUILD_EXT=0`` is set, which means the user chose to go without it.
"""

from __future__ import annotations

import os
import warnings

try:
    import icprune._C as ext

    LOAD_ERROR: str | None = None
except ImportError as exc:
    ext = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

#: True when the compiled extension is importable.
HAVE_EXT = ext is not None

if not HAVE_EXT and os.environ.get("ICPRUNE_BUILD_EXT", "1") != "0":
    warnings.warn(
        f"icprune: the C++ extension icprune._C is not available ({LOAD_ERROR}); falling back to "
        "torch code, which is slower on the CPU. Reinstall icprune with a C++17 compiler to get "
        "it (pip's -v output shows why the build failed), or set ICPRUNE_BUILD_EXT=0 to go "
        "without it silently.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict[str, object]:
    """How icprune's compiled part was built.

    Returns:
        dict with ``"extension"`` (bool, icprune._C importable), ``"load_error"`` (str or None)
        and, when the extension is present, its ``"compiler"``, ``"cxx_standard"``, ``"openmp"``
        and ``"max_threads"``.
    """
    info: dict[str, object] = {"extension": HAVE_EXT, "load_error": LOAD_ERROR}
    if ext is not None:
        info.update(ext.build_info())
    return info
