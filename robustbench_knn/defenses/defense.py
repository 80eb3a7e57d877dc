"""Any embedding + k-NN as an attackable defense: ``KNNDefense``, the interface every evaluation goes through.

A defense is an ``nn.Module`` on [0, 1] images: ``predict(x)`` is the hard k-NN vote (the decision whose
accuracy is reported), ``forward(x)`` differentiable surrogate logits that only guide attacks, ``embed(x)`` the
embedding the vote compares. The paper's IdResNet + k-NN (``paper.classifier.KNNClassifier``) is one of them.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UsageError
from ..data import to_float
from .knn import knn_votes, vote_decision
from .potential import attack_loss
from .surrogate import make_surrogate


class BaseClassifier(nn.Module):
    """What the evaluator needs: ``predict`` (the judged decision), ``forward`` (logits for the toolkits) and
    ``attack_objective`` (the per-sample loss kFGSM ascends)."""

    n_classes: int = 10

    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        raise NotImplementedError

    def attack_objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Every setting besides the weights and bank that changes an attack's outcome (the decision rule, the
        surrogate and its parameters, the loss constants): part of a cached result's key."""
        return {"class": type(self).__name__, "n_classes": self.n_classes}

    @property
    def device(self) -> torch.device:
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device
        return torch.device("cpu")


@torch.no_grad()
def embed_in_batches(embed: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device,
                     batch_size: int = 500) -> torch.Tensor:
    """``embed`` of ``x`` batch by batch on ``device`` (uint8 images scaled to [0, 1] on the way), concatenated:
    a 50k bank or a 10k test set at once would not fit in memory."""
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        outs.append(embed(to_float(xb) if xb.dtype == torch.uint8 else xb))
    return torch.cat(outs) if outs else torch.empty(0, device=device)


def freeze(net: nn.Module) -> nn.Module:
    """Evaluation mode, no weight gradients: attacks differentiate with respect to the input only."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def parse_metric(metric: str) -> tuple[int, bool]:
    """``l2`` | ``cosine`` | ``sum-l2:N`` → (number of equal sub-spaces, normalise embeddings first)."""
    if metric == "l2":
        return 1, False
    if metric == "cosine":
        return 1, True
    m = re.fullmatch(r"sum-l2:(\d+)", metric)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1)), False
    raise UsageError(f"metric must be 'l2', 'cosine' or 'sum-l2:N' (N >= 1), not {metric!r}")


def aligned_logits(logits: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is ``decision`` on every row and whose gradient is that of ``logits``: the decided
    class is lifted just above the best other one by a detached offset (zero where it already leads)."""
    z = logits
    rows = torch.arange(len(z), device=z.device)
    with torch.no_grad():
        top = z[rows, decision]
        others = z.clone()
        others[rows, decision] = float("-inf")
        gap = others.amax(1) - top
        # a margin above float32 rounding at the logits' scale
        lift = torch.where(gap >= 0, gap + 1e-3 * (1 + top.abs()), torch.zeros_like(gap))
        offset = torch.zeros_like(z)
        offset[rows, decision] = lift
    return z + offset


class KNNDefense(BaseClassifier):
    """k-NN over the embeddings of a bank of labelled images, with differentiable surrogate logits.

    ``embedding``: any ``nn.Module`` mapping [0, 1] images to vectors (frozen here). The bank is given as
    ``bank_images`` (embedded once, in batches) or as precomputed ``bank_embeddings``. ``metric``: ``"l2"``,
    ``"cosine"`` (Euclidean distance between unit-normalised embeddings: the same neighbours as cosine
    distance) or ``"sum-l2:N"`` (the paper's sum of Euclidean distances over N equal sub-spaces). ``surrogate``:
    ``"softknn"`` (default), or ``"potential"`` (the paper's, needs its loss constants ``lam`` and ``l0``).
    ``aligned`` (default True) makes ``forward`` decision-aligned: its argmax is the hard vote on every input
    while its gradient stays the surrogate's, so a toolkit never stops on a point the vote still classifies
    correctly (``aligned=False`` gives the raw surrogate logits, for studying the surrogate itself).
    """

    def __init__(self, embedding: nn.Module, bank_labels: torch.Tensor, *, bank_images: torch.Tensor | None = None,
                 bank_embeddings: torch.Tensor | None = None, k: int = 800, metric: str = "l2",
                 surrogate: str = "softknn", n_classes: int | None = None, lam: float | None = None,
                 l0: float | None = None, aligned: bool = True, batch_size: int = 1024,
                 **surrogate_options: float) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Module):
            raise UsageError(f"embedding must be an nn.Module, not {type(embedding).__name__}")
        if (bank_images is None) == (bank_embeddings is None):
            raise UsageError("give the bank as bank_images or as bank_embeddings (exactly one)")
        self.n_spaces, self.normalize = parse_metric(metric)
        self.metric = metric
        self.net = freeze(embedding)
        labels = torch.as_tensor(bank_labels).long().flatten()
        bank = (embed_in_batches(self.embed, bank_images, self.device, batch_size) if bank_images is not None
                else bank_embeddings.detach()).float()
        if bank.is_inference():  # made under torch.inference_mode: autograd could not save it in an attack
            bank = bank.clone()
        if bank.ndim != 2 or len(bank) != len(labels):
            raise UsageError(f"the bank has {len(bank)} embeddings of shape {tuple(bank.shape[1:])} for "
                             f"{len(labels)} labels; need one vector per label")
        if bank.shape[1] % self.n_spaces:
            raise UsageError(f"metric {metric!r} needs an embedding width divisible by {self.n_spaces}, "
                             f"not {bank.shape[1]}")
        if bank_embeddings is not None and self.normalize:
            bank = F.normalize(bank, dim=1)
        if not 1 <= k <= len(labels):
            raise UsageError(f"k must be between 1 and the bank size {len(labels)}, not {k}")
        self.k = int(k)
        self.n_classes = int(n_classes if n_classes is not None else int(labels.max()) + 1)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_labels", labels.to(bank.device))
        if surrogate == "potential" and (lam is None or l0 is None):
            raise UsageError("the potential surrogate needs the loss constants lam and l0 (or use softknn)")
        self.lam, self.l0 = lam, l0
        self.aligned = bool(aligned)
        self.surrogate_name = surrogate
        self.surrogate_options = dict(surrogate_options)
        self.surrogate = make_surrogate(surrogate, self, **surrogate_options)

    def with_surrogate(self, surrogate: str, **surrogate_options: float) -> "KNNDefense":
        """The same defense (shared network and bank) with other surrogate logits."""
        if surrogate == "potential" and (self.lam is None or self.l0 is None):
            raise UsageError("the potential surrogate needs the loss constants lam and l0 (or use softknn)")
        new = copy.copy(self)
        new.__dict__ = {**self.__dict__, "_modules": dict(self._modules), "_buffers": dict(self._buffers),
                        "_parameters": dict(self._parameters)}
        new.surrogate_name = surrogate
        new.surrogate_options = dict(surrogate_options)
        new.surrogate = make_surrogate(surrogate, new, **surrogate_options)
        return new

    def settings(self) -> dict[str, Any]:
        opts = {k: getattr(self.surrogate, k) for k in ("m", "temperature") if hasattr(self.surrogate, k)}
        return {**super().settings(), "k": self.k, "metric": self.metric, "surrogate": self.surrogate_name,
                "surrogate_options": opts, "lam": self.lam, "l0": self.l0, "aligned": self.aligned}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        e = self.net(x).flatten(1)
        return F.normalize(e, dim=1) if self.normalize else e

    def _votes_of(self, emb: torch.Tensor, dist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return knn_votes(emb, self.bank, self.bank_labels, k=self.k, n_spaces=self.n_spaces, n_classes=self.n_classes,
                         dist=dist)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embed(x)
        if not self.aligned:
            return self.surrogate(emb)
        dist = None  # the surrogate's own distances of emb, where it has them: the vote needs the same ones
        if hasattr(self.surrogate, "logits_and_distances"):
            logits, dist = self.surrogate.logits_and_distances(emb)
        else:
            logits = self.surrogate(emb)
        with torch.no_grad():
            decision = vote_decision(*self._votes_of(emb.detach(), dist))
        return aligned_logits(logits, decision)

    def surrogate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate's own logits, never aligned (for checking how well it agrees with the vote)."""
        return self.surrogate(self.embed(x))

    @torch.no_grad()
    def votes(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        return self._votes_of(embed_in_batches(self.embed, x, self.device, batch_size))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return vote_decision(*self.votes(x, batch_size))

    def attack_objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The paper's §2.5 attack loss where its constants are known, else CE on the surrogate logits."""
        if self.lam is not None and self.l0 is not None:
            return attack_loss(self.embed(x), y, self.bank, self.bank_labels, n_spaces=self.n_spaces, lam=self.lam,
                               l0=self.l0, n_classes=self.n_classes)
        return F.cross_entropy(self.surrogate(self.embed(x)), y, reduction="none")


class ModuleClassifier(BaseClassifier):
    """Any network with real class logits: ``predict`` is their argmax, kFGSM ascends cross-entropy."""

    def __init__(self, net: nn.Module, n_classes: int = 10) -> None:
        super().__init__()
        self.net = freeze(net)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return torch.cat([self.net(x[i:i + batch_size].to(self.device)).argmax(1) for i in range(0, len(x), batch_size)])

    def attack_objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y, reduction="none")


def as_classifier(model: Any) -> BaseClassifier:
    """A defense as the evaluator sees it: a KNNDefense / BaseClassifier as is, any other ``nn.Module`` as a
    logit classifier (decision = argmax)."""
    if isinstance(model, BaseClassifier):
        return model
    if isinstance(model, nn.Module):
        return ModuleClassifier(model)
    raise UsageError(f"model must be a KNNDefense, an nn.Module classifier or a model name, not {type(model).__name__}")
