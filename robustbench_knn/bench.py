"""Speed benchmark (prints figures; no thresholds): training step vs plain matmul throughput, k-NN over a
10k × 50k bank, and attack throughput. Uses a freshly initialised FULL model and random data: speed does
not depend on the weights."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .classifier import KNNClassifier
from .config import ExperimentConfig
from .knn import knn_predict
from .model import IdResNet
from .train import _optimizer, objective, resolve_device


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def run_bench(cfg: ExperimentConfig, *, device: str = "auto", repeats: int = 3, n_test: int = 10000,
              n_bank: int = 50000, attack_batch: int = 250) -> dict[str, float]:
    dev = resolve_device(device)
    torch.manual_seed(0)
    out: dict[str, float] = {}
    width = cfg.model.w_r + cfg.model.w_p
    b = cfg.train.batch_size
    a, w = torch.randn(b, width, device=dev), torch.randn(width, width, device=dev)
    t = _timed(lambda: a @ w, repeats * 3, dev)
    out["matmul_gflops"] = 2 * b * width * width / t / 1e9

    net = IdResNet(cfg.model).to(dev)
    opt = _optimizer(net, cfg)
    x = torch.rand(b, 3, 32, 32, device=dev)
    y = torch.randint(0, cfg.model.n_classes, (b,), device=dev)

    def step() -> None:
        loss = objective(net, cfg, net(x, noise=cfg.train.noise), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = _timed(step, repeats, dev)
    out["train_step_seconds"] = t
    out["train_gflops"] = 3 * net.flops_per_sample() * b / t / 1e9  # forward + backward ≈ 3 × forward
    out["train_vs_matmul"] = out["train_gflops"] / out["matmul_gflops"]

    emb = torch.randn(n_test, cfg.model.w_p, device=dev)
    bank = torch.randn(n_bank, cfg.model.w_p, device=dev)
    labels = torch.randint(0, cfg.model.n_classes, (n_bank,), device=dev)
    k = min(cfg.k, n_bank)
    out["knn_seconds"] = _timed(lambda: knn_predict(emb, bank, labels, k=k, n_spaces=cfg.model.n_spaces), 1, dev)
    out["knn_shape"] = float(n_test * n_bank)

    net.eval()
    clf = KNNClassifier(net, bank * 3, labels, cfg).to(dev)
    xa = torch.rand(attack_batch, 3, 32, 32, device=dev)
    ya = torch.randint(0, cfg.model.n_classes, (attack_batch,), device=dev)
    from .attacks import get_attack

    attack = get_attack("kfgsm").build(clf, 8 / 255, steps=5)
    t = _timed(lambda: attack(xa, ya), 1, dev)
    out["attack_image_steps_per_second"] = attack_batch * 5 / t
    out["device"] = str(dev)  # type: ignore[assignment]
    return out
