"""``robustbench-knn leaderboard``'s files: the table as markdown, CSV and one self-contained HTML page."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..store import write_text
from .leaderboard import Leaderboard, build_leaderboard
from .leaderboard_html import render_html
from .leaderboard_text import render_csv, render_markdown


def write_leaderboard(dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> tuple[Leaderboard, list[Path]]:
    """``leaderboard.md``, ``.csv`` and a self-contained ``leaderboard.html`` in ``out_dir``."""
    board = build_leaderboard(dirs)
    out = Path(out_dir)
    paths = [out / "leaderboard.md", out / "leaderboard.csv", out / "leaderboard.html"]
    write_text(paths[0], render_markdown(board, out))
    write_text(paths[1], render_csv(board, out))
    write_text(paths[2], render_html(board, out))
    return board, paths
