"""Classifiers as attackable ``nn.Module``s on [0, 1] images.

``predict(x)`` is the decision whose accuracy is reported (the hard k-NN vote, or argmax of real logits);
``forward(x)`` returns differentiable logits that toolkits attack (for k-NN: a surrogate). Network weights
are frozen: attacks need gradients with respect to the input only, and the training-bank embeddings are
computed once.
"""

from __future__ import annotations

import torch

from ..config import ExperimentConfig
from ..defenses.defense import BaseClassifier, KNNDefense, ModuleClassifier, embed_in_batches
from ..store import load_tensors, save_tensors
from .model import IdResNet
from .train import TrainedModel

__all__ = ["BaseClassifier", "KNNClassifier", "LogitClassifier", "build_classifier"]


class KNNClassifier(KNNDefense):
    """A trained IdResNet + its training-set embedding bank: the paper's defense as a ``KNNDefense`` (metric
    ``sum-l2:N_S``, the paper's loss constants, the ``potential`` surrogate by default)."""

    def __init__(self, net: IdResNet, bank: torch.Tensor, bank_labels: torch.Tensor, cfg: ExperimentConfig,
                 surrogate: str = "potential", *, aligned: bool = True, **surrogate_options: float) -> None:
        super().__init__(net, bank_labels, bank_embeddings=bank, k=cfg.k, metric=f"sum-l2:{cfg.model.n_spaces}",
                         surrogate=surrogate, n_classes=cfg.model.n_classes, lam=cfg.loss.lam, l0=cfg.loss.l0,
                         aligned=aligned, **surrogate_options)
        self.cfg = cfg


class LogitClassifier(ModuleClassifier):
    """A network with a real 10-class head (Table 2 rows A, B): logits are the model's own."""

    def __init__(self, net: IdResNet) -> None:
        super().__init__(net, net.cfg.n_classes)


def build_classifier(trained: TrainedModel, surrogate: str = "potential", *, cache_bank: bool = True,
                     aligned: bool = True, **surrogate_options: float) -> BaseClassifier:
    """Wrap a trained model; the k-NN bank (embeddings of the training images) is cached beside the weights
    (``cache_bank=False`` for a network whose weights differ from the cached checkpoint). ``aligned``: see
    ``KNNDefense``."""
    net = trained.net
    if trained.cfg.model.head == "logits":
        return LogitClassifier(net)
    dev = next(net.parameters()).device
    bank_file = trained.path / "bank.safetensors"
    if cache_bank and bank_file.is_file():
        bank = load_tensors(bank_file, dev)["bank"]
    else:
        bank = embed_in_batches(net, trained.train_split.x, dev, batch_size=1024)
        if cache_bank:
            save_tensors(bank_file, {"bank": bank})
    return KNNClassifier(net, bank, trained.train_split.y.to(dev), trained.cfg, surrogate, aligned=aligned,
                         **surrogate_options)
