import math

import pytest
import torch

from robustbench_knn.defenses.potential import attack_loss, class_potentials
from robustbench_knn.paper.losses import exp_contrastive_loss


def _dist(p, q, n_spaces):
    d = len(p) // n_spaces
    return sum(math.sqrt(sum((p[j * d + i] - q[j * d + i]) ** 2 for i in range(d))) for j in range(n_spaces))


def _indicator(delta, dist, l0, n_classes):
    if delta != 0:
        return 1.0 / n_classes
    return -1.0 if dist >= l0 else 0.0


def slow_exp_contrastive(emb, labels, n_spaces, lam, l0, k_mu, n_classes, reduction):
    """Double loop, transcribed from §2.1."""
    e, y = emb.tolist(), labels.tolist()
    b = len(e)
    first = 0.0
    for u in range(b):
        for v in range(b):
            dist = _dist(e[u], e[v], n_spaces)
            first += _indicator(y[u] - y[v], dist, l0, n_classes) * (math.exp(-lam * dist) - math.exp(-lam * l0))
    first /= b
    d = len(e[0]) // n_spaces
    reg = k_mu * sum(sum(math.sqrt(sum(p[j * d + i] ** 2 for i in range(d))) for j in range(n_spaces)) ** 2 for p in e)
    divisor = {"sum": 1, "mean": b, "mean2": b * b}[reduction]  # as printed, ÷B, ÷B²
    return first + reg / divisor


def slow_attack_loss(emb, labels, train_emb, train_labels, n_spaces, lam, l0, n_classes):
    """Loop transcription of §2.5."""
    out = []
    for p, y in zip(emb.tolist(), labels.tolist()):
        s = 0.0
        for q, yt in zip(train_emb.tolist(), train_labels.tolist()):
            dist = _dist(p, q, n_spaces)
            s += _indicator(y - yt, dist, l0, n_classes) * (math.exp(-lam * dist) - math.exp(-lam * l0))
        out.append(s)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean2"])
@pytest.mark.parametrize("scale", [0.5, 3.0])  # small: mostly below l0; large: many same-class pairs beyond l0
def test_exp_contrastive_matches_double_loop(reduction, scale):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(24, 6, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, 4, (24,), generator=g)
    kw = dict(n_spaces=2, lam=0.5, l0=7.0, k_mu=0.25, n_classes=4)
    got = exp_contrastive_loss(emb, labels, reg_reduction=reduction, **kw)
    want = slow_exp_contrastive(emb, labels, reduction=reduction, **kw)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_sum_regulariser_is_batch_times_mean():
    g = torch.Generator().manual_seed(2)
    emb, labels = torch.randn(16, 30, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
    first = exp_contrastive_loss(emb, labels, k_mu=0.0)
    reg_mean = exp_contrastive_loss(emb, labels) - first
    reg_sum = exp_contrastive_loss(emb, labels, reg_reduction="sum") - first
    reg_mean2 = exp_contrastive_loss(emb, labels, reg_reduction="mean2") - first
    assert reg_sum.item() == pytest.approx(16 * reg_mean.item(), rel=1e-9)
    assert reg_mean.item() == pytest.approx(16 * reg_mean2.item(), rel=1e-9)


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValueError, match="reg_reduction"):
        exp_contrastive_loss(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), reg_reduction="median")


def test_attack_loss_matches_loop_and_class_potentials():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(60, 6, generator=g, dtype=torch.float64) * 3
    train_y = torch.randint(0, 5, (60,), generator=g)
    emb = torch.randn(7, 6, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (7,), generator=g)
    kw = dict(n_spaces=2, lam=0.5, l0=7.0, n_classes=5)
    got = attack_loss(emb, y, train, train_y, **kw)
    assert got.shape == (7,)
    torch.testing.assert_close(got, slow_attack_loss(emb, y, train, train_y, **kw), rtol=1e-9, atol=1e-9)
    pots = class_potentials(emb, train, train_y, **kw)
    for c in range(5):
        torch.testing.assert_close(pots[:, c], slow_attack_loss(emb, torch.full((7,), c), train, train_y, **kw))


def test_no_nan_gradient_with_duplicate_points():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 30, generator=g)
    emb = torch.cat([base, base, torch.zeros(2, 30)]).requires_grad_(True)  # duplicates and exact zeros
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 5])
    exp_contrastive_loss(emb, labels).backward()
    assert torch.isfinite(emb.grad).all()
    x = base.clone().requires_grad_(True)
    attack_loss(x, labels[:5], base, labels[:5]).sum().backward()  # test points equal to bank points
    assert torch.isfinite(x.grad).all()


def test_loss_pushes_classes_apart():
    """Gradient descent on the loss separates two overlapping classes (a behavioural check of the sign)."""
    g = torch.Generator().manual_seed(5)
    emb = (torch.randn(40, 30, generator=g) * 0.1).requires_grad_(True)
    labels = torch.arange(2).repeat(20)
    opt = torch.optim.SGD([emb], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        exp_contrastive_loss(emb, labels, n_classes=2).backward()
        opt.step()
    with torch.no_grad():
        c0, c1 = emb[labels == 0].mean(0), emb[labels == 1].mean(0)
        spread = (emb[labels == 0] - c0).norm(dim=1).mean()
    assert (c0 - c1).norm() > 2 * spread
