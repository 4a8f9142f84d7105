"""Who may import whom (docs/architecture.md): every import inside icprune goes down the layers.

A module may import modules of its own layer or of a lower one, never of a higher one, so the
data flows one way: calibrate -> score -> plan -> apply -> recover/report -> save, with the CLI
and the integrations on top. Imports inside functions count too. The statistics engine and its
Triton kernels share a layer: the kernels return the engine's BatchStats, and the engine loads
them on first use.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The layers, lowest first: units are top-level modules or whole subpackages (``stats/``).
LAYERS = [
    {"config", "files", "modes", "batches", "extension", "data", "models/", "baselines"},
    {"structure/"},
    {"stats/", "kernels/", "slicing"},
    {"calibrate", "serialization", "evaluation"},
    {"scoring"},
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


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in (("icprune", "icprune"), ("kernels", "icprune.kernels")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


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
    units = {_unit(m) for m in _modules()}
    placed = set().union(*LAYERS)
    assert units == placed, (sorted(units - placed), sorted(placed - units))


def test_imports_go_down_the_layers():
    modules = _modules()
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    upward = []
    for name, path in modules.items():
        mine = _unit(name)
        for imported in _imports(path, modules):
            theirs = _unit(imported)
            if layer[theirs] > layer[mine]:
                upward.append(f"{path.relative_to(ROOT)} imports {imported} ({mine} -> {theirs})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)
