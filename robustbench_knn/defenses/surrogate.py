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
from ..distances import BankBlocks, selected_distance_grad
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


class _SoftKNNLogits(torch.autograd.Function):
    """logit_c = logsumexp over the m nearest bank points of class c of (−D/T), from distances computed block by
    block without a gradient (:class:`BankBlocks`); the backward sends ∂L/∂D (non-zero on the selected points
    only: −G_c·softmax/T) through those points alone (:func:`selected_distance_grad`). Also returns the N × M
    distances, which the defense's hard vote of the same embedding reuses."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, bank: torch.Tensor, class_idx: list[torch.Tensor], n_spaces: int, m: int,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        blocks = BankBlocks(emb, bank, n_spaces)
        dist = emb.new_empty(len(emb), len(bank))
        for s, t in blocks.ranges():
            dist[:, s:t] = blocks.distances(s, t)[1]
        cols, sel, weights = [], [], []
        for idx in class_idx:
            mc = min(m, len(idx))
            if mc == 0:  # a class absent from the bank can never be voted for
                cols.append(emb.new_full((len(emb),), float("-inf")))
                continue
            near, pos = torch.topk(dist[:, idx], mc, dim=1, largest=False, sorted=False)
            z = -near / temperature
            cols.append(torch.logsumexp(z, dim=1))
            sel.append(idx[pos])
            weights.append(torch.softmax(z, dim=1))
        ctx.save_for_backward(emb)
        ctx.rest = (bank, sel, weights, n_spaces, temperature, [len(i) > 0 for i in class_idx])
        ctx.mark_non_differentiable(dist)
        return torch.stack(cols, 1), dist

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _grad_dist: torch.Tensor | None):  # type: ignore[override]
        (emb,), (bank, sel, weights, n_spaces, temperature, present) = ctx.saved_tensors, ctx.rest
        cls = [c for c, p in enumerate(present) if p]
        grad_sel = torch.cat([w * (-grad[:, c:c + 1] / temperature) for c, w in zip(cls, weights)], 1)
        return selected_distance_grad(emb, bank, torch.cat(sel, 1), grad_sel, n_spaces), None, None, None, None, None


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

    def logits_and_distances(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the N × M distances they came from (no gradient), for a vote of the same ``emb``."""
        clf = self._clf[0]
        if torch.is_grad_enabled() and clf.bank.requires_grad:
            raise UsageError("the soft-kNN surrogate needs a fixed bank (no gradient for it)")
        idx = [i.to(emb.device) for i in self._class_idx]
        return _SoftKNNLogits.apply(emb, clf.bank, idx, clf.n_spaces, self.m, self.temperature)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.logits_and_distances(emb)[0]


SURROGATES: dict[str, Callable[..., nn.Module]] = {"potential": PotentialSurrogate, "softknn": SoftKNNSurrogate}


def make_surrogate(name: str, clf: "DefenseBank", **options: float) -> nn.Module:
    try:
        return SURROGATES[name](clf, **options)
    except KeyError:
        raise UsageError(f"unknown surrogate {name!r}; choose from {', '.join(SURROGATES)}") from None
