"""Differentiable surrogate logits of the k-NN vote, selectable by name. They only guide attacks.

- ``potential`` (default): logit_c = −(the paper's §2.5 attack loss if the label were c). Follows the
  paper literally, including e^{−λD} underflowing to 0 in float32 for D ≳ 200 (counted by the evaluator).
- ``softknn``: logit_c = logsumexp over the m nearest training embeddings of class c of (−D / T), computed
  in log-space (the surrogate of the adaptive k-NN attack literature).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from ..config import UsageError
from ..distances import pairwise_distance
from .potential import class_potentials


class DefenseBank(Protocol):
    """What a surrogate reads from its defense (``defense.KNNDefense`` has it; named here, not imported, so the two
    modules do not import each other)."""

    bank: torch.Tensor
    bank_labels: torch.Tensor
    n_spaces: int
    n_classes: int
    lam: float | None
    l0: float | None


class PotentialSurrogate(nn.Module):
    def __init__(self, clf: "DefenseBank") -> None:
        super().__init__()
        self._clf = [clf]  # a list, so the classifier is not registered as a submodule (no cycle)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        clf = self._clf[0]
        return -class_potentials(emb, clf.bank, clf.bank_labels, n_spaces=clf.n_spaces, lam=clf.lam, l0=clf.l0,
                                 n_classes=clf.n_classes)


class SoftKNNSurrogate(nn.Module):
    def __init__(self, clf: "DefenseBank", m: int = 50, temperature: float = 1.0) -> None:
        super().__init__()
        if m < 1 or temperature <= 0:
            raise UsageError("softknn needs m >= 1 and temperature > 0")
        self._clf = [clf]
        self.m = int(m)
        self.temperature = float(temperature)
        # indices of each class's training points, so the per-class top-m never mixes classes
        self._class_idx = [torch.nonzero(clf.bank_labels == c).squeeze(1) for c in range(clf.n_classes)]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        clf = self._clf[0]
        dist = pairwise_distance(emb, clf.bank, clf.n_spaces)
        cols = []
        for idx in self._class_idx:
            m = min(self.m, len(idx))
            if m == 0:  # a class absent from the bank can never be voted for
                cols.append(torch.full((len(emb),), float("-inf"), device=emb.device, dtype=emb.dtype))
                continue
            near = torch.topk(dist[:, idx.to(dist.device)], m, dim=1, largest=False).values
            cols.append(torch.logsumexp(-near / self.temperature, dim=1))
        return torch.stack(cols, 1)


SURROGATES: dict[str, Callable[..., nn.Module]] = {"potential": PotentialSurrogate, "softknn": SoftKNNSurrogate}


def make_surrogate(name: str, clf: "DefenseBank", **options: float) -> nn.Module:
    try:
        return SURROGATES[name](clf, **options)
    except KeyError:
        raise UsageError(f"unknown surrogate {name!r}; choose from {', '.join(SURROGATES)}") from None
