"""Build of the optional C++ extension ``icprune._C``; metadata lives in pyproject.toml.

The extension is optional: set ``ICPRUNE_BUILD_EXT=0`` to skip it, and a failed compile does not
fail the installation (icprune then warns once at import and falls back to torch).
"""

import os
import sys
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 is a build requirement; without it only the extension is lost
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed compile loudly and lets the installation go on."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            self._report(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._report(exc)

    @staticmethod
    def _report(exc):
        bar = "!" * 78
        print(
            f"\n{bar}\nicprune: the C++ extension icprune._C failed to build ({exc}).\n"
            "icprune will install and work without it, falling back to (slower) torch code.\n"
            f"Install a C++17 compiler and reinstall to get the fast CPU paths.\n{bar}\n",
            file=sys.stderr,
        )


def extensions():
    if os.environ.get("ICPRUNE_BUILD_EXT", "1") == "0" or Pybind11Extension is None:
        return []
    openmp = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]
    return [
        Pybind11Extension(
            "icprune._C",
            sorted(glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fno-trapping-math", *openmp],  # vectorises FP selects
            extra_link_args=openmp,
        )
    ]


setup(
    packages=[*find_packages(include=["icprune", "icprune.*"]), "icprune.kernels"],
    package_dir={"icprune": "icprune", "icprune.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
