"""The optional C++ extension: present when built, and its absence is loud but harmless."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import icprune
from icprune import extension as _ext

ROOT = Path(__file__).resolve().parents[1]
MISSING_EXT = (
    "import sys; sys.modules['icprune._C'] = None\n"
    "import icprune, torch\n"
    "from icprune.models import resnet20\n"
    "s = icprune.score(resnet20(), source='weights')\n"
    "print('scored', len(s), icprune.HAVE_EXT)\n"
)


@pytest.mark.skipif(not _ext.HAVE_EXT, reason="icprune._C was not built in this environment")
def test_extension_reports_how_it_was_built():
    info = icprune.build_info()
    assert info["extension"] is True and info["load_error"] is None
    assert info["cxx_standard"] >= 201703
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1
    assert info["compiler"] != "unknown"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_missing_extension_warns_once_and_falls_back_to_torch():
    result = _run(MISSING_EXT, ICPRUNE_BUILD_EXT="1")
    assert result.returncode == 0, result.stderr
    assert "scored 21 False" in result.stdout
    assert result.stderr.count("the C++ extension icprune._C is not available") == 1
    assert "falling back to torch" in result.stderr


def test_missing_extension_is_silent_when_the_user_opted_out():
    result = _run(MISSING_EXT, ICPRUNE_BUILD_EXT="0")
    assert result.returncode == 0, result.stderr
    assert "icprune._C" not in result.stderr
    assert icprune.build_info()["extension"] == _ext.HAVE_EXT


@pytest.mark.slow
def test_a_failed_compile_does_not_fail_the_build(tmp_path):
    pytest.importorskip("pybind11")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    (tmp_path / "icprune").mkdir()
    (tmp_path / "icprune" / "__init__.py").write_text("")
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "CC": "false", "CXX": "false"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "the C++ extension icprune._C failed to build" in result.stderr
    assert not list((tmp_path / "icprune").glob("_C*"))


def test_kernels_are_installed_as_icprune_kernels():
    import icprune.kernels

    assert Path(icprune.kernels.__file__).resolve().parent == ROOT / "kernels"
