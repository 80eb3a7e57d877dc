"""Smoke test on the real CIFAR-10 (JPEG q75) from ../shared: a small subset, one short training run."""

import torch

from robustbench_knn.attacks import get_attack
from robustbench_knn.data import load_cifar10
from robustbench_knn.evaluation.evaluate import run_attacks
from robustbench_knn.paper.classifier import build_classifier
from robustbench_knn.paper.train import train_model

from .conftest import TINY_CFG


def test_real_cifar10_subset_trains_and_attacks(real_data_dir, tmp_path):
    data = load_cifar10(real_data_dir, download=False)
    assert len(data.train) == 50000 and len(data.test) == 10000
    assert data.test.y[:7].tolist() == [3, 8, 8, 0, 6, 6, 1]  # CIFAR-10's original test order
    cfg = TINY_CFG.replace(name="smoke", model={"w_r": 256}, train={"n_train": 2000, "epochs": 3, "batch_size": 500},
                           k=25)
    trained = train_model(cfg, data, device="cpu", cache_dir=tmp_path, progress=False)
    clf = build_classifier(trained)
    test = data.test.head(200)
    acc = (clf.predict(test.floats()) == test.y).float().mean().item()
    assert acc > 0.15  # well above chance (10%) after a few hundred noisy steps
    res = run_attacks(clf, test.floats()[:50], test.y[:50], [get_attack("kfgsm")], [8 / 255], progress=False)
    r = res["per_eps"][0]
    # an undefended few-epoch model: kFGSM at 8/255 breaks points, validly
    assert r["attacks"]["native:kfgsm"]["n_invalid"] == 0 and r["attacks"]["native:kfgsm"]["robust_acc"] < r["clean_acc"]
    assert torch.isfinite(clf.bank).all()
