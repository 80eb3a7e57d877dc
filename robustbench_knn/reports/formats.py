"""How a table is printed: display strings (two decimals, signed Δ, ✓/×, '–' for no value), the alignment of
number columns, and LaTeX (booktabs) with escaping."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import pandas as pd


def _cell(col: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "✓" if value else "×"
    if isinstance(value, float):
        return f"{value:+.2f}" if col.endswith(" Δ") else f"{value:.2f}"
    return str(value)


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Strings as printed: two decimals, signed Δ, ✓/×, '–' for no value."""
    return pd.DataFrame({c: [_cell(c, v) for v in df[c].astype(object)] for c in df.columns}, columns=df.columns)


_TEX = {  # LaTeX specials, then the unicode the tables print
    "l∞": r"$\ell_\infty$", "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "ε": r"$\varepsilon$",
    "Δ": r"$\Delta$", "✓": r"\checkmark{}", "×": r"$\times$", "∞": r"$\infty$", "–": "--", "−": "-",
    "—": "---", "§": r"\S{}",
}


def _tex_escape(text: str) -> str:
    return re.sub("|".join(map(re.escape, _TEX)), lambda m: _TEX[m.group()], text)


def alignment(df: pd.DataFrame) -> list[str]:
    """Right-align the columns of numbers (display strings such as '37.00', '+1.20', '–')."""
    def numeric(col: str) -> bool:
        return len(df) > 0 and all(re.fullmatch(r"[-+]?\d+(\.\d+)?|–", str(v)) for v in df[col])

    return ["right" if numeric(c) else "left" for c in df.columns]


def to_latex(df: pd.DataFrame, header: Sequence[str]) -> str:
    """booktabs tabular (needs \\usepackage{booktabs,amssymb}); the header lines as LaTeX comments."""
    def line(cells: Sequence[Any]) -> str:
        return " & ".join(_tex_escape(str(c)) for c in cells) + r" \\"

    align = "".join("r" if a == "right" else "l" for a in alignment(df))
    out = [f"% {h}" for h in header if h]
    out += [r"\begin{tabular}{" + align + "}", r"\toprule", line(df.columns),
            r"\midrule", *(line(row) for row in df.itertuples(index=False)), r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"
