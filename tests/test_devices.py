"""Training, the k-NN decision and one attack of every toolkit run on each device this machine has (CPU
always, CUDA when present), and agree with the CPU's decisions."""

import copy

import pytest
import torch

from robustbench_knn.attacks import get_attack
from robustbench_knn.evaluation.evaluate import check_adversarial, run_attacks
from robustbench_knn.paper.classifier import build_classifier
from robustbench_knn.paper.train import train_model

from .conftest import TINY_CFG

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ATTACKS = ["native:kfgsm", "native:feature", "ta:pgd", "art:pgd", "aa:apgd"]


@pytest.mark.parametrize("device", DEVICES)
def test_train_predict_and_attack_on_device(device, tiny_data, tmp_path):
    trained = train_model(TINY_CFG.replace(train={"epochs": 3}), tiny_data, device=device, cache_dir=tmp_path,
                          progress=False)
    clf = build_classifier(trained)
    assert clf.device.type == device
    sub = tiny_data.test.head(40)
    x, y = sub.floats(), sub.y
    pred = clf.predict(x)
    assert pred.device.type == device
    if device != "cpu":  # the same model moved to the CPU takes the same decisions (up to float ties)
        cpu_pred = copy.deepcopy(clf).to("cpu").predict(x)
        assert (pred.cpu() == cpu_pred).float().mean() >= 0.95
    specs = [get_attack(k) for k in ATTACKS]
    params = {"native:kfgsm": {"steps": 5}, "native:feature": {"steps": 5}}
    res = run_attacks(clf, x, y, specs, [8 / 255], progress=False, overrides=params)
    entry = res["per_eps"][0]
    for k in ATTACKS:
        assert entry["attacks"][k]["n_invalid"] == 0, k
    x_adv = specs[2].build(clf, 8 / 255)(x.to(device), y.to(device))
    assert x_adv.device.type == device and check_adversarial(x.to(device), x_adv, 8 / 255).ok
