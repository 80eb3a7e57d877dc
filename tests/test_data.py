import pickle

import pytest
import torch

from robustbench_knn import data as data_mod
from robustbench_knn.config import UsageError
from robustbench_knn.data import BATCH_DIR, binomial_noise, load_cifar10, pixel_stats


def test_noise_values_mean_variance():
    g = torch.Generator().manual_seed(0)
    n = binomial_noise((400_000,), generator=g)
    assert set(n.unique().tolist()) == {-5.0, -3.0, -1.0, 1.0, 3.0, 5.0}
    # 2X-5 with X ~ Bin(5, 1/2): mean 0, variance 4 * 5/4 = 5
    assert abs(n.mean().item()) < 0.02
    assert n.var().item() == pytest.approx(5.0, rel=0.02)
    # Binomial probabilities: P(X=0) = 1/32, P(X=2) = 10/32
    assert (n == -5).float().mean().item() == pytest.approx(1 / 32, abs=0.003)
    assert (n == -1).float().mean().item() == pytest.approx(10 / 32, abs=0.005)


def test_pixel_stats_per_position():
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([0, 255, 0, 255], dtype=torch.uint8)
    mean, std = pixel_stats(x)
    assert mean.shape == (3, 32, 32)
    assert mean[0, 0, 0].item() == pytest.approx(0.5) and mean[1, 5, 5].item() == 0.0
    assert std[0, 0, 0].item() == pytest.approx(torch.tensor([0, 1, 0, 1.0]).std().item(), rel=1e-5)


def test_loads_official_layout(tiny_data_dir):
    d = load_cifar10(tiny_data_dir, download=False)
    assert d.train.x.shape == (400, 3, 32, 32) and d.train.x.dtype == torch.uint8
    assert d.test.y.shape == (100,) and set(d.test.y.tolist()) == set(range(10))
    # DIR/cifar-10-batches-py is accepted as well as DIR
    assert load_cifar10(tiny_data_dir / BATCH_DIR, download=False).sha256 == d.sha256


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_online", lambda *a, **k: False)
    with pytest.raises(UsageError, match="--data-dir"):
        load_cifar10(tmp_path)


def test_env_var_locates_data(tiny_data_dir, monkeypatch):
    monkeypatch.setenv("ROBUSTBENCH_KNN_DATA", str(tiny_data_dir))
    assert len(load_cifar10(None, download=False).test) == 100


def test_batch_loader_refuses_code(tmp_path, tiny_data_dir):
    import shutil

    root = tmp_path / "evil"
    shutil.copytree(tiny_data_dir, root)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / BATCH_DIR / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(pickle.UnpicklingError):
        load_cifar10(root, download=False)
