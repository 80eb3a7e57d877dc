"""The leaderboard as text: its columns and cells, and the markdown and CSV files (``leaderboard.py`` builds it)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from tabulate import tabulate

from .leaderboard import WORST_CASE_TEXT, Leaderboard, Row

COLUMNS = ["rank", "model", "hash", "ε", "threat model", "clean %", "standard suite %", "worst case %",
           "audit verdict", "audit n", "unreliable", "n", "architecture / recipe", "certified %", "links"]


def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _count(x: int | None) -> str:
    return "" if x is None else str(x)


def fmt_flag(x: bool | None) -> str:
    return "" if x is None else ("yes" if x else "no")


def _relative(path: Path, out_dir: str | os.PathLike) -> str:
    return Path(os.path.relpath(path, Path(out_dir).resolve())).as_posix()


def links(row: Row, out_dir: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(label, card path, results path or '') per card of the row, relative to the output folder so the files
    still open when the repository is moved or browsed from disk."""
    seen, out = set(), []
    for e in row.entries:
        if e.card in seen:
            continue
        seen.add(e.card)
        out.append((e.label, _relative(e.card, out_dir), _relative(e.result, out_dir) if e.result else ""))
    if row.certificate is not None:
        out.append((f"{row.certificate.parent.name}/certify", _relative(row.certificate.resolve(), out_dir), ""))
    return out


def cells(row: Row) -> list[str]:
    """The display strings of every column but the links."""
    return [str(row.rank or ""), row.name, row.hash, row.eps, row.threat_model, fmt(row.clean_acc),
            fmt(row.reported_acc), fmt(row.worst_case), row.verdict, _count(row.audit_n), fmt_flag(row.unreliable),
            _count(row.n), row.recipe, fmt(row.certified)]


def caption(board: Leaderboard) -> str:
    return " / ".join(board.datasets) or "dataset not stated"


def render_markdown(board: Leaderboard, out_dir: str | os.PathLike) -> str:
    text = [f"# k-NN leaderboard: {caption(board)}", "",
            (f"Accuracies in %. *worst case*: {WORST_CASE_TEXT}. *standard suite*: the figure of the standard "
             "attacks alone, from an audit; *audit n*: the images of that audit, whose verdict is shown (it may "
             "differ from *n*, the images of the worst case). Rank within each ε, highest worst case first."), ""]
    for threat, rows in board.tables.items():
        body = [cells(r) + [" ".join(f"[{lab}]({c})" + (f" [json]({res})" if res else "")
                                     for lab, c, res in links(r, out_dir))] for r in rows]
        text += [f"## {threat}", "", tabulate(body, headers=COLUMNS, tablefmt="github", disable_numparse=True), ""]
    return "\n".join(text)


def render_csv(board: Leaderboard, out_dir: str | os.PathLike) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS[:-1] + ["worst case from", "cards", "results"])
    for rows in board.tables.values():
        for r in rows:
            ls = links(r, out_dir)
            w.writerow(cells(r) + [r.worst_case_from, ";".join(c for _, c, _ in ls),
                                   ";".join(res for _, _, res in ls if res)])
    return buf.getvalue()
