"""Classifiers as attackable ``nn.Module``s on [0, 1] images.

``predict(x)`` is the decision whose accuracy is reported (the hard k-NN vote, or argmax of real logits);
``forward(x)`` returns differentiable logits that toolkits attack (for k-NN: a surrogate). Network weights
are frozen: attacks need gradients with respect to the input only, and the training-bank embeddings are
computed once.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExperimentConfig
from .data import to_float
from .knn import knn_votes, vote_decision
from .losses import attack_loss
from .model import IdResNet
from .store import load_tensors, save_tensors
from .surrogate import make_surrogate
from .train import TrainedModel


@torch.no_grad()
def embed_images(net: nn.Module, x_uint8: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Network outputs for uint8 images, batched, on the network's device."""
    dev = next(net.parameters()).device
    outs = [net(to_float(x_uint8[i:i + batch_size].to(dev))) for i in range(0, len(x_uint8), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, device=dev)


class BaseClassifier(nn.Module):
    n_classes: int = 10

    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        raise NotImplementedError

    def attack_objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample loss the paper's attack (kFGSM) ascends."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device
        return torch.device("cpu")


def _freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class KNNClassifier(BaseClassifier):
    """Trained IdResNet + its training-set embedding bank; ``predict`` is the k-NN vote."""

    def __init__(self, net: IdResNet, bank: torch.Tensor, bank_labels: torch.Tensor, cfg: ExperimentConfig,
                 surrogate: str = "potential", **surrogate_options: float) -> None:
        super().__init__()
        self.net = _freeze(net)
        self.cfg = cfg
        self.k = cfg.k
        self.n_spaces = cfg.model.n_spaces
        self.n_classes = cfg.model.n_classes
        self.register_buffer("bank", bank.detach())
        self.register_buffer("bank_labels", bank_labels.detach())
        self.surrogate_name = surrogate
        self.surrogate = make_surrogate(surrogate, self, **surrogate_options)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.surrogate(self.embed(x))

    @torch.no_grad()
    def votes(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        embs = torch.cat([self.embed(x[i:i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)])
        return knn_votes(embs, self.bank, self.bank_labels, k=self.k, n_spaces=self.n_spaces,
                         n_classes=self.n_classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return vote_decision(*self.votes(x, batch_size))

    def attack_objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lc = self.cfg.loss
        return attack_loss(self.embed(x), y, self.bank, self.bank_labels, n_spaces=self.n_spaces, lam=lc.lam,
                           l0=lc.l0, n_classes=self.n_classes)


class LogitClassifier(BaseClassifier):
    """A network with a real 10-class head (Table 2 rows A, B): logits are the model's own."""

    def __init__(self, net: IdResNet) -> None:
        super().__init__()
        self.net = _freeze(net)
        self.n_classes = net.cfg.n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return torch.cat([self.net(x[i:i + batch_size].to(self.device)).argmax(1) for i in range(0, len(x), batch_size)])

    def attack_objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y, reduction="none")


def build_classifier(trained: TrainedModel, surrogate: str = "potential", *, cache_bank: bool = True,
                     **surrogate_options: float) -> BaseClassifier:
    """Wrap a trained model; the k-NN bank (embeddings of the training images) is cached beside the weights
    (``cache_bank=False`` for a network whose weights differ from the cached checkpoint)."""
    net = trained.net
    if trained.cfg.model.head == "logits":
        return LogitClassifier(net)
    dev = next(net.parameters()).device
    bank_file = trained.path / "bank.safetensors"
    if cache_bank and bank_file.is_file():
        bank = load_tensors(bank_file, dev)["bank"]
    else:
        bank = embed_images(net, trained.train_split.x)
        if cache_bank:
            save_tensors(bank_file, {"bank": bank})
    return KNNClassifier(net, bank, trained.train_split.y.to(dev), trained.cfg, surrogate, **surrogate_options)
