"""A defense with textbook gradient masking, for checking that the harness does not call it robust.

The embedding quantises raw pixels to 8 levels (``round(7x) / 7``): its gradient is zero almost everywhere, so
every gradient-based attack is blind, while the decision (1-NN over the first 5,000 training images, ℓ2) is a
raw-pixel nearest neighbour, among the least robust classifiers there are. A trustworthy evaluation reports it
as not robust (or at least unreliable).

    robustbench-knn evaluate --model examples.masked_defense:build --n-test 40 --eps 8/255
    robustbench-knn audit --model examples.masked_defense:build --n-test 40 --eps 8/255 --active-test 20
"""

from __future__ import annotations

import torch
from torch import nn

from robustbench_knn import KNNDefense
from robustbench_knn.data import load_cifar10

LEVELS = 8
BANK_SIZE = 5000


class Quantised(nn.Module):
    """Raw pixels rounded to ``LEVELS`` levels, flattened: zero gradient almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.round(x * (LEVELS - 1)) / (LEVELS - 1)).flatten(1)


def build(data_dir: str | None = None) -> KNNDefense:
    train = load_cifar10(data_dir).train
    return KNNDefense(Quantised(), train.y[:BANK_SIZE], bank_images=train.x[:BANK_SIZE], k=1, metric="l2")
