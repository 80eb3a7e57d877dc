"""The result files committed under ``tables/`` say how to remake themselves: their commands name no path of the
machine that ran them, and a command's ``--out`` is the folder the file lies in (a run made elsewhere and copied in
must have its command rewritten, or a reader's rerun writes somewhere else)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest

TABLES = Path(__file__).resolve().parent.parent / "tables"
RESULTS = sorted(TABLES.rglob("*.json"))


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def test_there_are_committed_results():
    assert len(RESULTS) > 50


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: str(p.relative_to(TABLES)))
def test_a_result_names_no_absolute_path(path: Path):
    absolute = [tok for s in strings(json.loads(path.read_text())) for tok in s.split() if tok.startswith("/")]
    assert not absolute, f"{path.relative_to(TABLES)} names {absolute}: use the path inside the repository"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: str(p.relative_to(TABLES)))
def test_a_results_command_writes_where_the_file_lies(path: Path):
    data = json.loads(path.read_text())
    command = data.get("command") if isinstance(data, dict) else None
    tokens = shlex.split(command) if isinstance(command, str) else []
    if "--out" not in tokens:
        return
    out = Path(tokens[tokens.index("--out") + 1])
    here = path.parent.relative_to(TABLES.parent)
    assert out == here or here.is_relative_to(out), f"{here}/{path.name}: its command writes to {out}"
