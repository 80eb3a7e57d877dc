"""The k-NN leaderboard (``robustbench-knn leaderboard``), on made-up model cards written into tmp_path.

Each test names the bug it was checked against (planted briefly in reports/leaderboard*.py; the test failed)."""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from robustbench_knn.cli import main
from robustbench_knn.config import UsageError
from robustbench_knn.reports.leaderboard import build_leaderboard
from robustbench_knn.reports.leaderboard_files import write_leaderboard

EPS8 = 8 / 255
CONFIG = {"name": "full", "k": 800,
          "model": {"w_r": 2048, "n_spaces": 2, "d": 15, "identity_init": True, "head": "embedding"},
          "train": {"epochs": 20, "optimizer": "adam", "lr": 0.001, "schedule": "constant", "noise": True,
                    "n_train": None, "trained": True}}


def card(name: str, eps: str = "8/255", clean: str | None = "50.00", worst: str | None = "10.00",
         unreliable: bool | None = False, n: int | None = 1000, threat: str = "Linf", **extra: Any) -> dict[str, Any]:
    """A card as ``evaluation.cards.model_card`` writes it (accuracies as strings in %)."""
    return {"name": name, "dataset": "cifar10", "dataset_detail": "CIFAR-10 (JPEG q75)", "threat_model": threat,
            "eps": eps, "clean_acc": clean, "reported": None, "worst_case_robust_acc": worst, "autoattack_acc": None,
            "unreliable": unreliable, "n_examples": n, "footnote": "made up", "attacks": {}, **extra}


def audit_result(name: str, h: str, reported: float, upper: float, status: str = "NOT TRUSTED",
                 config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit JSON beside an audit card: verdict, the standard suite's figure, ε curves, config."""
    sweep = [0.0, 4 / 255, EPS8, 16 / 255]
    return {"model": name, "config": config, "config_hash": h, "eps": EPS8, "n": 1000, "clean_acc": 50.0,
            "standard": ["aa:apgd", "aa:apgd-t"], "reported_acc": reported, "upper_bound_acc": upper,
            "verdict": {"status": status, "text": f"{status}: made up", "reported_acc": reported,
                        "upper_bound_acc": upper},
            "eps_curves": {"aa:apgd-t": [[e, a] for e, a in zip(sweep, [50, 30, 20, 5])],
                           "aa:apgd": [[e, a] for e, a in zip(sweep, [50, 35, 25, 9])],
                           "native:feature": [[e, a] for e, a in zip(sweep, [50, 20, 6, 0])],
                           "worst case": [[e, a] for e, a in zip(sweep, [50, 18, 5, 0])]}}


def put(folder: Path, stem: str, data: dict[str, Any], result: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.model-card.json"
    path.write_text(json.dumps(data))
    if result is not None:
        (folder / f"{stem}.json").write_text(json.dumps(result))
    return path


class Tables(HTMLParser):
    """Every <table>: its id, header texts and rows of (cell text, attributes); and the <svg>s and <a href>s."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self.svgs: list[str] = []  # the id of the figure each SVG sits in
        self.polylines: dict[str, int] = {}
        self.external: list[str] = []
        self._cell: list[str] | None = None
        self._figure = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("script", "link", "img", "iframe") and (a.get("src") or a.get("href")):
            self.external.append(f"{tag} {a.get('src') or a.get('href')}")
        if tag == "table":
            self.tables.append({"id": a.get("id"), "head": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell, self._attrs = [], a
        elif tag == "a" and self._cell is not None:
            self.tables[-1].setdefault("hrefs", []).append(a.get("href") or "")
        elif tag == "figure":
            self._figure = a.get("id") or ""
        elif tag == "svg":
            self.svgs.append(self._figure)
        elif tag == "polyline":
            self.polylines[self._figure] = self.polylines.get(self._figure, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None:
            text = "".join(self._cell).strip()
            if tag == "th":
                self.tables[-1]["head"].append(text)
            else:
                self.tables[-1]["rows"][-1].append((text, self._attrs))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html_path: Path) -> Tables:
    p = Tables()
    p.feed(html_path.read_text())
    for t in p.tables:
        t["rows"] = [r for r in t["rows"] if r]  # the header row holds <th>s only
        t["dicts"] = [dict(zip(t["head"], (text for text, _ in r))) for r in t["rows"]]
    return p


def build(tmp_path: Path) -> tuple[Tables, Path]:
    out = tmp_path / "out"
    write_leaderboard([tmp_path / "cards"], out)
    return parse(out / "leaderboard.html"), out


def test_every_card_becomes_a_row_and_every_number_matches_its_card(tmp_path):
    # planted: clean and worst-case accuracy swapped in the row's cells; more_eps ignored (its row missing)
    cards = tmp_path / "cards"
    made = {("a", "1111aaaa2222"): card("a", clean="61.25", worst="12.50", n=500, unreliable=True),
            ("b", "3333bbbb4444"): card("b", clean="48.10", worst="7.30", n=1000, unreliable=False),
            ("c", "5555cccc6666"): card("c", clean="55.00", worst="20.00", n=200, unreliable=None)}
    made[("c", "5555cccc6666")]["more_eps"] = [card("c", eps="16/255", clean="55.00", worst="3.25", n=200)]
    for (name, h), c in made.items():
        put(cards / "runs", f"evaluate-{name}-{h}-potential", c)
    expected = [c for c in made.values()] + made[("c", "5555cccc6666")]["more_eps"]
    html, _ = build(tmp_path)
    (table,) = html.tables
    assert len(table["dicts"]) == len(expected) == 4
    for c in expected:
        (row,) = [r for r in table["dicts"] if r["model"] == c["name"] and r["ε"] == c["eps"]]
        assert float(row["clean %"]) == float(c["clean_acc"])
        assert float(row["worst case %"]) == float(c["worst_case_robust_acc"])
        assert int(row["n"]) == c["n_examples"]
        assert row["unreliable"] == {True: "yes", False: "no", None: ""}[c["unreliable"]]
        assert row["threat model"] == "Linf"
        assert row["standard suite %"] == "" and row["audit verdict"] == ""  # no audit
        assert row["hash"] in {h for (_, h) in made}


def test_ranking_order_highest_worst_case_first_within_each_eps(tmp_path):
    # planted: the sort ascending (rank 1 = lowest worst case, the reverse of RobustBench)
    cards = tmp_path / "cards"
    for name, worst in [("low", "5.00"), ("high", "20.00"), ("mid", "12.00"), ("tied", "12.00")]:
        put(cards, f"evaluate-{name}-abcdef012345-potential", card(name, worst=worst))
    put(cards, "evaluate-big-abcdef012345-potential", card("big", eps="16/255", worst="1.00"))
    html, _ = build(tmp_path)
    rows = [(r["model"], r["ε"], r["rank"]) for r in html.tables[0]["dicts"]]
    assert rows == [("high", "8/255", "1"), ("mid", "8/255", "2"), ("tied", "8/255", "2"), ("low", "8/255", "4"),
                    ("big", "16/255", "1")]  # ties share a rank; ranks restart at each ε


def test_two_hashes_of_one_name_stay_two_rows(tmp_path):
    # planted: rows merged by model name without the hash (one "full" row, the lower worst case)
    cards = tmp_path / "cards"
    put(cards, "evaluate-full-f37494becba4-potential", card("full", worst="4.00"))
    put(cards, "evaluate-full-00112233aabb-potential", card("full", worst="9.00"))
    html, _ = build(tmp_path)
    rows = {r["hash"]: r["worst case %"] for r in html.tables[0]["dicts"]}
    assert rows == {"f37494becba4": "4.00", "00112233aabb": "9.00"}


def test_one_recipe_trained_twice_is_two_rows(tmp_path):
    # planted: rows keyed by the file name's config hash only (the two trainings merged into one row, worst 4.00)
    cards = tmp_path / "cards"
    put(cards / "gpu", "evaluate-full-f37494becba4-potential", card("full", worst="4.00"),
        {"model": "full", "config_hash": "f37494becba4"})
    put(cards / "cpu", "evaluate-full-f37494becba4-potential", card("full", worst="9.00"),
        {"model": "full", "config_hash": "f37494becba4", "weights_hash": "b5b426410067"})
    put(cards / "cpu", "audit-full-f37494becba4-eps8", card("full", worst="7.00"),
        {**audit_result("full", "f37494becba4", reported=8.0, upper=7.0, config=CONFIG),
         "weights_hash": "b5b426410067"})
    html, _ = build(tmp_path)
    rows = {r["hash"]: r["worst case %"] for r in html.tables[0]["dicts"]}
    assert rows == {"f37494becba4": "4.00", "b5b426410067": "7.00"}


@pytest.mark.parametrize("lower", ["audit", "evaluate"])
def test_audit_and_evaluate_cards_of_one_model_and_eps_merge_into_one_row(tmp_path, lower):
    # planted: the merged row takes the higher worst case (max, not min); the standard suite's figure not read
    cards = tmp_path / "cards"
    a_worst, e_worst = ("4.00", "6.00") if lower == "audit" else ("4.00", "3.00")
    put(cards / "audit", "audit-full-f37494becba4-eps8",
        card("full", worst=a_worst, clean="52.80", unreliable=True),
        audit_result("full", "f37494becba4", reported=10.3, upper=float(a_worst), config=CONFIG))
    # the same ε written as a decimal by an older card: still the same row
    put(cards / "evaluate", "evaluate-full-f37494becba4-potential",
        card("full", eps="0.03137254901960784", worst=e_worst, clean="50.39", n=10000, unreliable=None),
        {"model": "full", "config_hash": "f37494becba4"})
    html, out = build(tmp_path)
    (row,) = html.tables[0]["dicts"]
    assert row["worst case %"] == min(a_worst, e_worst, key=float)
    # clean accuracy and n come from the card that reached the worst case (same images)
    assert (row["clean %"], row["n"]) == (("52.80", "1000") if lower == "audit" else ("50.39", "10000"))
    assert row["standard suite %"] == "10.30"
    assert row["audit verdict"] == "NOT TRUSTED"
    assert row["unreliable"] == "yes"
    assert row["architecture / recipe"] == "IdResNet w_r=2048 N_S=2 d=15 k=800, 20 ep adam lr 1e-3"
    assert row["ε"] == "8/255"
    # the links reach both cards and both results from the output folder
    hrefs = [h for h in html.tables[0]["hrefs"] if not h.startswith("#")]
    assert sorted(Path(h).name for h in hrefs) == sorted(
        ["audit-full-f37494becba4-eps8.model-card.json", "audit-full-f37494becba4-eps8.json",
         "evaluate-full-f37494becba4-potential.model-card.json", "evaluate-full-f37494becba4-potential.json"])


def evaluate_result(robust: list[int], clean: list[int], eps: float = EPS8) -> dict[str, Any]:
    """An evaluate JSON's per-image fields: clean-correct and, per ε, the per-sample worst case."""
    return {"model": "full", "weights_hash": "b5b426410067", "clean_correct": clean,
            "per_eps": [{"eps": eps, "worst_case_robust": robust}]}


def put_run(tmp_path: Path, folder: str, robust: list[int], clean: list[int]) -> None:
    """An evaluate card and result of FULL ``b5b426410067`` on the first len(robust) images, figures from the bits."""
    def pct(bits: list[int]) -> str:
        return f"{100 * sum(bits) / len(bits):.2f}"

    put(tmp_path / "cards" / folder, "evaluate-full-b5b426410067-potential",
        card("full", worst=pct(robust), clean=pct(clean), n=len(robust)), evaluate_result(robust, clean))


def only_row(tmp_path: Path) -> tuple[dict[str, str], str]:
    """The one row of the built leaderboard, and its CSV line as text (which holds 'worst case from')."""
    html, out = build(tmp_path)
    (row,) = html.tables[0]["dicts"]
    return row, str(next(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text()))))


def test_runs_on_the_same_images_join_per_image(tmp_path):
    # planted: the row keeps the lowest single run (40.00) instead of the union of their breaks
    clean = [1, 1, 1, 1, 0]
    put_run(tmp_path, "aa", [1, 1, 0, 0, 0], clean)
    put_run(tmp_path, "cascade", [0, 1, 1, 0, 0], clean)
    row, csv_row = only_row(tmp_path)
    assert (row["worst case %"], row["clean %"], row["n"]) == ("20.00", "80.00", "5")
    assert "union of aa/evaluate-potential, cascade/evaluate-potential" in csv_row


def test_runs_of_different_n_join_on_their_common_prefix(tmp_path):
    # planted (each failed this test): runs of different n left unjoined (the 3-image run's own 33.33); a short
    # run's breaks counted past its last image (14.29); the join taken only on the images every run attacked
    clean = [1, 1, 1, 1, 1, 1, 0]
    put_run(tmp_path, "aa", [1, 1, 1, 1, 0, 0, 0], clean)
    put_run(tmp_path, "small", [0, 0, 1], clean[:3])
    row, csv_row = only_row(tmp_path)
    # images 0-2 judged by both runs, 3-6 by the 7-image run alone: robust 2, 3 -> 2 of 7
    assert (row["worst case %"], row["clean %"], row["n"]) == ("28.57", "85.71", "7")
    assert "union of small/evaluate-potential, aa/evaluate-potential" in csv_row


def test_a_weak_run_on_more_images_does_not_hide_a_lower_join_on_fewer(tmp_path):
    # planted: the row always on the most images (a weak 10-image run's 70.00 hides the 5-image pair's 20.00)
    clean = [1, 1, 1, 1, 0]
    put_run(tmp_path, "aa", [1, 1, 0, 0, 0], clean)
    put_run(tmp_path, "cascade", [0, 1, 1, 0, 0], clean)
    put_run(tmp_path, "weak", [1, 1, 1, 1, 0, 1, 1, 1, 1, 0], clean * 2)
    row, _ = only_row(tmp_path)
    assert (row["worst case %"], row["n"]) == ("20.00", "5")


def test_a_run_on_fewer_images_that_breaks_nothing_more_leaves_the_row_on_more(tmp_path):
    # planted: the lowest join over every n (the 2-image run's 50.00, though the 6-image runs break its image too)
    put_run(tmp_path, "aa", [0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1])
    put_run(tmp_path, "cascade", [1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1])
    put_run(tmp_path, "small", [0, 1], [1, 1])
    row, csv_row = only_row(tmp_path)
    assert (row["worst case %"], row["n"]) == ("66.67", "6")
    assert "union of" in csv_row and "small/evaluate-potential" in csv_row


def test_the_verdict_comes_from_the_audit_on_the_rows_images(tmp_path):
    # planted: the verdict of the lowest audit (a 3-image one) shown beside the 5-image row's figure; on a tie of
    # joins the fewer images preferred
    cards = tmp_path / "cards"
    clean = [1, 1, 1, 1, 0]
    small = audit_result("full", "b5b426410067", reported=10.0, upper=0.0, status="TRUSTED")
    small.update(main={"clean_correct": clean[:3]}, worst_case_robust=[0, 0, 0])
    big = audit_result("full", "b5b426410067", reported=45.0, upper=40.0, status="NOT TRUSTED")
    big.update(main={"clean_correct": clean}, worst_case_robust=[1, 1, 0, 0, 0])
    put(cards / "small", "audit-full-b5b426410067-eps8", card("full", worst="0.00", clean="100.00", n=3), small)
    put(cards / "big", "audit-full-b5b426410067-eps8", card("full", worst="40.00", clean="80.00", n=5), big)
    row, _ = only_row(tmp_path)
    assert (row["worst case %"], row["n"]) == ("0.00", "5")
    assert (row["audit verdict"], row["standard suite %"]) == ("NOT TRUSTED", "45.00")


def test_the_audit_n_says_when_the_verdict_covers_fewer_images_than_the_worst_case(tmp_path):
    # planted: the audit's n taken from the row (the worst case's 5 images) instead of the audit's own 3; also the
    # column left out of the markdown
    cards = tmp_path / "cards"
    clean = [1, 1, 1, 1, 0]
    audit = audit_result("full", "b5b426410067", reported=33.0, upper=33.0, status="NOT TRUSTED")
    audit.update(main={"clean_correct": clean[:3]}, worst_case_robust=[1, 0, 0])
    put(cards / "audit", "audit-full-b5b426410067-eps8", card("full", worst="33.33", clean="100.00", n=3), audit)
    put_run(tmp_path, "wide", [0, 0, 0, 1, 0], clean)  # breaks image 0 too: the row is on 5 images
    row, csv_row = only_row(tmp_path)
    assert (row["worst case %"], row["n"], row["audit n"]) == ("20.00", "5", "3")
    assert row["audit verdict"] == "NOT TRUSTED"
    assert "'audit n': '3'" in csv_row
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert [c.strip() for c in header.strip("|").split("|")].index("audit n") == 9


def test_links_are_relative_to_the_output_folder(tmp_path, monkeypatch):
    # planted: paths relative to the working directory instead of the output folder
    put(tmp_path / "cards" / "deep" / "er", "evaluate-a-1234567890ab-x", card("a"), {"model": "a"})
    monkeypatch.chdir(tmp_path / "cards")
    html, out = build(tmp_path)
    hrefs = [h for h in html.tables[0]["hrefs"] if not h.startswith("#")]
    assert len(hrefs) == 2 and all(not Path(h).is_absolute() and (out / h).is_file() for h in hrefs)
    rows = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    assert (out / rows[0]["cards"]).is_file() and (out / rows[0]["results"]).is_file()


def test_missing_fields_give_blanks_not_crashes(tmp_path):
    # planted: unreliable: null shown as "no" (as if a check had passed); a missing accuracy parsed with float()
    cards = tmp_path / "cards"
    put(cards, "evaluate-old-0123456789ab-potential",
        {"name": "old", "eps": "8/255", "threat_model": "Linf", "unreliable": None})
    put(cards, "audit-bare-ba9876543210-eps8", card("bare", clean=None, worst="3.00", n=None))  # no audit JSON
    html, out = build(tmp_path)
    rows = {r["model"]: r for r in html.tables[0]["dicts"]}
    old, bare = rows["old"], rows["bare"]
    assert (old["rank"], old["clean %"], old["worst case %"], old["unreliable"], old["n"]) == ("", "", "", "", "")
    assert old["hash"] == "0123456789ab"
    assert (bare["rank"], bare["worst case %"], bare["clean %"], bare["n"]) == ("1", "3.00", "", "")
    assert bare["audit verdict"] == "" and bare["standard suite %"] == "" and bare["architecture / recipe"] == ""
    assert "old" in (out / "leaderboard.md").read_text()


def test_a_folder_without_cards_is_a_usage_error(tmp_path, capsys):
    # planted: the empty-leaderboard check removed (an empty table written, exit 0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.json").write_text("{}")  # a JSON, but not a card
    with pytest.raises(UsageError, match="no model cards"):
        build_leaderboard([tmp_path / "empty"])
    assert main(["leaderboard", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert main(["leaderboard", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("robustbench-knn: error:") for line in err)
    assert not (tmp_path / "out").exists()


def test_one_table_per_threat_model(tmp_path, capsys):
    # planted: every row put in the first threat model's table
    cards = tmp_path / "cards"
    put(cards, "evaluate-a-aaaaaaaaaaaa-x", card("a", worst="10.00"))
    put(cards, "evaluate-b-bbbbbbbbbbbb-x", card("b", worst="30.00", eps="0.5", threat="L2"))
    put(cards, "evaluate-c-cccccccccccc-x", card("c", worst="20.00", eps="0.5", threat="L2"))
    out = tmp_path / "out"
    assert main(["leaderboard", str(cards), "--out", str(out)]) == 0
    assert "3 rows" in capsys.readouterr().out
    html = parse(out / "leaderboard.html")
    by_id = {t["id"]: [(r["model"], r["threat model"], r["rank"]) for r in t["dicts"]] for t in html.tables}
    assert by_id == {"board-Linf": [("a", "Linf", "1")], "board-L2": [("b", "L2", "1"), ("c", "L2", "2")]}
    md = (out / "leaderboard.md").read_text()
    assert md.index("## Linf") < md.index("## L2")
    assert {r["threat model"] for r in csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text()))} == \
        {"Linf", "L2"}


def test_html_is_self_contained_sortable_and_plots_only_audited_models(tmp_path):
    # planted: every curve of the audit plotted (4 polylines, not the strongest standard one + worst case);
    # the links cell without data-sort (the sort script would compare undefined)
    cards = tmp_path / "cards"
    put(cards, "audit-full-f37494becba4-eps8", card("full", worst="4.00", unreliable=True),
        audit_result("full", "f37494becba4", reported=10.3, upper=4.0))
    put(cards, "evaluate-other-0123456789ab-x", card("other", worst="8.00"))
    html, out = build(tmp_path)
    text = (out / "leaderboard.html").read_text()
    assert html.external == [] and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script>" in text and "addEventListener" in text and "CIFAR-10 (JPEG q75)" in text
    (table,) = html.tables
    for row in table["rows"]:
        assert len(row) == len(table["head"])
        assert all("data-sort" in attrs for _, attrs in row)  # what the sort script reads
    eps_col = table["head"].index("ε")
    assert [float(attrs["data-sort"]) for _, attrs in (r[eps_col] for r in table["rows"])] == [EPS8, EPS8]
    assert html.svgs == ["curve-1"]  # the audited model only
    assert html.polylines == {"curve-1": 2}  # aa:apgd-t (the strongest standard attack) and the worst case
    assert "standard: aa:apgd-t" in text and "worst case (all runs)" in text


def test_certified_column_comes_from_certify_results_of_the_same_weights(tmp_path):
    # planted: certificates matched by model name only (the other weights' 9.00 landed in both rows)
    cards = tmp_path / "cards"
    put(cards, "evaluate-full-f37494becba4-potential", card("full", worst="4.00"),
        {"model": "full", "config_hash": "f37494becba4", "weights_hash": "b5b426410067"})
    put(cards, "evaluate-full-00112233aabb-potential", card("full", worst="6.00"))
    cert = {"model": "full", "weights_hash": "b5b426410067", "norm": "Linf", "n": 500,
            "per_eps": [{"eps": 4 / 255, "certified_acc": 20.0}, {"eps": EPS8, "certified_acc": 1.2}]}
    (cards / "certify-full-b5b426410067-Linf.json").write_text(json.dumps(cert))
    other = {**cert, "weights_hash": "ffffffffffff", "per_eps": [{"eps": EPS8, "certified_acc": 9.0}]}
    (cards / "certify-full-ffffffffffff-Linf.json").write_text(json.dumps(other))
    (cards / "certify-broken.json").write_text("{")  # passed over, not fatal
    html, _ = build(tmp_path)
    rows = {r["hash"]: r["certified %"] for r in html.tables[0]["dicts"]}
    assert rows == {"b5b426410067": "1.20", "00112233aabb": ""}
    assert any(h.endswith("certify-full-b5b426410067-Linf.json") for h in html.tables[0]["hrefs"])
