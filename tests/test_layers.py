"""The package's layers, as the README's Layout section draws them: a module's top-level imports reach only its own
layer or the ones below. (Imports inside functions may reach up: the transfer attack and the deep k-NN subject
load Table 2's row A from ``paper/``, on demand.)"""

from __future__ import annotations

import ast
from pathlib import Path

import robustbench_knn

PACKAGE = Path(robustbench_knn.__file__).parent
LAYERS = {  # lowest first
    "config": 0, "store": 0, "data": 0, "devices": 0, "distances": 0, "norms": 0, "memo": 0, "native": 0,
    "defenses": 1,
    "attacks": 2, "adapters": 2,
    "paper": 3,
    "evaluation": 4,
    "reports": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
}


def top_level_targets(path: Path) -> set[str]:
    """The package's first-level names that ``path`` imports at module level (``TYPE_CHECKING`` blocks aside)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1]  # a module's package; for __init__.py, the package itself
    targets = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[:len(package) - node.level + 1])
            name = [*base, *(node.module.split(".") if node.module else [])]
            if name:
                targets.add(name[0])
            else:  # "from . import x" at the package root
                targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustbench_knn."):
            targets.add(node.module.split(".")[1])
    return targets


def layer_of(path: Path) -> str:
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def test_every_module_has_a_layer():
    names = {layer_of(p) for p in PACKAGE.rglob("*.py")}
    assert names <= set(LAYERS), f"modules without a layer: {sorted(names - set(LAYERS))}"


def test_top_level_imports_only_reach_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = LAYERS[layer_of(path)]
        for target in top_level_targets(path):
            if target in LAYERS and LAYERS[target] > mine:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not upward, upward


def test_the_scan_sees_imports():
    # the rule cannot pass by seeing nothing: known edges are found
    assert "defenses" in top_level_targets(PACKAGE / "paper" / "classifier.py")
    assert "distances" in top_level_targets(PACKAGE / "defenses" / "knn.py")
    assert "config" in top_level_targets(PACKAGE / "data.py")
