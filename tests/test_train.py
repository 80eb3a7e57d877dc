import pytest
import torch

from robustbench_knn.paper import train as train_mod
from robustbench_knn.paper.train import lr_factor, train_model
from robustbench_knn.store import load_tensors

from .conftest import TINY_CFG


def test_cached_model_is_reused(tiny_trained, tiny_data, cache_dir):
    again = train_model(TINY_CFG, tiny_data, device="cpu", cache_dir=cache_dir, progress=False)
    assert again.path == tiny_trained.path
    for (k, a), b in zip(tiny_trained.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tiny_trained.path / "weights.safetensors").is_file() and (tiny_trained.path / "config.json").is_file()


def test_same_config_under_another_name_is_not_retrained(tiny_trained, tiny_data, cache_dir):
    other = train_model(TINY_CFG.replace(name="renamed"), tiny_data, device="cpu", cache_dir=cache_dir, progress=False)
    assert other.path == tiny_trained.path and not list((cache_dir / "models").glob("renamed-*"))
    assert torch.equal(other.net.ots.weight, tiny_trained.net.ots.weight)


def test_interrupted_training_resumes_to_the_same_weights(tiny_data, tmp_path, monkeypatch):
    cfg = TINY_CFG.replace(name="resume", train={"epochs": 3})
    reference = train_model(cfg, tiny_data, device="cpu", cache_dir=tmp_path / "a", progress=False)

    real = train_mod.objective
    calls = {"n": 0}
    steps_per_epoch = 4  # 400 images / batch 100

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch * 2 + 1:  # killed during epoch 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "objective", dying)
    with pytest.raises(KeyboardInterrupt):
        train_model(cfg, tiny_data, device="cpu", cache_dir=tmp_path / "b", progress=False)
    path_b = tmp_path / "b" / "models" / reference.path.name
    assert (path_b / "partial.safetensors").is_file() and not (path_b / "weights.safetensors").exists()
    monkeypatch.setattr(train_mod, "objective", real)
    resumed = train_model(cfg, tiny_data, device="cpu", cache_dir=tmp_path / "b", progress=False)
    assert [e["epoch"] for e in resumed.log["epochs"]] == [1, 2, 3]
    a, b = load_tensors(reference.path / "weights.safetensors"), load_tensors(path_b / "weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not (path_b / "partial.safetensors").exists()


def test_lr_schedules():
    assert lr_factor(0, 100, "constant", 0) == 1.0
    assert lr_factor(0, 100, "cosine", 0) == pytest.approx(1.0)
    assert lr_factor(99, 100, "cosine", 0) < 0.01
    assert lr_factor(20, 100, "onecycle", 0.2) == pytest.approx(1.0)
    assert lr_factor(10, 100, "onecycle", 0.2) == pytest.approx(0.5)
    assert lr_factor(60, 100, "onecycle", 0.2) == pytest.approx(0.5)


def test_untrained_keeps_initialisation(tiny_data, tmp_path):
    cfg = TINY_CFG.replace(name="untrained", train={"trained": False})
    m = train_model(cfg, tiny_data, device="cpu", cache_dir=tmp_path, progress=False)
    assert m.log["epochs"] == []
    assert all((layer.branch[-1].weight == 0).all() for layer in [*m.net.dec, m.net.cl])
