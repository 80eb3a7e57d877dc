"""Packaging: dependency ranges vs constraints.txt, the paper's numbers as package data, --version."""

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import robustbench_knn
from robustbench_knn import native
from robustbench_knn.cli import main
from robustbench_knn.reports import tables

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "baselines" / "paper.json"  # the human-readable copy
PACKAGED = "robustbench_knn/baselines/paper.json"  # the package-data copy, as it lies in a wheel


def _project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def _direct_requirements() -> list[Requirement]:
    """Runtime dependencies and every extra's (the test extra: what CI installs)."""
    project = _project()
    texts = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    return [Requirement(t) for t in texts]


def _constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"constraints.txt: {line!r} is not one exact pin"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(spec[0].version)
    return pins


def test_constraints_pin_every_direct_dependency_inside_its_range():
    pins = _constraints()
    assert "robustbench-knn" not in pins  # the project itself is installed from the checkout, never pinned
    reqs = _direct_requirements()
    assert reqs
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}")


def test_packaged_baselines_equal_the_readable_copy():
    assert tables.baselines_resource().read_bytes() == PAPER.read_bytes()
    assert tables.load_baselines() == json.loads(PAPER.read_text(encoding="utf-8"))


def test_wheel_ships_the_baselines(tmp_path):
    """A wheel (what `pip install robustbench-knn` gets) carries paper.json, equal to baselines/paper.json, and the
    C kernels' sources."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "robustbench_knn", src / "robustbench_knn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    # No build isolation: setuptools is already installed (torch requires it), so this needs no index.
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(dist.glob("robustbench_knn-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        assert zf.read(PACKAGED) == PAPER.read_bytes()
        for name in native.SOURCES:  # the C kernels' sources, which native.py compiles on the user's machine
            assert zf.read(f"robustbench_knn/{name}") == (REPO / "robustbench_knn" / name).read_bytes()
        entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "robustbench-knn = robustbench_knn.cli:main" in zf.read(entry_points).decode()


def test_version(capsys):
    assert robustbench_knn.__version__ == _project()["version"]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    try:
        expected = importlib.metadata.version("robustbench-knn")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout on PYTHONPATH, not installed
        expected = robustbench_knn.__version__
    assert capsys.readouterr().out == f"robustbench-knn {expected}\n"
