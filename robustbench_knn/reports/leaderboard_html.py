"""The leaderboard as one static HTML file: opens from disk, fetches nothing, needs no server. The tables sort by a
click on a column header (a few lines of inline JavaScript); each audited row gets a small SVG plot of robust
accuracy against ε, drawn here in Python from the audit's ``eps_curves``."""

from __future__ import annotations

import math
import os
from html import escape

from ..evaluation.certify import CERTIFIED
from .leaderboard import WORST_CASE_TEXT, Leaderboard, Row
from .leaderboard_text import COLUMNS, caption, cells, links

WORST = "worst case"
COLORS = ["#1f5fa8", "#8e44ad", "#d9820b"]  # standard-suite curves; the worst case is red, certified green
WORST_COLOR = "#c0392b"
CERTIFIED_COLOR = "#2a9d3c"

HELP = {  # header tooltips: what a reader must know to read each column
    "rank": "within each ε: highest worst-case robust accuracy first",
    "hash": "weights/config hash from the card's file name: same name, other hash = another model",
    "clean %": "clean accuracy on the images of the run that reached the worst case",
    "standard suite %": "robust accuracy under the standard attacks alone (from an audit)",
    "worst case %": "lowest robust accuracy any run reached at this ε: per-sample worst case over its attacks",
    "audit verdict": "whether the audit trusts the standard suite's figure (hover for the text)",
    "unreliable": "yes if any card of the row flags it (audit verdict or the run's cheap checks)",
    "audit n": "test images of the audit the verdict and the standard suite's figure come from",
    "n": "test images attacked in the run that reached the worst case",
    "certified %": "certified lower bound, where a card gives one",
}
NUMERIC = {"rank", "ε", "clean %", "standard suite %", "worst case %", "audit n", "n", "certified %"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;color:#222;
 max-width:1500px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
p.lead{color:#555;margin:0 0 14px;font-size:13px;max-width:1000px}
table.board{border-collapse:collapse;font-size:13px;width:100%}
table.board caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0 6px;color:#333}
table.board th{background:#eef1f5;border-bottom:2px solid #b8c0cc;padding:6px 6px;text-align:left;
 vertical-align:bottom;cursor:pointer;user-select:none;line-height:1.25}
table.board th.num{text-align:right}
table.board th:hover{background:#dde3ea}
table.board th[data-dir=asc]::after{content:" \\25B2";font-size:10px}
table.board th[data-dir=desc]::after{content:" \\25BC";font-size:10px}
table.board td{border-bottom:1px solid #e3e6ea;padding:5px 6px;vertical-align:top}
table.board tr.eps-start td{border-top:2px solid #b8c0cc}
table.board tbody tr:nth-child(even){background:#fafbfc}
table.board tbody tr:hover{background:#f0f6ff}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.worst{font-weight:700}
td.hash{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:#555}
td.recipe{font-size:12px;color:#444;min-width:160px}
td.verdict{min-width:125px}
span.nw{white-space:nowrap}
td.links{font-size:11.5px;line-height:1.45;min-width:150px}
td.links a{color:#1f5fa8;text-decoration:none}td.links a:hover{text-decoration:underline}
.v-bad{color:#a61b1b;font-weight:600}.v-warn{color:#9a6200;font-weight:600}.v-ok{color:#1d7a31;font-weight:600}
.flag-yes{color:#a61b1b;font-weight:600}
div.plots{display:flex;flex-wrap:wrap;gap:18px}
figure{width:330px;margin:0;border:1px solid #e0e4e8;border-radius:6px;padding:8px 8px 4px;background:#fff}
figcaption{font-size:12.5px;color:#333;margin-top:2px}
footer{margin-top:28px;font-size:12px;color:#666}
"""

SCRIPT = """
document.querySelectorAll("table.board").forEach(function (table) {
  var heads = table.querySelectorAll("th");
  heads.forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.dataset.dir !== "asc";
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
        if (x === "" || y === "") return (x === "") - (y === "");  // blanks last either way
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { r.classList.remove("eps-start"); body.appendChild(r); });  // groups broken up
      heads.forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = asc ? "asc" : "desc";
    });
  });
});
"""


def _eps_tick(eps: float, threat_model: str = "Linf") -> str:
    k = eps * 255
    if threat_model != "Linf":
        return f"{eps:g}"
    return f"{round(k)}" if abs(k - round(k)) < 1e-6 else f"{eps:.3g}"


def plot_curves(row: Row) -> dict[str, list[tuple[float, float]]]:
    """The curves a reader compares: the standard suite's (its strongest standard attack's curve; every attack's
    curve when the audit does not say which attacks are standard), the worst case over every run and, where the
    audit computed it, the certified lower bound."""
    curves = {}
    for key, pts in (row.curves or {}).items():
        good = [(float(p[0]), float(p[1])) for p in pts if isinstance(p, (list, tuple)) and len(p) == 2
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
        if good:
            curves[str(key)] = sorted(good)
    standard = [k for k in curves if k in row.standard]
    if len(standard) > 1:  # the strongest: lowest accuracy at the audited ε, else lowest on average
        def at(k: str) -> float:
            near = [a for e, a in curves[k] if row.audit_eps is not None and abs(e - row.audit_eps) < 1e-9]
            return near[0] if near else sum(a for _, a in curves[k]) / len(curves[k])
        standard = [min(standard, key=at)]
    keep = standard or [k for k in curves if k not in (WORST, CERTIFIED)]
    return {**{k: curves[k] for k in keep}, **{k: curves[k] for k in (WORST, CERTIFIED) if k in curves}}


def svg_plot(row: Row, width: int = 330, height: int = 210) -> str:
    """Robust accuracy (%) against ε on a log₂ axis (the audit sweeps ε by doublings), ε = 0 one step left of the
    smallest ε; the audited ε dashed. Empty string when the row has no curve."""
    curves = plot_curves(row)
    if not curves:
        return ""
    left, right, top, bottom = 40, 10, 18, 36
    pw, ph = width - left - right, height - top - bottom
    eps_all = sorted({e for pts in curves.values() for e, _ in pts})
    pos = [e for e in eps_all if e > 0]
    logs = {e: math.log2(e) for e in pos}
    zero_at = (min(logs.values()) - 1) if logs else 0.0
    xval = {e: logs.get(e, zero_at) for e in eps_all}
    x0, x1 = min(xval.values()), max(xval.values())
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1
    ymax = min(100, max(10, math.ceil(max(a for pts in curves.values() for _, a in pts) / 10) * 10))
    step = 10 if ymax <= 60 else 20

    def X(e: float) -> float:
        return left + (xval[e] - x0) / (x1 - x0) * pw

    def Y(a: float) -> float:
        return top + (1 - a / ymax) * ph

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="10">'),
           f"<title>{escape(row.name)} {escape(row.hash)}: robust accuracy against ε</title>"]
    for a in range(0, ymax + 1, step):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(a):.1f}" y2="{Y(a):.1f}" stroke="#e6e6e6"/>'
                   f'<text x="{left - 4}" y="{Y(a) + 3:.1f}" text-anchor="end" fill="#555">{a}</text>')
    for e in eps_all:
        out.append(f'<line x1="{X(e):.1f}" x2="{X(e):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#777"/>'
                   f'<text x="{X(e):.1f}" y="{top + ph + 14}" text-anchor="middle" fill="#555">'
                   f'{_eps_tick(e, row.threat_model)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle" fill="#333">'
               f'{"ε (×1/255, log scale)" if row.threat_model == "Linf" else "ℓ2 ε (log scale)"}</text>')
    out.append(f'<text x="11" y="{top + ph / 2}" text-anchor="middle" fill="#333" '
               f'transform="rotate(-90 11 {top + ph / 2})">robust acc. %</text>')
    audited = [e for e in eps_all if row.audit_eps is not None and abs(e - row.audit_eps) < 1e-9]
    if audited:
        xa = X(audited[0])
        out.append(f'<line x1="{xa:.1f}" x2="{xa:.1f}" y1="{top}" y2="{top + ph}" stroke="#888" '
                   f'stroke-dasharray="3 3"/><text x="{xa:.1f}" y="{top - 5}" text-anchor="middle" '
                   f'fill="#666">audited ε</text>')
    labels = {k: "worst case (all runs)" if k == WORST else f"standard: {k}" if k in row.standard else k
              for k in curves}
    # the legend sits top right, where falling curves leave room; its width follows its longest label
    lx = max(left + 4, round(left + pw - 26 - 5.4 * max(map(len, labels.values()))))
    legend_y = top + 12
    for i, (key, pts) in enumerate(curves.items()):
        worst = key == WORST
        color = WORST_COLOR if worst else CERTIFIED_COLOR if key == CERTIFIED else COLORS[i % len(COLORS)]
        width_ = 2.2 if worst else 1.6
        dash = "" if worst else ' stroke-dasharray="2 2"' if key == CERTIFIED else ' stroke-dasharray="5 2"'
        path = " ".join(f"{X(e):.1f},{Y(a):.1f}" for e, a in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width_}"{dash}/>')
        out += [f'<circle cx="{X(e):.1f}" cy="{Y(a):.1f}" r="2.2" fill="{color}"/>' for e, a in pts]
        out.append(f'<line x1="{lx}" x2="{lx + 16}" y1="{legend_y - 3}" y2="{legend_y - 3}" stroke="{color}" '
                   f'stroke-width="{width_}"{dash}/><text x="{lx + 20}" y="{legend_y}" fill="#222">'
                   f"{escape(labels[key])}</text>")
        legend_y += 13
    out.append("</svg>")
    return "".join(out)


def _verdict_class(status: str) -> str:
    return {"TRUSTED": "v-ok", "TRUSTED WITH WARNINGS": "v-warn"}.get(status, "v-bad" if status else "")


def _row_html(row: Row, plot_id: str | None, out_dir: str | os.PathLike, first_of_eps: bool) -> str:
    values = dict(zip(COLUMNS, cells(row)))
    sort = {"rank": row.rank, "ε": row.eps_value, "clean %": row.clean_acc, "standard suite %": row.reported_acc,
            "worst case %": row.worst_case, "audit n": row.audit_n, "n": row.n, "certified %": row.certified}
    tds = []
    for col in COLUMNS[:-1]:
        text = values[col]
        key = sort.get(col, text) if col in NUMERIC else text
        key = "" if key is None or (isinstance(key, float) and math.isinf(key)) else key
        cls = ["num"] if col in NUMERIC else []
        title = ""
        if col == "worst case %":
            cls.append("worst")
            title = f"reached by {row.worst_case_from}" if row.worst_case_from else ""
        elif col == "hash":
            cls.append("hash")
        elif col == "architecture / recipe":
            cls.append("recipe")
        elif col == "audit verdict":
            cls += ["verdict", _verdict_class(text)]
            title = row.verdict_text
        elif col == "unreliable" and text == "yes":
            cls.append("flag-yes")
        attrs = f' class="{" ".join(c for c in cls if c)}"' if any(cls) else ""
        attrs += f' title="{escape(title)}"' if title else ""
        # words break at spaces only, not at the hyphen of "1e-3"
        shown = " ".join(f'<span class="nw">{escape(t)}</span>' for t in text.split(" ")) if text else ""
        tds.append(f'<td{attrs} data-sort="{escape(str(key))}">{shown}</td>')
    # <wbr>: a long label may break after its folder, so the table fits a laptop's width
    items = [f'<a href="{escape(card)}" title="{escape(card)}">{escape(label).replace("/", "/<wbr>", 1)}</a>'
             + (f'&nbsp;(<a href="{escape(res)}" title="{escape(res)}">json</a>)' if res else "")
             for label, card, res in links(row, out_dir)]
    if plot_id:
        items.append(f'<a href="#{plot_id}">curve ↓</a>')
    label_sort = links(row, out_dir)[0][0] if row.entries else ""
    tds.append(f'<td class="links" data-sort="{escape(label_sort)}">{"<br>".join(items)}</td>')
    return ('<tr class="eps-start">' if first_of_eps else "<tr>") + "".join(tds) + "</tr>"


def render_html(board: Leaderboard, out_dir: str | os.PathLike) -> str:
    title = f"k-NN leaderboard: {caption(board)}"
    plots: list[tuple[str, Row, str]] = []
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{escape(title)}</h1>",
             (f'<p class="lead">Accuracies in %. <b>worst case</b>: {escape(WORST_CASE_TEXT)}. '
             "<b>standard suite</b>: the standard attacks alone, from an audit; <b>audit n</b>: that audit's images "
             "(the verdict's), which may differ from <b>n</b>, the worst case's. Ranked within each ε, highest worst "
             "case first. Click a column header to sort; hover a verdict for its text.</p>")]
    for threat, rows in board.tables.items():
        parts.append(f"<h2>Threat model {escape(threat)}</h2>")
        parts.append(f'<table class="board" id="board-{escape(threat)}"><caption>{escape(caption(board))}, '
                     f"{escape(threat)}: {len(rows)} rows</caption><thead><tr>")
        parts += [f"<th{' class=num' if c in NUMERIC else ''}"
                  + (f' title="{escape(HELP[c])}"' if c in HELP else "") + f">{escape(c)}</th>" for c in COLUMNS]
        parts.append("</tr></thead><tbody>")
        for i, row in enumerate(rows):
            plot_id, svg = None, svg_plot(row)
            if svg:
                plot_id = f"curve-{len(plots) + 1}"
                plots.append((plot_id, row, svg))
            # a line between ε groups: ranks restart there
            parts.append(_row_html(row, plot_id, out_dir, i > 0 and row.eps_value != rows[i - 1].eps_value))
        parts.append("</tbody></table>")
    if plots:
        parts.append("<h2>Robust accuracy against ε (audited models)</h2><div class=\"plots\">")
        for plot_id, row, svg in plots:
            parts.append(f'<figure id="{plot_id}">{svg}<figcaption><b>{escape(row.name)}</b> '
                         f"{escape(row.hash)} · audit at ε = {escape(row.eps)} ({escape(row.threat_model)}) · "
                         f"{escape(row.verdict or 'no verdict')}</figcaption></figure>")
        parts.append("</div>")
    n_cards = len({e.card for r in board.rows for e in r.entries})
    foot = f"Built by <code>robustbench-knn leaderboard</code> from {n_cards} model cards."
    if board.skipped:
        foot += " Skipped (unreadable): " + "; ".join(f"{escape(str(p))}: {escape(w)}" for p, w in board.skipped)
    parts += [f"<footer>{foot}</footer>", f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"
