"""Evaluation engine: clean accuracy, then each attack at each ε, judged by ``predict`` (the real decision).

Every adversarial example is checked (finite, inside [0, 1], within ε of its clean image in the threat model's norm,
ℓ∞ or ℓ2), never silently
clipped: an example outside the threat model is a failure of that attack on that sample only (the attack's valid
breaks still count), and each cell reports how many it returned. A sample is robust at an ε only if it is
correctly classified clean and survives every attack run at that ε (the per-sample worst case).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attacks import AttackSpec, input_gradient
from ..devices import machine_name
from ..norms import distance
from ..store import fingerprint, read_json, write_json
from .distributed import SINGLE, Partition, all_gather, current, seed_batch

TOL = 1e-6  # float32 slack on the ε-ball and [0, 1] checks


class AttackViolation(RuntimeError):
    """An attack returned an example outside the threat model."""


@dataclass
class ValidityReport:
    n_nonfinite: int
    n_out_of_box: int
    n_out_of_ball: int
    max_linf: float  # largest ℓ∞ distance of a finite example (whatever the threat model)
    max_dist: float = float("nan")  # largest distance in the threat model's norm

    @property
    def ok(self) -> bool:
        return self.n_nonfinite == 0 and self.n_out_of_box == 0 and self.n_out_of_ball == 0


@torch.no_grad()
def valid_examples(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "Linf"
                   ) -> tuple[torch.Tensor, ValidityReport]:
    """Per sample: is ``x_adv`` finite, inside [0, 1] and within ``eps`` of ``x`` in ``norm``; and the counts."""
    if x_adv.shape != x.shape:
        raise AttackViolation(f"attack returned shape {tuple(x_adv.shape)} for input {tuple(x.shape)}")
    flat = x_adv.flatten(1)
    finite = torch.isfinite(flat).all(1)
    box = ((flat >= -TOL) & (flat <= 1 + TOL)).all(1)
    inf = torch.tensor(float("inf"), device=x.device)
    linf = torch.where(finite, distance(x_adv, x, "Linf"), inf)
    dist = linf if norm == "Linf" else torch.where(finite, distance(x_adv, x, norm), inf)
    ball = dist <= eps + TOL * (1 if norm == "Linf" else max(1.0, eps))  # ℓ2: float32 sums over 3072 pixels
    rep = ValidityReport(int((~finite).sum()), int((~box).sum()), int((~ball).sum()),
                         float(linf[finite].max()) if finite.any() else float("inf"),
                         float(dist[finite].max()) if finite.any() else float("inf"))
    return finite & box & ball, rep


def check_adversarial(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "Linf") -> ValidityReport:
    return valid_examples(x, x_adv, eps, norm)[1]


def bad_gradient_mask(clf: torch.nn.Module, attack: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Points whose guiding input-gradient at the clean point is exactly zero or non-finite (AutoAttack check):
    the surrogate's or objective's for the toolkits and kFGSM, the loss an adaptive white-box attack follows
    (its ``guide_loss``) for those; gradient-free and transfer attacks follow none."""
    if getattr(attack, "family", "white-box") == "white-box" and hasattr(attack, "guide_loss"):
        grad = input_gradient(lambda z: attack.guide_loss(z, y), x)
    elif attack.gradient_source is None:
        return torch.zeros(len(x), dtype=torch.bool)
    elif attack.gradient_source == "objective":
        grad = input_gradient(lambda z: clf.attack_objective(z, y), x)
    else:
        grad = input_gradient(lambda z: F.cross_entropy(clf(z), y, reduction="none"), x)
    flat = grad.flatten(1)
    return ((flat == 0).all(1) | ~torch.isfinite(flat).all(1)).cpu()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("robustbench-knn", "torch", "torchattacks", "adversarial-robustness-toolbox", "pyautoattack"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


COMMAND: list[str] = []  # the CLI's own command line, set by ``cli.main`` (else the process's argv is recorded)


def command_line() -> str:
    """The command that makes a result: the CLI's own command line, else the process's."""
    return " ".join(COMMAND or [Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance(device: torch.device | str) -> dict[str, str]:
    """Where and how a result was made: the machine (GPU name, or CPU model and cores) and the command line."""
    return {"machine": machine_name(device), "command": command_line()}


def cell_seed(seed: int, eps: float, key: str) -> int:
    """Each (ε, attack) cell draws from its own seed, so a resumed run equals an uninterrupted one."""
    return int(fingerprint(seed, round(eps, 8), key)[:8], 16)


def batch_seed(cell: int, batch: int) -> int:
    """Each global batch of a cell draws from its own seed, so it gives the same outcome on any rank or shard."""
    return int(fingerprint(cell, batch)[:8], 16)


SEEDING = "per-batch"  # in every cell's name: cells of the older per-cell seeding are never mixed in
VALIDITY = "per-sample"  # likewise: cells from when one invalid example rejected the whole cell are not reused
PREDICT_BLOCK = 1000  # clean predictions run in fixed blocks of the global index (and are split by them)


def predict_split(clf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``clf.predict`` on ``x`` in fixed blocks; a process group splits the blocks and gathers the labels (a shard
    computes them all: it needs every clean label to know which points the global batches hold)."""
    part = current()
    n_blocks = (len(x) + PREDICT_BLOCK - 1) // PREDICT_BLOCK
    mine = {b: clf.predict(x[b * PREDICT_BLOCK:(b + 1) * PREDICT_BLOCK]).cpu()
            for b in range(n_blocks) if not part.group or part.owns(b)}
    for other in all_gather(mine):
        mine.update(other)
    return torch.cat([mine[b] for b in range(n_blocks)]) if n_blocks else torch.zeros(0, dtype=torch.long)


def run_attacks(
    clf: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[AttackSpec],
    eps_list: list[float],
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 250,
    progress: bool = True,
    seed: int = 0,
    cell_dir: str | os.PathLike | None = None,
    clean_pred: torch.Tensor | None = None,
    cascade: bool = False,
    norm: str = "Linf",
) -> dict[str, Any]:
    """Attack ``x`` (floats in [0, 1]) with every spec at every ε; return per-ε, per-attack and per-sample results.

    ``norm``: the threat model ("Linf" or "L2", ``norms.NORMS``); every spec must have a form for it (checked
    before any work) and every example is judged inside that ball.

    ``cascade``: at each ε the attacks run in the order given, each only on the points no earlier attack broke
    (as AutoAttack's own ensemble does): the same per-sample worst case for less work, and each attack's figure
    is then cumulative, "on survivors" (``on_survivors`` in its cell).

    Only clean-correct points are attacked (the others are never robust), as AutoAttack does, in global batches
    of ``batch_size`` of them; this process runs the batches its partition owns (``distributed.current()``) and a
    process group gathers the rest. With ``cell_dir`` each finished (ε, attack) cell is stored there (atomically)
    and reused by a later call on the same images, labels and parameters, so a killed run resumes (a part keeps
    its own part of a cell); ``cell_dir`` must be specific to the model. ``clean_pred``: ``predict(x)`` if known.
    """
    overrides = overrides or {}
    for spec in specs:  # a one-line error before any work
        spec.check_norm(norm)
    part = current()
    clean_pred = predict_split(clf, x) if clean_pred is None else clean_pred.cpu()
    clean_ok = clean_pred == y.cpu()
    idx = torch.nonzero(clean_ok).squeeze(1)
    # the weights and bank themselves, not the config (a retrain elsewhere may differ in the last bits), every
    # setting that changes an outcome (decision rule, surrogate and its parameters, loss constants) and the
    # versions of this package and the toolkits: a fixed bug or a new release never serves an old outcome
    settings = clf.settings() if hasattr(clf, "settings") else {"class": type(clf).__name__}
    data_fp = (fingerprint(x, y, batch_size, settings, versions(), *clf.state_dict().values())
               if cell_dir is not None else "")
    cells: dict[tuple[float, str], dict[str, Any]] = {}
    n_batches = (len(idx) + batch_size - 1) // batch_size
    mine = sum(part.owns(b) for b in range(n_batches))
    bar = tqdm(total=len(eps_list) * len(specs) * mine, desc="attacks", unit="batch",
               disable=not progress or not part.writer)
    for eps in eps_list:
        survivors = clean_ok.clone()
        for spec in specs:
            params = {**spec.defaults, **overrides.get(spec.key, {})}
            if cascade:  # only the points every earlier attack left robust; their set is part of the cell's key
                idx = torch.nonzero(survivors).squeeze(1)
            path = None
            if cell_dir is not None:
                key = fingerprint(data_fp, params, seed, SEEDING, VALIDITY, *((idx,) if cascade else ()),
                                   *((norm,) if norm != "Linf" else ()))  # ℓ∞ cells keep their earlier names
                name = f"{spec.key.replace(':', '_')}-{'' if norm == 'Linf' else norm + '-'}eps{eps:.6f}-{key}"
                path = Path(cell_dir) / f"{name}.json"
            part_path = path.with_suffix(f".{part.tag}.json") if path is not None and part.world > 1 else None
            if path is not None and path.is_file():
                entry = read_json(path)
                bar.update(mine)
            else:
                if part_path is not None and part_path.is_file():
                    own = read_json(part_path)
                    bar.update(mine)
                else:
                    bar.set_postfix_str(f"eps={eps:.4f} {spec.key}")
                    batch_dir = path.with_suffix(".batches") if path is not None else None
                    own = _attack_cell(clf, x, y, idx, spec, eps, params, batch_size, cell_seed(seed, eps, spec.key),
                                       lambda: bar.update(1), part, batch_dir, norm)
                    if part_path is not None:
                        write_json(part_path, own)
                entry = combine_parts(all_gather(own))
                if path is not None and part.writer and is_complete(entry):
                    write_json(path, entry)
                if path is not None and (path.is_file() or part_path is not None):  # kept elsewhere now
                    _drop_batches(path.with_suffix(".batches"), own["batches"])
            if cascade:
                entry = {**entry, "on_survivors": True}
                survivors &= robust_mask(entry)
            cells[(eps, spec.key)] = entry
    bar.close()
    return {"n": len(x), "threat_model": norm, "clean_pred": clean_pred.tolist(),
            "clean_correct": clean_ok.int().tolist(), **assemble(clean_ok, eps_list, [s.key for s in specs], cells)}


def _drop_batches(batch_dir: Path, batches: list[int]) -> None:
    """Remove this process's kept batches of a cell now stored whole (or as this part), and the folder once empty."""
    for b in batches:
        (batch_dir / f"batch{b}.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: another shard's batches are still there
        batch_dir.rmdir()


def assemble(clean_ok: torch.Tensor, eps_list: list[float], keys: list[str],
             cells: dict[tuple[float, str], dict[str, Any]]) -> dict[str, Any]:
    """Per ε: every attack's cell, the per-sample worst case (robust = clean-correct and survives every attack;
    an attack's invalid examples are its failures on those samples) and the cells that returned any example
    outside the threat model."""
    per_eps = []
    for eps in eps_list:
        worst = clean_ok.clone()
        attacks_out = {key: cells[(eps, key)] for key in keys}
        for entry in attacks_out.values():
            rob = robust_mask(entry)
            if rob is not None:
                worst &= rob
        per_eps.append({
            "eps": eps, "clean_acc": round(100 * clean_ok.float().mean().item(), 2),
            "attacks": attacks_out,
            "worst_case_acc": round(100 * worst.float().mean().item(), 2) if attacks_out else None,
            "worst_case_robust": worst.int().tolist(),
        })
    invalid = [f"{k} at eps={r['eps']:.4f}: {a['n_invalid']} of {a['n_attacked']} examples"
               for r in per_eps for k, a in r["attacks"].items() if a.get("n_invalid")]
    return {"per_eps": per_eps, "invalid_examples": invalid}


def is_complete(entry: dict[str, Any]) -> bool:
    return len(entry["batches"]) == entry["n_batches"]


def combine_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell from the parts that ran its batches: counts summed, per-sample outcomes joined; ``seconds`` is
    the sum (device-seconds, comparable to a single run's) and ``part_seconds_max`` the slowest part."""
    done = [p for p in parts if is_complete(p)]
    if done:  # a part that found the whole cell in the cache already holds everything
        return done[0]
    batches = sorted(b for p in parts for b in p["batches"])
    if len(batches) != len(set(batches)) or len({p["n_batches"] for p in parts}) != 1:
        raise ValueError("the parts of a cell overlap or disagree on its batches; were they run with different "
                         "settings?")
    first = parts[0]
    viol = {k: sum(p["violations"][k] for p in parts) for k in ("n_nonfinite", "n_out_of_box", "n_out_of_ball")}
    viol["max_linf"] = max(p["violations"]["max_linf"] for p in parts)
    if any("max_dist" in p["violations"] for p in parts):
        viol["max_dist"] = max(p["violations"].get("max_dist", 0.0) for p in parts)
    n_attacked = first["n_attacked"]
    n_bad = sum(p["n_zero_or_nonfinite_grad"] for p in parts)
    out = {**first, "valid": True, "n_invalid": sum(p.get("n_invalid", 0) for p in parts), "violations": viol,
           "seconds": round(sum(p["seconds"] for p in parts), 2),
           "part_seconds_max": max(p.get("part_seconds_max", p["seconds"]) for p in parts),
           "n_zero_or_nonfinite_grad": n_bad, "zero_or_nonfinite_grad_frac": round(n_bad / max(n_attacked, 1), 4),
           "surrogate_fooled_decision_right": sum(p["surrogate_fooled_decision_right"] for p in parts),
           "batches": batches}
    robust = torch.zeros(len(first["robust"]), dtype=torch.bool)
    for p in parts:
        robust |= torch.tensor(p["robust"], dtype=torch.bool)
    out["robust_acc"] = round(100 * robust.float().mean().item(), 2)
    out["robust"] = robust.int().tolist()
    return out


def robust_mask(entry: dict[str, Any]) -> torch.Tensor | None:
    """Per-sample robustness of a finished cell (clean-correct and not validly broken by this attack); None for
    a cell stored before per-sample validity that was rejected whole (it holds no per-sample outcome)."""
    return torch.tensor(entry["robust"], dtype=torch.bool) if "robust" in entry else None


def _attack_cell(clf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, spec: AttackSpec,
                 eps: float, params: dict[str, Any], batch_size: int, seed: int, tick: Any,
                 part: Partition = SINGLE, batch_dir: Path | None = None, norm: str = "Linf") -> dict[str, Any]:
    """One attack at one ε on the points ``idx`` (the global batches ``part`` owns): validity, per-sample
    robustness, zero-gradient count, time. With ``batch_dir`` each finished batch is kept there and a later
    call reuses it, so a run killed inside a long cell resumes at its next batch (each batch has its own seed,
    so the outcome is the same)."""
    n_batches = (len(idx) + batch_size - 1) // batch_size
    batches = [b for b in range(n_batches) if part.owns(b)]
    if not batches:  # a partition with no batch of this cell (more ranks than batches)
        return _batch_entry(spec, params, torch.zeros(len(x), dtype=torch.bool), 0, dict(_NO_VIOLATIONS), 0, 0, 0.0,
                            len(idx), [], n_batches)
    entries, attack = [], None
    for b in batches:
        file = batch_dir / f"batch{b}.json" if batch_dir is not None else None
        if file is not None and file.is_file():
            entries.append(read_json(file))
        else:
            t0 = time.perf_counter()
            if attack is None:  # built once, from the cell's seed, whichever batch runs first
                seed_batch(seed)
                attack = spec.build(clf, eps, norm, **params)
            entry = _attack_batch(clf, attack, x, y, idx[b * batch_size:(b + 1) * batch_size], eps,
                                  batch_seed(seed, b), norm)
            entries.append(_batch_entry(spec, params, *entry, time.perf_counter() - t0, len(idx), [b], n_batches))
            if file is not None:
                write_json(file, entries[-1])
        tick()
    own = combine_parts(entries)
    own.pop("part_seconds_max", None)  # one process ran these batches one after another: no slowest part
    return own


_NO_VIOLATIONS = {"n_nonfinite": 0, "n_out_of_box": 0, "n_out_of_ball": 0, "max_linf": 0.0}


def _attack_batch(clf: torch.nn.Module, attack: Any, x: torch.Tensor, y: torch.Tensor, sel: torch.Tensor, eps: float,
                  seed: int, norm: str = "Linf") -> tuple[torch.Tensor, int, dict[str, Any], int, int]:
    """One global batch: (robust over all of ``x``, invalid examples, violations, zero-gradient count,
    surrogate-only). An invalid example is the attack's failure on that sample: it stays robust for this attack."""
    xb, yb = x[sel].to(clf.device), y[sel].to(clf.device)
    seed_batch(seed)  # attacks with random starts draw from the global generators
    x_adv = attack(xb, yb).detach()
    ok, rep = valid_examples(xb, x_adv, eps, norm)
    violations = {"n_nonfinite": rep.n_nonfinite, "n_out_of_box": rep.n_out_of_box,
                  "n_out_of_ball": rep.n_out_of_ball, "max_linf": rep.max_linf,
                  **({"max_dist": rep.max_dist} if norm != "Linf" else {})}
    robust = torch.zeros(len(x), dtype=torch.bool)
    judged = torch.where(ok.view(-1, *([1] * (xb.dim() - 1))), x_adv, xb)  # an invalid example is judged as its clean point
    right = clf.predict(judged).cpu() == yb.cpu()
    robust[sel] = right | ~ok.cpu()
    with torch.no_grad():  # toolkits count a point broken when the surrogate is fooled: how often wrongly
        n_surrogate_only = int(((clf(judged).argmax(1).cpu() != yb.cpu()) & right & ok.cpu()).sum())
    return robust, int((~ok).sum()), violations, int(bad_gradient_mask(clf, attack, xb, yb).sum()), n_surrogate_only


def _batch_entry(spec: AttackSpec, params: dict[str, Any], robust: torch.Tensor, n_invalid: int,
                 violations: dict[str, Any], n_bad_grad: int, n_surrogate_only: int, seconds: float, n_attacked: int,
                 batches: list[int], n_batches: int) -> dict[str, Any]:
    """A cell's record of the batches given (one, or none): ``combine_parts`` joins such records. ``valid``
    stays True (a cell always has per-sample outcomes); ``n_invalid`` counts the examples outside the threat
    model, each a failure of the attack on its sample."""
    entry: dict[str, Any] = {
        "toolkit": spec.toolkit, "params": params, "valid": True, "n_invalid": n_invalid, "violations": violations,
        "seconds": round(seconds, 2), "n_attacked": n_attacked,
        # over the attacked (clean-correct) points
        "n_zero_or_nonfinite_grad": n_bad_grad, "zero_or_nonfinite_grad_frac": round(n_bad_grad / max(n_attacked, 1), 4),
        # adversarial examples that fool the surrogate logits but not the decision (k-NN vote)
        "surrogate_fooled_decision_right": n_surrogate_only,
        "batches": batches, "n_batches": n_batches,
        "robust_acc": round(100 * robust.float().mean().item(), 2), "robust": robust.int().tolist(),
    }
    return entry
