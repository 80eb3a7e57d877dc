"""Shared pieces of the adaptive attacks: the random start, the HARD k-NN vote state an attack keeps its best
iterate by, and distances from each point to its own set of bank points.

Adaptive attacks judge their iterates by the real k-NN decision (not by the surrogate they follow), so a
successful iterate is never thrown away because a surrogate disagreed with the vote.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..defenses.defense import embed_in_batches
from ..defenses.knn import DEFAULT_CHUNK, knn_votes, vote_decision, vote_margin
from ..distances import pairwise_distance, split_spaces
from ..norms import random_start as _random_start


def random_start(x0: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """Uniform in the ball (then the box), from the global generator so runs are seeded by the caller."""
    return _random_start(x0, eps, norm)


@dataclass
class VoteState:
    """Per sample: ``broken`` (the hard vote is not ``y``), ``margin`` (votes for ``y`` minus the best other
    class) and ``gap`` (how far the next vote swap is, see :func:`swap_gap`; 0 when not computed)."""

    broken: torch.Tensor
    margin: torch.Tensor
    gap: torch.Tensor

    def __getitem__(self, idx: torch.Tensor) -> "VoteState":
        return VoteState(self.broken[idx], self.margin[idx], self.gap[idx])

    def improved_by(self, new: "VoteState") -> torch.Tensor:
        """Where ``new`` is better for the attacker: broken first, then lower margin, then smaller gap."""
        if new.broken.shape != self.broken.shape:
            raise ValueError("states of different sizes")
        key_new, key_old = new.margin - new.broken.long() * 10**9, self.margin - self.broken.long() * 10**9
        return (key_new < key_old) | ((key_new == key_old) & (new.gap < self.gap))

    def update(self, idx: torch.Tensor, new: "VoteState", mask: torch.Tensor) -> None:
        """Overwrite rows ``idx[mask]`` with the rows ``mask`` of ``new``."""
        rows = idx[mask]
        self.broken[rows], self.margin[rows], self.gap[rows] = new.broken[mask], new.margin[mask], new.gap[mask]


@torch.no_grad()
def swap_gap(emb: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, y: torch.Tensor, k: int,
             n_spaces: int, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Distance by which the next vote swap is missed: (nearest other-class point outside the k-ball − k-th
    neighbour distance) + (k-th neighbour distance − farthest true-class point inside the ball).

    Gives a random search a signal while the integer vote margin is flat (e.g. all k votes for ``y``);
    a missing term (no such point) counts 0.
    """
    out = []
    for s in range(0, len(emb), chunk):
        dist = pairwise_distance(emb[s:s + chunk], bank, n_spaces)
        r = torch.topk(dist, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
        same = bank_labels[None, :] == y[s:s + chunk, None]
        outside = torch.where(~same & (dist > r), dist, torch.full_like(dist, float("inf"))).amin(1, keepdim=True)
        inside = torch.where(same & (dist <= r), dist, torch.full_like(dist, -float("inf"))).amax(1, keepdim=True)
        term_out = torch.where(torch.isfinite(outside), outside - r, torch.zeros_like(r))
        term_in = torch.where(torch.isfinite(inside), r - inside, torch.zeros_like(r))
        out.append((term_out + term_in).squeeze(1))
    return torch.cat(out) if out else emb.new_zeros(0)


@torch.no_grad()
def vote_state(clf: torch.nn.Module, emb: torch.Tensor, y: torch.Tensor, *, with_gap: bool = False) -> VoteState:
    """The hard k-NN verdict on embeddings ``emb`` of a :class:`~robustbench_knn.paper.classifier.KNNClassifier`."""
    votes, dsum = knn_votes(emb, clf.bank, clf.bank_labels, k=clf.k, n_spaces=clf.n_spaces, n_classes=clf.n_classes)
    gap = (swap_gap(emb, clf.bank, clf.bank_labels, y, clf.k, clf.n_spaces) if with_gap
           else torch.zeros(len(emb), device=emb.device))
    return VoteState(vote_decision(votes, dsum) != y, vote_margin(votes, y), gap)


def set_distance(emb: torch.Tensor, points: torch.Tensor, n_spaces: int) -> torch.Tensor:
    """Distance from each row of ``emb`` (N, W) to each of its own points (N, M, W) → (N, M), differentiable.

    The per-point counterpart of :func:`~robustbench_knn.distances.pairwise_distance` (sum over sub-spaces of L2);
    the tiny constant keeps the gradient finite where a point coincides with the embedding.
    """
    n, m, w = points.shape
    diff = split_spaces((points - emb[:, None, :]).reshape(n * m, w), n_spaces)  # (S, N·M, d)
    return (diff.pow(2).sum(-1) + 1e-12).sqrt().sum(0).reshape(n, m)


def require_knn(model: torch.nn.Module, attack: str) -> None:
    """Adaptive k-NN attacks read the bank and the vote; a logit model has neither."""
    if not all(hasattr(model, a) for a in ("bank", "bank_labels", "embed", "k")):
        from ..config import UsageError

        raise UsageError(f"attack {attack} needs a k-NN classifier (a model with an embedding bank)")


def embed_batched(clf: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return embed_in_batches(clf.embed, x, x.device, batch_size)


class BestIterate:
    """Per sample, the iterate with the best HARD vote state seen so far (starting from ``x_init``, default the
    clean point), so an attack returns a vote-flipping iterate whenever it met one."""

    def __init__(self, clf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, with_gap: bool = False,
                 x_init: torch.Tensor | None = None) -> None:
        self.clf, self.y, self.with_gap = clf, y, with_gap
        self.x_best = (x if x_init is None else x_init).detach().clone()
        self.state = vote_state(clf, embed_batched(clf, self.x_best), y, with_gap=with_gap)

    def observe(self, x: torch.Tensor, emb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Judge iterates ``x`` (embeddings ``emb``) of samples ``idx``; keep improvements; return which are broken."""
        new = vote_state(self.clf, emb.detach(), self.y[idx], with_gap=self.with_gap)
        better = self.state[idx].improved_by(new)
        self.x_best[idx[better]] = x.detach()[better]
        self.state.update(idx, new, better)
        return self.state.broken[idx]

    def active(self) -> torch.Tensor:
        """Indices of the samples whose vote has not flipped yet."""
        return torch.nonzero(~self.state.broken).squeeze(1)


@torch.no_grad()
def kth_distance(emb: torch.Tensor, bank: torch.Tensor, k: int, n_spaces: int, chunk: int = DEFAULT_CHUNK
                 ) -> torch.Tensor:
    """Distance to the k-th nearest bank point, (N,)."""
    return torch.cat([torch.topk(pairwise_distance(emb[s:s + chunk], bank, n_spaces), k, dim=1, largest=False,
                                 sorted=False).values.amax(1) for s in range(0, len(emb), chunk)])
