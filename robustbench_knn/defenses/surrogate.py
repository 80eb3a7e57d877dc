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
from ..distances import BankBlocks, grouped_bank, selected_distance_grad
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
    block without a gradient (:class:`BankBlocks`) to the bank in class order (:func:`grouped_bank`), so that each
    class's top-m reads a contiguous range of columns (gathering each class's columns out of bank-order distances
    cost as much as the top-m itself); the backward sends ∂L/∂D (non-zero on the selected points only:
    −G_c·softmax/T) through those points alone (:func:`selected_distance_grad`). With ``want_dist`` it also returns
    the N × M distances in bank order, which the defense's hard vote of the same embedding reuses (else an empty
    tensor)."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, n_spaces: int, n_classes: int,
                m: int, temperature: float, want_dist: bool) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        terms, segments, order = grouped_bank(bank, labels, n_spaces, n_classes)
        blocks = BankBlocks(emb, bank, n_spaces, terms=terms)
        by_class = emb.new_empty(len(emb), len(bank))
        for s, t in blocks.ranges():
            by_class[:, s:t] = blocks.distances(s, t)[1]
        # a class absent from the bank can never be voted for
        cols = [emb.new_full((len(emb),), float("-inf")) for _ in range(n_classes)]
        sel, weights = [], []
        for c, s, t in segments:
            near, pos = torch.topk(by_class[:, s:t], min(m, t - s), dim=1, largest=False, sorted=False)
            z = -near / temperature
            cols[c] = torch.logsumexp(z, dim=1)
            sel.append(order[pos + s])  # bank rows: the backward runs over the bank itself
            weights.append(torch.softmax(z, dim=1))
        if want_dist:
            dist = torch.empty_like(by_class)
            dist[:, order] = by_class
        else:
            dist = emb.new_empty(0)
        ctx.save_for_backward(emb)
        ctx.rest = (bank, sel, weights, n_spaces, temperature, [c for c, _, _ in segments])
        ctx.mark_non_differentiable(dist)
        return torch.stack(cols, 1), dist

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _grad_dist: torch.Tensor | None):  # type: ignore[override]
        (emb,), (bank, sel, weights, n_spaces, temperature, present) = ctx.saved_tensors, ctx.rest
        grad_sel = torch.cat([w * (-grad[:, c:c + 1] / temperature) for c, w in zip(present, weights)], 1)
        return (selected_distance_grad(emb, bank, torch.cat(sel, 1), grad_sel, n_spaces),
                None, None, None, None, None, None, None)


class SoftKNNSurrogate(nn.Module):
    def __init__(self, clf: "DefenseBank", m: int = 50, temperature: float = 1.0) -> None:
        super().__init__()
        if m < 1 or temperature <= 0:
            raise UsageError("softknn needs m >= 1 and temperature > 0")
        self._clf = [clf]
        self.m = int(m)
        self.temperature = float(temperature)

    def _logits(self, emb: torch.Tensor, want_dist: bool) -> tuple[torch.Tensor, torch.Tensor]:
        clf = self._clf[0]
        if torch.is_grad_enabled() and clf.bank.requires_grad:
            raise UsageError("the soft-kNN surrogate needs a fixed bank (no gradient for it)")
        return _SoftKNNLogits.apply(emb, clf.bank, clf.bank_labels, clf.n_spaces, clf.n_classes, self.m,
                                    self.temperature, want_dist)

    def logits_and_distances(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the N × M distances (bank order) they came from (no gradient), for a vote of ``emb``."""
        return self._logits(emb, True)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self._logits(emb, False)[0]


SURROGATES: dict[str, Callable[..., nn.Module]] = {"potential": PotentialSurrogate, "softknn": SoftKNNSurrogate}


def make_surrogate(name: str, clf: "DefenseBank", **options: float) -> nn.Module:
    try:
        return SURROGATES[name](clf, **options)
    except KeyError:
        raise UsageError(f"unknown surrogate {name!r}; choose from {', '.join(SURROGATES)}") from None
