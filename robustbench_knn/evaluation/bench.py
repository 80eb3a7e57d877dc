"""Speed benchmark (prints figures; no thresholds): training step vs plain matmul throughput, k-NN over a
10k × 50k bank (fast path vs the dense exact rule), and attack throughput of the project's own attacks
beside the toolkits' (kFGSM vs torchattacks' BIM, the APGD core vs AutoAttack's APGD-CE), every pair
measured in the same run on the same model and surrogate. Uses a freshly initialised FULL model and random
data: speed does not depend on the weights."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig
from ..defenses.knn import knn_votes
from ..devices import resolve_device
from ..paper.classifier import KNNClassifier
from ..paper.model import IdResNet
from ..paper.train import _optimizer, objective


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Seconds per call; the warm-up call is skipped for calls of many seconds (one-time costs are noise there)."""
    if warmup:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def run_bench(cfg: ExperimentConfig, *, device: str = "auto", repeats: int = 3, n_test: int = 10000,
              n_bank: int = 50000, attack_batch: int = 250, attack_steps: int = 10) -> dict[str, float]:
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
    for method in ("exact", "fast", "dense"):  # exact: the default (float64, batch-independent) decision
        out[f"knn_{method}_seconds"] = _timed(
            lambda: knn_votes(emb, bank, labels, k=k, n_spaces=cfg.model.n_spaces, method=method), 1, dev,
            warmup=dev.type == "cuda")
    out["knn_speedup"] = out["knn_dense_seconds"] / out["knn_fast_seconds"]
    out["knn_exact_vs_fast"] = out["knn_exact_seconds"] / out["knn_fast_seconds"]
    out["knn_shape"] = float(n_test * n_bank)

    net.eval()
    clf = KNNClassifier(net, bank * 3, labels, cfg).to(dev)
    xa = torch.rand(attack_batch, 3, 32, 32, device=dev)
    with torch.no_grad():  # labels the surrogate gets right, so every toolkit attacks every point
        ya = clf(xa).argmax(1)
    out.update(attack_throughput(clf, xa, ya, steps=attack_steps, device=dev))
    out["device"] = str(dev)  # type: ignore[assignment]
    return out


def attack_throughput(clf: KNNClassifier, x: torch.Tensor, y: torch.Tensor, *, steps: int, device: torch.device,
                      eps: float = 8 / 255) -> dict[str, float]:
    """Image-gradient-steps per second of each attack pair on the same classifier and surrogate:
    kFGSM (the §2.5 objective) vs torchattacks' BIM (CE on the surrogate logits), same steps and step size;
    the APGD core of ``softknn-apgd`` vs AutoAttack's APGD-CE, both on CE of the surrogate logits, same
    iterations. Each figure counts the gradient evaluations the attack makes."""
    from pyautoattack.autopgd_base import APGDAttack

    from ..attacks import get_attack
    from ..attacks.apgd_core import apgd
    from ..attacks.base import input_gradient

    n = len(x)
    out: dict[str, float] = {}
    kfgsm = get_attack("kfgsm").build(clf, eps, steps=steps, step_ratio=0.1)
    bim = get_attack("ta:bim").build(clf, eps, steps=steps, step_ratio=0.1)
    warm = device.type == "cuda"  # on the CPU each call takes many seconds: no warm-up pass
    kfgsm(x[:2], y[:2])  # ... but the §2.5 loss's fused kernels compile once per process: not a cost per step
    out["kfgsm_image_steps_per_second"] = n * steps / _timed(lambda: kfgsm(x, y), 1, device, warm)
    out["ta_bim_image_steps_per_second"] = n * steps / _timed(lambda: bim(x, y), 1, device, warm)
    out["kfgsm_vs_ta_bim"] = out["kfgsm_image_steps_per_second"] / out["ta_bim_image_steps_per_second"]

    def ce_loss_grad(xs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        seen: dict[str, torch.Tensor] = {}

        def ce(z: torch.Tensor) -> torch.Tensor:  # loss and gradient from one forward, as softknn-apgd does
            seen["loss"] = F.cross_entropy(clf(z), y[idx], reduction="none")
            return seen["loss"]

        grad = input_gradient(ce, xs)
        return seen["loss"].detach(), grad, None

    # apgd(steps) evaluates the gradient `steps` times; AutoAttack's attack_single_run n_iter + 1 times
    out["apgd_core_image_steps_per_second"] = n * steps / _timed(lambda: apgd(ce_loss_grad, x, eps, steps), 1,
                                                                 device, warm)
    aa = APGDAttack(clf, n_iter=steps, norm="Linf", n_restarts=1, eps=eps, loss="ce", seed=0, device=device)
    aa.init_hyperparam(x)  # what its perturb() does before attack_single_run
    out["aa_apgd_ce_image_steps_per_second"] = n * (steps + 1) / _timed(lambda: aa.attack_single_run(x, y), 1,
                                                                        device, warm)
    out["apgd_core_vs_aa_apgd_ce"] = out["apgd_core_image_steps_per_second"] / out["aa_apgd_ce_image_steps_per_second"]
    return out
