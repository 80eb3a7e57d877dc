"""Where an attack step's time goes on FULL (prints figures; no thresholds): the network alone (forward + input
gradient), the k-NN part alone (the §2.5 potential and the soft-kNN surrogate, forward + gradient for the
embedding), the hard vote, and whole steps (kFGSM's objective; CE on decision-aligned soft-kNN logits, which
includes the vote), each as a ratio to the network alone, all measured in one run on the same inputs: the parts
take turns, and each part's fastest call counts.
Random weights and inputs: the cost does not depend on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig
from ..defenses.defense import KNNDefense
from ..defenses.knn import knn_votes
from ..defenses.potential import attack_loss
from ..devices import resolve_device
from ..paper.classifier import KNNClassifier
from ..paper.model import IdResNet
from .bench import _timed


def _grad_of(fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        z = leaf.detach().requires_grad_(True)
        torch.autograd.grad(fn(z).sum(), z)
    return step


@dataclass
class StepInputs:
    """A random FULL-shaped defense and one batch: what every part of an attack step is timed on."""
    net: IdResNet
    clf: KNNClassifier  # potential surrogate, aligned: kFGSM's and toolkits' view
    soft: KNNDefense  # the default suite's soft-kNN surrogate over the same bank
    x: torch.Tensor
    y: torch.Tensor
    emb: torch.Tensor


def random_step_inputs(cfg: ExperimentConfig, *, batch: int, device: torch.device,
                       n_bank: int = 50000) -> StepInputs:
    """Seeded random weights, bank, labels, images and targets at FULL's shapes (the cost does not depend on
    them), so that separate runs time the same work."""
    torch.manual_seed(0)
    net = IdResNet(cfg.model).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    bank = torch.randn(n_bank, cfg.model.w_p, device=device) * 3
    labels = torch.randint(0, cfg.model.n_classes, (n_bank,), device=device)
    clf = KNNClassifier(net, bank, labels, cfg)
    soft = clf.with_surrogate("softknn", m=50, temperature=1.0)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, cfg.model.n_classes, (batch,), device=device)
    with torch.no_grad():
        emb = net(x)
    return StepInputs(net, clf, soft, x, y, emb)


def step_breakdown(cfg: ExperimentConfig, *, batch: int, device: str = "auto", repeats: int = 2,
                   n_bank: int = 50000) -> dict[str, float]:
    """Seconds per image of each part of one attack step at ``batch`` images, and ratios to the network alone."""
    dev = resolve_device(device)
    inp = random_step_inputs(cfg, batch=batch, device=dev, n_bank=n_bank)
    net, clf, soft, x, y, emb = inp.net, inp.clf, inp.soft, inp.x, inp.y, inp.emb
    bank, labels = clf.bank, clf.bank_labels  # the classifier's own copy: every part on one bank, as in an attack
    g = torch.randn_like(emb)
    opts = dict(n_spaces=clf.n_spaces, lam=clf.lam, l0=clf.l0, n_classes=clf.n_classes)
    parts: dict[str, Callable[[], None]] = {
        "network": _grad_of(lambda z: (net(z) * g).sum(1), x),
        "knn_potential": _grad_of(lambda e: attack_loss(e, y, bank, labels, **opts), emb),
        "knn_softknn": _grad_of(lambda e: F.cross_entropy(soft.surrogate(e), y, reduction="none"), emb),
        "vote": lambda: knn_votes(emb, bank, labels, k=clf.k, n_spaces=clf.n_spaces, n_classes=clf.n_classes),
        "step_potential": _grad_of(lambda z: clf.attack_objective(z, y), x),
        "step_softknn_aligned": _grad_of(lambda z: F.cross_entropy(soft(z), y, reduction="none"), x),
    }
    out: dict[str, float] = {"batch": float(batch)}
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(repeats):  # the parts in turn, each its fastest call: a host's drift hits every part alike
        for name, fn in parts.items():
            best[name] = min(best[name], _timed(fn, 1, dev, warmup=best[name] == float("inf")))
    for name, seconds in best.items():
        out[f"{name}_ms_per_image"] = 1e3 * seconds / batch
    base = out["network_ms_per_image"]
    for name in parts:
        if name != "network":
            out[f"{name}_vs_network"] = out[f"{name}_ms_per_image"] / base
    return out


def breakdown_rows(results: list[dict[str, float]]) -> list[dict[str, object]]:
    """One row per part, ms per image and × network per batch size: the table ``bench --steps`` prints."""
    parts = [k[:-len("_ms_per_image")] for k in results[0] if k.endswith("_ms_per_image")]
    rows = []
    for part in parts:
        row: dict[str, object] = {"part": part}
        for r in results:
            b = int(r["batch"])
            row[f"ms/img @{b}"] = round(r[f"{part}_ms_per_image"], 3)
            row[f"× network @{b}"] = round(r.get(f"{part}_vs_network", 1.0), 2)
        rows.append(row)
    return rows
