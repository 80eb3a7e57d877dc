"""The sandwich (certified ≤ robust ≤ worst case): rows from hand-written certify / audit / evaluate JSONs, the plot,
refusals of other threat models and weights, and soundness violations that must be reported."""

from __future__ import annotations

import json

import pytest

from robustbench_knn.cli import main
from robustbench_knn.config import UsageError
from robustbench_knn.reports import plots
from robustbench_knn.reports.sandwich import sandwich, save_sandwich

from .conftest import USER_MODULE

E2, E8, E16 = 2 / 255, 8 / 255, 16 / 255
HASH, DATA = "abc123abc123", "d" * 64


def certificate(norm="Linf", eps=(E2, E8), certified=((1, 1, 0, 0), (1, 0, 0, 0)), per_point=True, **extra):
    per_eps = [{"eps": e, "certified_acc": 100 * sum(c) / len(c), **({"certified": list(c)} if per_point else {})}
               for e, c in zip(eps, certified)]
    return {"model": "m", "weights_hash": HASH, "k": 5, "metric": "l2", "n": len(certified[0]), "norm": norm,
            "eps": list(eps), "dataset_sha256": DATA, "per_eps": per_eps, "radius": [0.04, 0.02, 0.0, 0.0], **extra}


def audit(worst=((E2, 75.0), (E8, 50.0), (E16, 0.0)), robust=(1, 1, 0, 0), eps=E8, norm="Linf", **extra):
    res = {"model": "m", "config_hash": "cfg000000000", "weights_hash": HASH, "dataset_sha256": DATA, "eps": eps,
           "threat_model": norm, "n": 4, "eps_curves": {"worst case": [list(p) for p in worst]},
           "upper_bound_acc": 50.0, **extra}
    if robust is not None:
        res["worst_case_robust"] = list(robust)
    return res


def evaluate(per_eps=((E2, (1, 1, 1, 0)), (E8, (1, 0, 0, 0))), n_test=4, per_point=True, norm="Linf", **extra):
    rows = [{"eps": e, "worst_case_acc": 100 * sum(r) / len(r), **({"worst_case_robust": list(r)} if per_point
                                                                   else {})} for e, r in per_eps]
    return {"model": "m", "config_hash": HASH, "weights_hash": HASH, "dataset_sha256": DATA, "threat_model": norm,
            "n_test": n_test, "per_eps": rows, **extra}


@pytest.fixture
def files(tmp_path):
    def write(**named):
        out = {}
        for name, obj in named.items():
            (tmp_path / f"{name}.json").write_text(json.dumps(obj))
            out[name] = tmp_path / f"{name}.json"
        return out
    return write


def test_rows_take_the_lowest_attack_figure_per_eps_on_common_points(files):
    # planted: taking the audit's swept curve (50%) at 8/255 instead of the lowest figure (evaluate, 25%), or a row
    # at an ε only one side has (16/255)
    f = files(cert=certificate(), audit=audit(), evaluate=evaluate())
    s = sandwich(f["cert"], [f["audit"], f["evaluate"]])
    rows = [(r["eps_label"], r["certified_acc"], r["worst_case_acc"], r["gap"], r["n_certified"], r["n_attacked"],
             r["source"]) for r in s["rows"]]
    assert rows == [("2/255", 50.0, 75.0, 25.0, 4, 4, "evaluate.json"), ("8/255", 25.0, 25.0, 0.0, 4, 4,
                                                                          "evaluate.json")]
    assert all(r["per_point"] and r["certified_broken"] == 0 for r in s["rows"])
    assert s["violations"] == [] and not s["weights_unchecked"] and not s["n_differs"]
    assert (s["model"], s["weights_hash"], s["norm"], s["n_certificate"]) == ("m", HASH, "Linf", 4)


def test_curves_hold_every_eps_of_each_side(files):
    # planted: the plot's curves cut to the shared ε (the certificate's 1/255 and the audit's 16/255 dropped), or the
    # highest attack figure per ε instead of the lowest
    f = files(cert=certificate(eps=(1 / 255, E8), certified=((1, 1, 1, 0), (1, 0, 0, 0))), audit=audit(),
              evaluate=evaluate())
    curves = sandwich(f["cert"], [f["audit"], f["evaluate"]])["curves"]
    assert curves["certified"] == [[pytest.approx(1 / 255), 75.0], [pytest.approx(E8), 25.0]]
    assert [(round(e * 255), a) for e, a in curves["worst case"]] == [(2, 75.0), (8, 25.0), (16, 0.0)]


def test_audit_alone_uses_its_curve_and_its_per_sample_worst_case(files):
    # planted: the audit's per-sample worst case at the audited ε ignored, or its curve points at other ε dropped
    f = files(cert=certificate(), audit=audit())
    rows = sandwich(f["cert"], [f["audit"]])["rows"]
    assert [(r["eps_label"], r["certified_acc"], r["worst_case_acc"], r["per_point"]) for r in rows] == [
        ("2/255", 50.0, 75.0, False), ("8/255", 25.0, 50.0, True)]
    assert rows[1]["attack_figure"] == "per-sample worst case" and rows[1]["certified_broken"] == 0


def test_eps_matched_with_a_relative_tolerance(files):
    # planted: exact float equality (8/255 written as 0.03137254901960784 by one tool and computed by another)
    f = files(cert=certificate(), evaluate=evaluate(per_eps=((E8 * (1 + 1e-12), (1, 1, 0, 0)),
                                                              (E8 * (1 + 1e-6), (0, 0, 0, 0)))))
    (row,) = sandwich(f["cert"], [f["evaluate"]])["rows"]
    assert row["eps_label"] == "8/255" and row["worst_case_acc"] == 50.0


def test_files_and_plot_are_written(files, tmp_path, monkeypatch):
    # planted: the plot not written, or the ℓ∞ axis in raw units instead of /255
    labels = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (labels.append(fig.axes[0].get_xlabel()), save(fig, path))[1])
    f = files(cert=certificate(), evaluate=evaluate())
    paths = save_sandwich(sandwich(f["cert"], [f["evaluate"]]), tmp_path / "out")
    assert [p.name for p in paths] == [f"sandwich-m-{HASH}-Linf.{x}" for x in ("md", "csv", "json", "png")]
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and labels == ["ε (×1/255, ℓ∞)"]
    md, csv = paths[0].read_text(), paths[1].read_text()
    assert "| 8/255 " in md and "No soundness violation" in md
    assert csv.splitlines()[0].startswith("eps,eps_label,certified_acc,worst_case_acc,gap") and len(csv.splitlines()) == 3
    assert json.loads(paths[2].read_text())["rows"][0]["gap"] == 25.0


def test_l2_rows_and_axis_in_pixel_units(files, tmp_path, monkeypatch):
    # planted: an ℓ2 radius labelled or plotted in /255
    labels = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (labels.append(fig.axes[0].get_xlabel()), save(fig, path))[1])
    f = files(cert=certificate("L2", eps=(0.5, 1.0)), evaluate=evaluate(((0.5, (1, 1, 1, 0)), (1.0, (1, 0, 0, 0))),
                                                                         norm="L2"))
    s = sandwich(f["cert"], [f["evaluate"]])
    assert [r["eps_label"] for r in s["rows"]] == ["0.5", "1"]
    save_sandwich(s, tmp_path / "out")
    assert labels == ["ε (ℓ2, pixel units in [0, 1])"] and (tmp_path / "out" / f"sandwich-m-{HASH}-L2.png").is_file()


def test_a_certified_point_broken_by_an_attack_is_a_violation(files):
    # planted: violation detection removed, or figures compared only as percentages (25% certified < 75% worst case
    # here, yet test image 0 is certified at 8/255 and broken)
    f = files(cert=certificate(), evaluate=evaluate(per_eps=((E8, (0, 1, 1, 1)),)))
    s = sandwich(f["cert"], [f["evaluate"]])
    (v,) = s["violations"]
    assert (v["kind"], v["eps_label"], v["count"], v["points"], v["source"]) == (
        "certified point broken", "8/255", 1, [0], "evaluate.json")
    assert s["rows"][0]["certified_broken"] == 1


def test_a_certified_figure_above_the_worst_case_is_a_violation(files, tmp_path, capsys):
    # planted: violation detection removed where only the figures exist (audit curve, no per-point data), or the
    # CLI exiting 0 and hiding it
    f = files(cert=certificate(), audit=audit(worst=((E8, 10.0),), robust=None))
    s = sandwich(f["cert"], [f["audit"]])
    (v,) = s["violations"]
    assert (v["kind"], v["certified_acc"], v["worst_case_acc"], v["n"]) == ("certified above worst case", 25.0, 10.0, 4)
    assert main(["sandwich", str(f["cert"]), str(f["audit"]), "--out", str(tmp_path / "out")]) == 1
    md = (tmp_path / "out" / f"sandwich-m-{HASH}-Linf.md").read_text()
    assert "SOUNDNESS VIOLATION" in md and "certified 25.00% above the worst case 10.00%" in md
    assert "SOUNDNESS VIOLATION" in capsys.readouterr().err


def test_radius_fallback_finds_a_broken_certified_point(files):
    # planted: a certificate without per-ε lists (older files) skipping the per-point check; its radius (0.04 ≥ 8/255
    # for test image 0) still proves image 0 certified
    f = files(cert=certificate(per_point=False), evaluate=evaluate(per_eps=((E8, (0, 1, 1, 1)),)))
    s = sandwich(f["cert"], [f["evaluate"]])
    assert s["rows"][0]["certified_from"] == "radius" and [v["points"] for v in s["violations"]] == [[0]]


def test_other_n_compared_on_common_points_or_flagged(files):
    # planted: figures on 4 and 6 images compared as if on the same points, or numbers made up for the common ones
    f = files(cert=certificate(), on6=evaluate(per_eps=((E8, (1, 1, 0, 0, 0, 0)),), n_test=6),
              bare6=evaluate(per_eps=((E8, (1, 1, 1, 1, 1, 0)),), n_test=6, per_point=False))
    (row,) = sandwich(f["cert"], [f["on6"]])["rows"]
    assert (row["n_certified"], row["n_attacked"], row["worst_case_acc"], row["n_differs"]) == (4, 4, 50.0, False)
    s = sandwich(f["cert"], [f["bare6"]])
    (row,) = s["rows"]
    assert (row["n_certified"], row["n_attacked"], row["certified_acc"], row["n_differs"]) == (4, 6, 25.0, True)
    assert s["n_differs"] and s["violations"] == []


@pytest.mark.parametrize("attack, msg", [
    (audit(norm="L2"), "different threat models"),  # planted: an ℓ2 audit sandwiched with an ℓ∞ certificate
    (evaluate(weights_hash="fff000fff000"), "different weights"),  # planted: another model's weights
    (evaluate(weights_hash=None, config_hash="cfg", model="other"), "different models"),
    (evaluate(dataset_sha256="e" * 64), "different data"),  # planted: the first N images of another data set
    (evaluate(per_eps=((E16, (0, 0, 0, 0)),)), "no ε in common"),
    (certificate(), "a certificate, not an attack result"),
    (evaluate(shard={"index": 0, "count": 2}), "merge"),
])
def test_mismatched_results_are_refused(files, tmp_path, capsys, attack, msg):
    f = files(cert=certificate(), attack=attack)
    with pytest.raises(UsageError, match=msg):
        sandwich(f["cert"], [f["attack"]])
    assert main(["sandwich", str(f["cert"]), str(f["attack"]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_missing_weights_hash_is_accepted_and_flagged(files):
    # planted: a result without a weights hash silently taken as checked
    f = files(cert=certificate(), attack=evaluate(weights_hash=None, config_hash="cfg"))
    s = sandwich(f["cert"], [f["attack"]])
    assert s["weights_unchecked"] and s["weights_unchecked_files"] == ["attack.json"]


def test_cli_missing_file_exits_2(files, tmp_path, capsys):
    f = files(cert=certificate())
    assert main(["sandwich", str(f["cert"]), str(tmp_path / "nope.json"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_certify_against_writes_the_sandwich_and_refuses_before_work(tmp_path, monkeypatch, tiny_data_dir,
                                                                         capsys):
    # planted: --against ignored, the sandwich built on another model's result, or a violation exiting 0
    (tmp_path / "mysand.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USER_DATA", str(tiny_data_dir))

    def run(out, *extra):
        return main(["certify", "--model", "mysand:make", "--n-test", "6", "--data-dir", str(tiny_data_dir),
                     "--device", "cpu", "--out", str(tmp_path / out), "--quiet", "--eps", "0,1/255", "--steps", "2",
                     *extra])

    assert run("plain") == 0
    (cert_path,) = (tmp_path / "plain").glob("certify-make-*-Linf.json")
    cert = json.loads(cert_path.read_text())
    assert [len(r["certified"]) for r in cert["per_eps"]] == [6, 6]
    certified0 = cert["per_eps"][0]["certified"]
    assert any(certified0)  # else the planted violation below would be vacuous
    head = {"model": "make", "weights_hash": cert["weights_hash"], "dataset_sha256": cert["dataset_sha256"]}
    ok = evaluate(per_eps=((0.0, [1] * 6),), n_test=6, **head)
    broken = evaluate(per_eps=((0.0, [0] * 6),), n_test=6, **head)
    (tmp_path / "ok.json").write_text(json.dumps(ok))
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    (tmp_path / "l2.json").write_text(json.dumps({**ok, "threat_model": "L2"}))
    (tmp_path / "other.json").write_text(json.dumps({**ok, "weights_hash": "fff000fff000"}))
    capsys.readouterr()

    assert run("with", "--against", "ok.json") == 0
    s = json.loads((tmp_path / "with" / f"sandwich-make-{cert['weights_hash']}-Linf.json").read_text())
    assert [r["eps_label"] for r in s["rows"]] == ["0/255"] and s["violations"] == []
    assert (tmp_path / "with" / f"sandwich-make-{cert['weights_hash']}-Linf.png").is_file()
    assert run("bad", "--against", "broken.json") == 1
    s = json.loads((tmp_path / "bad" / f"sandwich-make-{cert['weights_hash']}-Linf.json").read_text())
    assert s["violations"][0]["count"] == sum(certified0)
    capsys.readouterr()
    for name, msg in (("l2.json", "different threat models"), ("other.json", "different weights"),
                      ("missing.json", "no such file")):
        assert run("refused", "--against", name) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1 and not (tmp_path / "refused").exists()
