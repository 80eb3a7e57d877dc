"""Shared fixtures: tiny synthetic CIFAR-shaped data in the official layout and a tiny trained model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from robustbench_knn.config import ExperimentConfig, LossConfig, ModelConfig, TrainConfig
from robustbench_knn.data import BATCH_DIR, Split, load_cifar10, write_batches

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# Small enough to train in seconds on a CPU; the loss constants are the paper's. The recipe is pinned (per-position
# normalisation, regulariser ÷B) so the attack tests stay calibrated when FULL's default recipe moves; the
# per-image normalisation is tested in test_model.py and test_attacks.py, and the gate tests use FULL's defaults.
TINY_CFG = ExperimentConfig(
    name="tiny",
    model=ModelConfig(w_r=32, n_spaces=2, d=3, normalization="position"),
    loss=LossConfig(reg_reduction="mean"),
    train=TrainConfig(epochs=12, batch_size=100, lr=1e-3),
    k=5,
)
TINY_SETS = ["model.w_r=32", "model.d=3", "model.normalization=position", "loss.reg_reduction=mean",
             "train.epochs=12", "train.batch_size=100", "train.lr=1e-3", "k=5"]


def make_tiny_split(n_per_class: int, protos: torch.Tensor, gen: torch.Generator) -> Split:
    y = torch.arange(10).repeat_interleave(n_per_class)
    y = y[torch.randperm(len(y), generator=gen)]
    x = (protos[y] + 0.2 * torch.randn(len(y), 3, 32, 32, generator=gen)).clamp(0, 1)
    return Split((x * 255).round().to(torch.uint8), y)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 well-separated classes (a random binary prototype image each + pixel noise), 400 train / 100 test."""
    gen = torch.Generator().manual_seed(0)
    protos = (torch.rand(10, 3, 32, 32, generator=gen) > 0.5).float()
    root = tmp_path_factory.mktemp("tinydata")
    write_batches(root, make_tiny_split(40, protos, gen), make_tiny_split(10, protos, gen))
    return root


@pytest.fixture(scope="session")
def hard_data(tmp_path_factory: pytest.TempPathFactory):
    """Low-contrast classes (prototypes 0.45/0.55): an undefended MLP is breakable at 8/255."""
    gen = torch.Generator().manual_seed(0)
    protos = 0.45 + 0.1 * (torch.rand(10, 3, 32, 32, generator=gen) > 0.5).float()
    root = tmp_path_factory.mktemp("hard")
    write_batches(root, make_tiny_split(40, protos, gen), make_tiny_split(10, protos, gen))
    return load_cifar10(root, download=False)


@pytest.fixture(scope="session")
def tiny_data(tiny_data_dir: Path):
    return load_cifar10(tiny_data_dir, download=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_trained(tiny_data, cache_dir):
    from robustbench_knn.paper.train import train_model

    return train_model(TINY_CFG, tiny_data, device="cpu", cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_clf(tiny_trained):
    from robustbench_knn.paper.classifier import build_classifier

    return build_classifier(tiny_trained)


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 (JPEG q75): $ROBUSTBENCH_KNN_DATA if it holds the batches, else decoded from ../shared.

    Never skipped: CI has ../shared, and a missing data set must fail loudly.
    """
    env = os.environ.get("ROBUSTBENCH_KNN_DATA")
    if env and (Path(env) / BATCH_DIR / "test_batch").is_file():
        return Path(env)
    script = SHARED / "make_cifar10.py"
    if not script.is_file():
        pytest.fail(f"real-data tests need {script} (../shared beside the checkout) or $ROBUSTBENCH_KNN_DATA")
    root = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(script), str(root)], check=True, capture_output=True)
    return root


@pytest.fixture
def one_thread():
    """Tensors in the attack tests are tiny and the loops long: one thread avoids thread-pool overhead."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Scaled(torch.nn.Module):
    """Embeddings × 10⁴: with the bank scaled too, the same k-NN decisions, but the paper's potential e^{−λD}
    underflows to a zero gradient (the planted gradient-masking case)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z) * 1e4


@pytest.fixture(scope="session")
def masked_clf(tiny_clf):
    from robustbench_knn.paper.classifier import KNNClassifier

    return KNNClassifier(Scaled(tiny_clf.net), tiny_clf.bank * 1e4, tiny_clf.bank_labels, tiny_clf.cfg)


# a user's defense module (the `--model package.module:function` form): make() a k-NN defense, plain() a logit
# classifier, not_a_model() neither; USER_DATA names the tiny data folder
USER_MODULE = textwrap.dedent('''
    import os
    import torch
    from torch import nn
    from robustbench_knn import KNNDefense
    from robustbench_knn.data import load_cifar10

    def make():
        torch.manual_seed(0)
        emb = nn.Sequential(nn.Flatten(), nn.Linear(3072, 8))
        train = load_cifar10(os.environ["USER_DATA"], download=False).train
        return KNNDefense(emb, train.y, bank_images=train.x, k=5)

    def plain():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))

    def not_a_model():
        return 42
''')
