"""Two defenses the paper's authors did not build, as ``KNNDefense``s: reference points beside the paper's model,
and proof that the harness evaluates defenses it was not written for. Use them as
``--model robustbench_knn.defenses.subjects:raw_pixel_knn`` or ``robustbench_knn.defenses.subjects:deep_knn_a``.

- ``raw_pixel_knn``: the classic non-parametric baseline, k-NN on raw pixels (ℓ2); k chosen on a validation
  split (the last 5,000 training images scored against the first 45,000), then the bank is all 50,000.
- ``deep_knn_a``: deep k-NN (Papernot & McDaniel's k = 75) on the penultimate features of Table 2's row A, the
  cross-entropy MLP (trained or loaded from the cache with the current recipe), ℓ2, bank = all 50,000.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from ..devices import resolve_device
from ..store import state_digest
from .defense import KNNDefense, embed_in_batches
from .knn import knn_votes_for_ks, vote_decision

K_CANDIDATES = (1, 3, 5, 10, 20, 50, 100, 200)
DEEP_KNN_K = 75


class Pixels(nn.Module):
    """The identity embedding: an image is its 3072 values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class Penultimate(nn.Module):
    """A trained network's penultimate features as an embedding."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


@torch.no_grad()
def choose_k(emb_fit: torch.Tensor, y_fit: torch.Tensor, emb_val: torch.Tensor, y_val: torch.Tensor,
             candidates: Sequence[int] = K_CANDIDATES) -> tuple[int, dict[int, float]]:
    """The candidate k with the best validation accuracy (ties: the smaller k), and every candidate's accuracy.
    One pass over the distances serves every candidate."""
    votes = knn_votes_for_ks(emb_val, emb_fit, y_fit, ks=candidates, n_spaces=1, n_classes=10)
    acc = {k: round(100 * (vote_decision(*votes[k]).cpu() == y_val.cpu()).float().mean().item(), 2)
           for k in candidates}
    return max(candidates, key=lambda k: (acc[k], -k)), acc


def _device(device: str) -> torch.device:
    return resolve_device(os.environ.get("ROBUSTBENCH_KNN_DEVICE", device))


def raw_pixel_knn(data_dir: str | None = None, k: int | None = None, device: str = "auto",
                  val_size: int = 5000) -> KNNDefense:
    """k-NN on raw pixels; ``k`` None: chosen on the validation split (``defense.k_choice`` holds the scores)."""
    from ..data import load_cifar10

    data = load_cifar10(data_dir)
    dev = _device(device)
    x, y = data.train.floats().flatten(1).to(dev), data.train.y.to(dev)
    scores: dict[int, float] = {}
    if k is None:
        n_fit = len(x) - val_size
        k, scores = choose_k(x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:])
    defense = KNNDefense(Pixels(), y, bank_embeddings=x, k=k, metric="l2", surrogate="softknn")
    defense.k_choice = {"chosen": k, "val_acc": scores, "val_size": val_size if scores else 0}
    return defense


def deep_knn_a(data_dir: str | None = None, k: int = DEEP_KNN_K, device: str = "auto",
               cache_dir: str | None = None, sets: Sequence[str] = ()) -> KNNDefense:
    """Deep k-NN on row A's penultimate features (row A, with ``--set``-style overrides, trained or loaded
    from the cache)."""
    from ..config import apply_overrides, get_model_config
    from ..data import load_cifar10
    from ..paper.classifier import build_classifier
    from ..paper.train import train_model

    data = load_cifar10(data_dir)
    dev = _device(device)
    cfg = apply_overrides(get_model_config("a"), sets)
    trained = train_model(cfg, data, device=dev, cache_dir=cache_dir, progress=False)
    emb = Penultimate(trained.net)
    bank = embed_in_batches(emb, trained.train_split.x, dev, batch_size=1024)
    defense = KNNDefense(emb, trained.train_split.y.to(bank.device), bank_embeddings=bank, k=k, metric="l2",
                         surrogate="softknn")
    # which network the features come from, and how good its own head is: a deep k-NN far below its backbone's
    # head is a sign of a wrong checkpoint (results and cards carry this)
    with torch.no_grad():
        logits = embed_in_batches(trained.net, data.test.x, dev, batch_size=1000)
    # named as the backbone's own results name it (the digest of its classifier), so cards and the leaderboard agree
    defense.backbone = {"model": cfg.name, "config_hash": cfg.config_hash(),
                        "weights_hash": state_digest(build_classifier(trained)), "dataset_sha256": data.sha256,
                        "head_clean_acc": round(100 * (logits.argmax(1).cpu() == data.test.y).float().mean().item(), 2)}
    return defense
