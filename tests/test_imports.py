"""The import rules of docs/architecture.md, read from the code (parsed, not imported).

1. No module of icprune, its kernels or bench/ uses another module's private (_underscore)
   names. Three forms are refused: ``from x import _name``, ``import x._name`` and ``x._name``
   where ``x`` names a module (bound by ``import x`` / ``import a.b as x``, or by
   ``from package import x`` for a module of this repository). Attributes of objects
   (``self._x``, a torch module's ``_forward_pre_hooks``) are out of scope: the rule is about
   modules.
2. Every import inside icprune goes down the layers (:data:`LAYERS`): a module imports modules
   of its own layer or of a lower one, never of a higher one, so the data flows one way:
   calibrate -> score -> plan -> apply -> recover/report -> save, with the CLI and the
   integrations on top. Imports inside functions count too. The statistics engine and its
   Triton kernels share a layer: the kernels return the engine's BatchStats, and the engine
   loads them on first use.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folders and the package name they are installed as (setup.py's package_dir).
PACKAGES = {"icprune": "icprune", "kernels": "icprune.kernels", "bench": "bench"}
#: (file, use) pairs that are allowed, with the reason.
ALLOWED = {
    # The compiled extension is a private submodule, loaded in this one place.
    ("icprune/extension.py", "import icprune._C"),
}


def _modules() -> dict[str, Path]:
    """Module name -> file of every Python module in PACKAGES."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()
#: The installed package's modules (bench/ stands outside the layers).
PACKAGE = {name: path for name, path in MODULES.items() if name.split(".")[0] == "icprune"}


#: The layers, lowest first: units are top-level modules or whole subpackages (``stats/``).
LAYERS = [
    {
        "config",
        "files",
        "modes",
        "batches",
        "extension",
        "data",
        "models/",
        "baselines",
        "attention",
    },
    {"structure/"},
    {"stats/", "kernels/", "slicing"},
    {"calibrate", "input_gram", "serialization", "evaluation", "consumers"},
    {"scoring", "criteria"},
    {"planning"},
    {"applying", "report/", "recovery/"},
    {"pruning"},
    {"integrations/", "cli/", "__init__", "__main__"},
]
SUBPACKAGES = {"stats", "structure", "recovery", "report", "cli", "integrations", "models"}


def _unit(module: str) -> str:
    """``icprune.stats.binning`` -> ``stats/``, ``icprune.kernels.gram`` -> ``kernels/``,
    ``icprune.scoring`` -> ``scoring``, ``icprune`` -> ``__init__``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if parts[1] in SUBPACKAGES or parts[1] == "kernels":
        return parts[1] + "/"
    return parts[1]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _absolute(module: str | None, level: int, here: str, is_package: bool) -> str:
    """The absolute module name of a (possibly relative) ``from`` import in module ``here``."""
    if level == 0:
        return module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def violations(source: str, here: str = "<module>", is_package: bool = False) -> list[str]:
    """The private cross-module uses in ``source`` (the code of module ``here``), as text."""
    tree = ast.parse(source)
    module_names: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module_names.add(alias.asname or alias.name.split(".")[0])
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(node.module, node.level, here, is_package)
            for alias in node.names:
                full = f"{source_module}.{alias.name}"
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {source_module} import {alias.name}")
                elif full in MODULES:
                    module_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_names
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("from icprune.calibrate import _batches, model_device", ["import _batches"]),
        ("import icprune.calibrate as c\nc._progress(1)", ["c._progress"]),
        ("from icprune.kernels import gram as g\ng._gram", ["g._gram"]),
        ("from .counting import _as_args", ["import _as_args"]),
        ("from icprune.stats import ChannelStats\nChannelStats(1)._relayout", []),  # an object
        ("self._x = 1\nfrom icprune import __version__", []),
        ("import icprune._C as ext", ["import icprune._C"]),
    ],
)
def test_the_checker_finds_private_cross_module_uses(code, expected):
    found = violations(code, "icprune.structure.dependency")
    assert len(found) == len(expected)
    for text, want in zip(found, expected, strict=True):
        assert want in text


def test_no_module_uses_another_modules_private_names():
    assert len(MODULES) > 50  # the walk found the package
    problems = []
    for name, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        found = violations(path.read_text(), name, path.name == "__init__.py")
        allowed = {use for file, use in ALLOWED if file == rel}
        problems += [f"{rel} {v}" for v in found if v.split(": ", 1)[1] not in allowed]
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The icprune modules that the file at ``path`` imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in PACKAGE}
    placed = set().union(*LAYERS)
    assert units == placed, (sorted(units - placed), sorted(placed - units))


def test_imports_go_down_the_layers():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    upward = []
    for name, path in PACKAGE.items():
        mine = _unit(name)
        for imported in _imports(path, PACKAGE):
            theirs = _unit(imported)
            if layer[theirs] > layer[mine]:
                upward.append(f"{path.relative_to(ROOT)} imports {imported} ({mine} -> {theirs})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)
