"""The package metadata: still buildable by the setuptools of the coming years (PEP 639)."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_expression_with_its_text_shipped():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # The table form {text = ...} is deprecated by setuptools and stops building in 2027.
    assert project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        assert "Apache License" in (ROOT / name).read_text()


def test_build_requires_a_setuptools_that_reads_spdx_licenses():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (setuptools,) = [r for r in requires if r.startswith("setuptools")]
    assert int(re.fullmatch(r"setuptools>=(\d+).*", setuptools).group(1)) >= 77


def test_the_version_is_written_once_in_pyproject():
    """icprune.__version__ and the report read the installed metadata, which pyproject.toml
    fills; no module writes a version of its own."""
    import icprune

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert icprune.__version__ == project["version"]
    written = re.compile(r"^\s*__version__\s*=\s*['\"]", re.MULTILINE)
    for path in (ROOT / "icprune").rglob("*.py"):
        assert not written.search(path.read_text()), path
