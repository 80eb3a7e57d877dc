"""A k-NN leaderboard in RobustBench's columns, built from the model cards (``*.model-card.json``) under some folders.

Two kinds of card are read: an audit's (``audit-<name>-<hash>-eps<N>.model-card.json``; its worst case is the
audit's upper bound, and the sibling ``audit-...json`` holds the verdict, the standard suite's figure, the ε curves
and the config) and an evaluate/benchmark card (any other ``<kind>-<name>-<hash>-...``; ``more_eps`` holds the
cards of its further ε). Cards of the same model (name *and* weights/config hash), threat model and ε become one
row: the worst case is the lowest figure any of them reached, since each is an upper bound on the true robust
accuracy and the lowest is the tightest, or lower still the per-image union of their breaks (``union.py``) where
their results hold per-image data: on the first n images, each image judged by every run that reached it, n chosen
as ``union.py`` says. Rows are ranked within each ε (figures at different ε do not compare).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..config import UsageError
from ..evaluation.cards import eps_label
from ..store import read_json
from .union import PerSample, per_sample, row_union

CARD_SUFFIX = ".model-card.json"
THREAT_ORDER = ("Linf", "L2")  # RobustBench's order; any other threat model follows, alphabetically
WORST_CASE_TEXT = ("the lowest robust accuracy any run reached on the model at that ε (per-sample worst case over "
                   "every attack of the run; an audit's upper bound), or, lower still, the per-image union of the "
                   "runs' breaks on the first n test images, each image judged by every run that reached it (n: "
                   "the most images on which runs on fewer break nothing more, or more where that is lower)")


class UnreadableCard(Exception):
    """A card file that is not a JSON object; the leaderboard skips it and says so."""


@dataclass
class Entry:
    """One card at one ε (each of a card's ``more_eps`` is an entry of its own)."""

    kind: str  # "audit" or the card's own kind ("evaluate", ...)
    name: str
    hash: str
    threat_model: str
    eps: str  # canonical label, e.g. 8/255
    eps_value: float
    clean_acc: float | None
    worst_case: float | None
    unreliable: bool | None
    n: int | None
    certified: float | None
    dataset: str
    card: Path
    result: Path | None  # the sibling results JSON, when it exists
    label: str  # short name for links: <folder>/<kind>[-<tail>]
    audit: dict[str, Any] | None = None  # the audit JSON (audit cards only)
    config: dict[str, Any] | None = None
    per_sample: PerSample | None = None  # per test image, from the results JSON


@dataclass
class Row:
    threat_model: str
    eps: str
    eps_value: float
    name: str
    hash: str
    clean_acc: float | None
    reported_acc: float | None  # the standard suite's figure, from an audit
    worst_case: float | None
    worst_case_from: str  # label of the entry that reached the worst case
    verdict: str
    verdict_text: str
    unreliable: bool | None
    n: int | None
    recipe: str
    certified: float | None
    dataset: str
    entries: list[Entry]
    curves: dict[str, list[list[float]]] | None = None  # the audit's eps_curves
    standard: list[str] = field(default_factory=list)  # the audit's standard-suite attack keys
    audit_eps: float | None = None
    rank: int | None = None
    certificate: Path | None = None  # the `certify` results the certified figure comes from
    audit_n: int | None = None  # images of the audit the verdict and the standard suite's figure come from


@dataclass
class Leaderboard:
    tables: dict[str, list[Row]]  # threat model → rows, ordered by ε then rank
    skipped: list[tuple[Path, str]]  # cards that could not be read, and why
    datasets: list[str]  # the cards' dataset_detail values, for the caption

    @property
    def rows(self) -> list[Row]:
        return [r for rows in self.tables.values() for r in rows]


def _num(value: Any) -> float | None:
    """Cards hold accuracies as strings in % ("52.80"); a missing or malformed one is blank, not an error."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _eps(label: Any, norm: str = "Linf") -> tuple[str, float]:
    """Canonical label and value, so "8/255" and "0.0313725" are one ε; an unreadable one keeps its text."""
    try:
        text = str(label).strip()
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        return str(label), math.inf
    return eps_label(value, norm), value


def _stem(card: Path) -> str:
    return card.name[: -len(CARD_SUFFIX)]


def _hash_and_tail(stem: str, name: str) -> tuple[str, str]:
    """``<kind>-<name>-<hash>[-<tail>]``: the name may hold hyphens (full-100ep), so it is matched, not split."""
    _, _, rest = stem.partition("-")
    if name and rest.startswith(name + "-"):
        hash_, _, tail = rest[len(name) + 1:].partition("-")
        return hash_, tail
    return "", ""


def format_lr(lr: float) -> str:
    mant, _, exp = f"{lr:e}".partition("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def recipe_of(config: dict[str, Any] | None) -> str:
    """Architecture and training recipe in a few words, e.g. 'IdResNet w_r=2048 N_S=2 d=15 k=800, 20 ep adam lr
    1e-3'; blank for a model without a config of this project (a user's module or file)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return ""
    m, t = config["model"], config.get("train") or {}
    net = "IdResNet" if m.get("identity_init", True) else "dense net"
    arch = f"{net} w_r={m.get('w_r', '?')} N_S={m.get('n_spaces', '?')} d={m.get('d', '?')}"
    arch += " logits head" if m.get("head") == "logits" else f" k={config.get('k', '?')}"
    if t.get("trained") is False:
        return f"{arch}, untrained"
    parts = [f"{t.get('epochs', '?')} ep {t.get('optimizer', '?')}"]
    if isinstance(t.get("lr"), (int, float)):
        parts[0] += f" lr {format_lr(t['lr'])}"
    if t.get("schedule", "constant") != "constant":
        parts.append(t["schedule"])
    if t.get("noise") is False:
        parts.append("no noise")
    if t.get("n_train"):
        parts.append(f"n_train={t['n_train']}")
    return f"{arch}, {' '.join(parts)}"


def read_card(card: Path) -> list[Entry]:
    """The entries of one card file (its own ε and each of ``more_eps``). Raises UnreadableCard."""
    try:
        data = read_json(card)
    except (OSError, ValueError) as e:
        raise UnreadableCard(f"not readable as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UnreadableCard("not a model card (not a JSON object)")
    stem = _stem(card)
    kind = "audit" if stem.startswith("audit-") else stem.partition("-")[0] or "card"
    result_path = card.with_name(stem + ".json")
    result = None
    if result_path.is_file():
        try:
            result = read_json(result_path)
        except (OSError, ValueError):
            result = None  # the card still stands; the row just lacks what only the results hold
    result = result if isinstance(result, dict) else None
    name = str(data.get("name") or (result or {}).get("model") or stem)
    hash_, tail = _hash_and_tail(stem, name)
    # one recipe (config hash) trained on two machines gives two models: where the results name the weights, the
    # row is keyed by them
    hash_ = str((result or {}).get("weights_hash") or hash_ or (result or {}).get("config_hash") or "")
    label = f"{card.parent.name}/{kind}" + (f"-{tail}" if tail else "")
    cards = [data] + [c for c in (data.get("more_eps") or []) if isinstance(c, dict)]
    entries = []
    for c in cards:
        eps, eps_value = _eps(c.get("eps"), str(c.get("threat_model") or "Linf"))
        unreliable = c.get("unreliable")
        n = c.get("n_examples")
        entries.append(Entry(
            kind=kind, name=name, hash=hash_, threat_model=str(c.get("threat_model") or "unknown"), eps=eps,
            eps_value=eps_value, clean_acc=_num(c.get("clean_acc")), worst_case=_num(c.get("worst_case_robust_acc")),
            unreliable=unreliable if isinstance(unreliable, bool) else None,
            n=n if isinstance(n, int) and not isinstance(n, bool) else None,
            certified=_num(c.get("certified_acc")), dataset=str(c.get("dataset_detail") or c.get("dataset") or ""),
            card=card, result=result_path if result is not None else None, label=label,
            audit=result if kind == "audit" else None,
            config=result.get("config") if result is not None and isinstance(result.get("config"), dict) else None,
            per_sample=per_sample(result, kind, eps_value)))
    return entries


def find_cards(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Every model card under the folders, recursively, each once; a missing folder: UsageError."""
    found: dict[Path, None] = {}
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            raise UsageError(f"{str(d)!r} is not a folder")
        for card in sorted(path.rglob(f"*{CARD_SUFFIX}")):
            if card.is_file():
                found.setdefault(card.resolve(), None)
    return list(found)


def _merge(entries: list[Entry]) -> Row:
    # the row's clean accuracy and n come from the entry that reached the worst case, so the three describe the
    # same images; audits first on a tie (their figure is the one with a verdict), then the larger n
    order = sorted(entries, key=lambda e: (e.worst_case is None, e.worst_case if e.worst_case is not None else 0,
                                          e.kind != "audit", -(e.n or 0)))
    joined = row_union([(e.label, e.per_sample) for e in order if e.per_sample is not None])
    # a run with per-image data is inside the join, which chose its n (union.py); runs without compete on their figure
    rivals = order if joined is None else [e for e in order if e.per_sample is None]
    best = rivals[0] if rivals else None
    # the join where it is lower than every rival, or as low and on more images
    use_join = joined is not None and (best is None or best.worst_case is None or joined[0] < best.worst_case
                                       or (joined[0] == best.worst_case and joined[2] > (best.n or 0)))
    row_n = joined[2] if use_join else best.n
    # the verdict shown is that of an audit on the row's images where there is one
    audits = sorted((e for e in order if e.audit is not None), key=lambda e: e.n != row_n)
    audit = audits[0].audit if audits else None
    # the row's n is that of its worst case; the audit may be on other images, and a reader must see so
    audit_n = audits[0].n if audits else None
    verdict = (audit or {}).get("verdict") or {}
    reported = (audit or {}).get("reported_acc", verdict.get("reported_acc"))
    flags = [e.unreliable for e in entries if e.unreliable is not None]
    # one flag on any run of the model is a reason to doubt its figures; a blank means no check ever ran
    unreliable = True if True in flags else (False if flags else None)
    config = next((e.config for e in audits + order if e.config), None)
    certified = [e.certified for e in entries if e.certified is not None]
    curves = (audit or {}).get("eps_curves")
    if use_join:
        worst, clean, n = joined[:3]
        source = "per-image union of " + ", ".join(joined[3])
    else:
        worst, clean, n = best.worst_case, best.clean_acc, best.n
        source = best.label if best.worst_case is not None else ""
    head = order[0]
    return Row(
        threat_model=head.threat_model, eps=head.eps, eps_value=head.eps_value, name=head.name, hash=head.hash,
        clean_acc=clean if clean is not None else next((e.clean_acc for e in order if e.clean_acc is not None), None),
        reported_acc=_num(reported), worst_case=worst, worst_case_from=source,
        verdict=str(verdict.get("status") or ""), verdict_text=str(verdict.get("text") or ""),
        unreliable=unreliable, n=n if n is not None else next((e.n for e in order if e.n is not None), None),
        recipe=recipe_of(config), certified=max(certified) if certified else None,
        dataset=head.dataset or next((e.dataset for e in order if e.dataset), ""), entries=order,
        curves=curves if isinstance(curves, dict) and curves else None,
        standard=[str(k) for k in (audit or {}).get("standard") or []],
        audit_eps=_num((audit or {}).get("eps")), audit_n=audit_n)


def _rank(rows: list[Row]) -> list[Row]:
    """RobustBench's order within each ε: highest worst case first; ties share a rank; no figure, no rank."""
    out = []
    for eps_value in sorted({r.eps_value for r in rows}):
        group = sorted((r for r in rows if r.eps_value == eps_value),
                       key=lambda r: (r.worst_case is None, -(r.worst_case or 0.0), r.name, r.hash))
        for i, r in enumerate(group):
            if r.worst_case is None:
                r.rank = None
            elif i and group[i - 1].worst_case == r.worst_case:
                r.rank = group[i - 1].rank
            else:
                r.rank = i + 1
        out += group
    return out


def _certificates(dirs: Sequence[str | os.PathLike]) -> dict[tuple[str, str, str, str], tuple[float, Path]]:
    """(threat model, ε label, model, weights hash) → (certified %, file) from every ``certify-*.json``; a file
    that is not a certificate is passed over (the cards are what the leaderboard is made of)."""
    found = {}
    for d in dirs:
        for path in sorted(Path(d).rglob("certify-*.json")):
            try:
                res = read_json(path)
                norm = str(res["norm"])
                for r in res["per_eps"]:
                    key = (norm, eps_label(float(r["eps"]), norm), str(res["model"]), str(res["weights_hash"]))
                    found[key] = (float(r["certified_acc"]), path)
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return found


def build_leaderboard(dirs: Sequence[str | os.PathLike]) -> Leaderboard:
    groups: dict[tuple[str, str, str, str], list[Entry]] = {}
    skipped = []
    for card in find_cards(dirs):
        try:
            entries = read_card(card)
        except UnreadableCard as e:
            skipped.append((card, str(e)))
            continue
        for e in entries:
            groups.setdefault((e.threat_model, e.eps, e.name, e.hash), []).append(e)
    if not groups:  # an empty leaderboard would look like a result; say what was (not) found instead
        where = ", ".join(map(str, dirs))
        raise UsageError(f"no readable model cards under {where}: " + "; ".join(f"{p}: {why}" for p, why in skipped)
                         if skipped else f"no model cards (*{CARD_SUFFIX}) under {where}")
    rows = [_merge(g) for g in groups.values()]
    certificates = _certificates(dirs)
    for r in rows:  # a certified lower bound of the same weights at the same ε
        if (hit := certificates.get((r.threat_model, r.eps, r.name, r.hash))) is not None:
            r.certified, r.certificate = hit
    threats = sorted({r.threat_model for r in rows},
                     key=lambda t: (THREAT_ORDER.index(t) if t in THREAT_ORDER else len(THREAT_ORDER), t))
    tables = {t: _rank([r for r in rows if r.threat_model == t]) for t in threats}
    datasets = sorted({r.dataset for r in rows if r.dataset})
    return Leaderboard(tables=tables, skipped=skipped, datasets=datasets)
