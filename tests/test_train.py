import shutil

import pytest
import torch

from robustbench_knn.config import UsageError
from robustbench_knn.data import load_cifar10, write_batches
from robustbench_knn.paper import train as train_mod
from robustbench_knn.paper.train import lr_factor, train_model
from robustbench_knn.store import load_tensors, model_dir

from .conftest import TINY_CFG, make_tiny_split


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Another tiny data set (other prototypes and noise, so another sha256) of the same shape as ``tiny_data``."""
    gen = torch.Generator().manual_seed(1)
    protos = (torch.rand(10, 3, 32, 32, generator=gen) > 0.5).float()
    root = tmp_path_factory.mktemp("otherdata")
    write_batches(root, make_tiny_split(40, protos, gen), make_tiny_split(10, protos, gen))
    return load_cifar10(root, download=False)


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


def test_cached_model_is_only_served_for_the_data_it_was_trained_on(tiny_data, other_data, tmp_path, monkeypatch):
    cfg = TINY_CFG.replace(name="swap", train={"epochs": 1})
    assert other_data.sha256[:8] != tiny_data.sha256[:8]
    a = train_model(cfg, tiny_data, device="cpu", cache_dir=tmp_path, progress=False)
    b = train_model(cfg, other_data, device="cpu", cache_dir=tmp_path, progress=False)  # same config, other data
    assert not b.from_cache and b.path != a.path and other_data.sha256[:8] in b.path.name
    assert b.log["dataset_sha256"] == other_data.sha256 and a.log["dataset_sha256"] == tiny_data.sha256
    assert not torch.equal(a.net.ots.weight, b.net.ots.weight)
    # both stay cached, each found (under another name too) for its own data only
    monkeypatch.setattr(train_mod, "objective", lambda *args, **kw: pytest.fail("retrained a cached model"))
    for data, want in ((tiny_data, a), (other_data, b)):
        again = train_model(cfg.replace(name="swap-renamed"), data, device="cpu", cache_dir=tmp_path, progress=False)
        assert again.from_cache and again.path == want.path and again.log["dataset_sha256"] == data.sha256
        assert torch.equal(again.net.ots.weight, want.net.ots.weight)


@pytest.mark.parametrize("state", ["finished", "partial"])
def test_model_of_other_data_in_the_folder_is_refused(state, tiny_data, other_data, tmp_path, monkeypatch):
    """The check on load: a model (or an interrupted run's checkpoint) whose train log records other data is
    never served nor resumed, even from the folder keyed by this data (copied there, a prefix collision)."""
    cfg = TINY_CFG.replace(name="planted", train={"epochs": 2})
    if state == "partial":  # killed in epoch 2: partial.safetensors holds epoch 1 trained on tiny_data
        real, calls = train_mod.objective, {"n": 0}

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4 + 1:  # 400 images / batch 100: the first step of epoch 2
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(train_mod, "objective", dying)
        with pytest.raises(KeyboardInterrupt):
            train_model(cfg, tiny_data, device="cpu", cache_dir=tmp_path, progress=False)
        monkeypatch.setattr(train_mod, "objective", real)
    else:
        train_model(cfg, tiny_data, device="cpu", cache_dir=tmp_path, progress=False)
    own = model_dir(cfg, tmp_path, tiny_data.sha256)
    assert (own / ("partial.safetensors" if state == "partial" else "weights.safetensors")).is_file()
    planted = model_dir(cfg, tmp_path, other_data.sha256)
    assert planted != own
    shutil.copytree(own, planted)
    with pytest.raises(UsageError) as err:
        train_model(cfg, other_data, device="cpu", cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert tiny_data.sha256 in msg and other_data.sha256 in msg and "\n" not in msg
    assert sorted(p.name for p in planted.iterdir()) == sorted(p.name for p in own.iterdir())  # nothing overwritten
