"""Bring your own defense: KNNDefense's metrics against brute force, decision-aligned logits, benchmark()."""

import json

import pytest
import torch
from torch import nn

from robustbench_knn import BenchmarkResult, KNNDefense, UsageError, benchmark
from robustbench_knn.defenses.defense import aligned_logits
from robustbench_knn.defenses.knn import knn_predict
from robustbench_knn.paper.classifier import KNNClassifier


def _brute_vote(x, bank, labels, k, n_classes, rank_dist, tie_dist):
    """The documented rule, one row at a time: k nearest by (distance, index); most votes; then the smaller
    summed distance of the class's neighbours; then the lower class index."""
    out = []
    for i in range(len(x)):
        d = [(float(rank_dist(x[i], bank[j])), j) for j in range(len(bank))]
        near = [j for _, j in sorted(d)[:k]]
        votes = [sum(labels[j] == c for j in near) for c in range(n_classes)]
        sums = [sum(float(tie_dist(x[i], bank[j])) for j in near if labels[j] == c) for c in range(n_classes)]
        best = max(votes)
        out.append(min((sums[c], c) for c in range(n_classes) if votes[c] == best)[1])
    return torch.tensor(out)


def _l2(a, b):
    return torch.linalg.vector_norm(a - b)


@pytest.mark.parametrize("metric", ["l2", "cosine", "sum-l2:2", "sum-l2:3"])
def test_each_metric_votes_as_brute_force(metric):
    gen = torch.Generator().manual_seed(1)
    bank, x = torch.randn(120, 6, generator=gen), torch.randn(40, 6, generator=gen)
    labels = torch.randint(0, 4, (120,), generator=gen)
    d = KNNDefense(nn.Identity(), labels, bank_embeddings=bank, k=7, metric=metric)
    if metric == "cosine":
        unit = nn.functional.normalize
        rank = lambda a, b: 1 - torch.dot(a, b) / (a.norm() * b.norm())  # noqa: E731 - cosine distance
        tie = lambda a, b: _l2(unit(a, dim=0), unit(b, dim=0))  # noqa: E731
    else:
        n = 1 if metric == "l2" else int(metric.split(":")[1])
        rank = tie = lambda a, b: sum(_l2(p, q) for p, q in zip(a.chunk(n), b.chunk(n)))  # noqa: E731
    want = _brute_vote(x, bank, labels.tolist(), 7, 4, rank, tie)
    assert torch.equal(d.predict(x), want)


def test_bank_as_images_equals_bank_as_embeddings(tiny_data):
    emb = nn.Sequential(nn.Flatten(), nn.Linear(3072, 8))
    train = tiny_data.train
    a = KNNDefense(emb, train.y, bank_images=train.x, k=5)  # uint8 images, embedded in batches
    b = KNNDefense(emb, train.y, bank_embeddings=emb(train.floats()).detach(), k=5)
    x = tiny_data.test.floats()
    assert torch.allclose(a.bank, b.bank, atol=1e-5) and torch.equal(a.predict(x), b.predict(x))


def test_a_bank_made_under_inference_mode_can_be_attacked():
    # users embed their bank under torch.inference_mode(); autograd cannot save such tensors for an attack
    gen = torch.Generator().manual_seed(3)
    emb = nn.Sequential(nn.Flatten(), nn.Linear(3072, 8))
    with torch.inference_mode():
        bank = emb(torch.rand(50, 3, 32, 32, generator=gen))
    d = KNNDefense(emb, torch.randint(0, 3, (50,), generator=gen), bank_embeddings=bank, k=5)
    x = torch.rand(4, 3, 32, 32, generator=gen, requires_grad=True)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(d.bank, bank)


@pytest.mark.parametrize("kwargs, msg", [
    ({"bank_embeddings": torch.zeros(5, 4), "bank_images": torch.zeros(5, 4)}, "exactly one"),
    ({}, "exactly one"),
    ({"bank_embeddings": torch.zeros(4, 4)}, "one vector per label"),
    ({"bank_embeddings": torch.zeros(5, 5), "metric": "sum-l2:2"}, "divisible by 2"),
    ({"bank_embeddings": torch.zeros(5, 4), "metric": "l1"}, "metric must be"),
    ({"bank_embeddings": torch.zeros(5, 4), "k": 6}, "between 1 and the bank size"),
    ({"bank_embeddings": torch.zeros(5, 4), "surrogate": "potential"}, "lam and l0"),
])
def test_bad_defense_input_is_one_clear_error(kwargs, msg):
    with pytest.raises(UsageError, match=msg):
        KNNDefense(nn.Identity(), torch.arange(5) % 2, **{"k": 3, **kwargs})


def test_aligned_logits_lift_only_where_needed():
    z = torch.tensor([[3.0, 1.0, float("-inf")], [0.0, 2.0, 1.0], [5.0, 5.0, -1.0]])
    out = aligned_logits(z, torch.tensor([0, 2, 1]))
    assert out.argmax(1).tolist() == [0, 2, 1]
    assert torch.equal(out[0], z[0]) and out[1, 2] > 2.0 and out[2, 1] > 5.0
    assert torch.equal(out[:, :2][1], z[1, :2])  # only the decided class moves


@pytest.mark.parametrize("surrogate", ["potential", "softknn"])
def test_aligned_forward_follows_the_vote_with_the_surrogates_gradient(tiny_clf, tiny_data, surrogate):
    plain = KNNClassifier(tiny_clf.net, tiny_clf.bank, tiny_clf.bank_labels, tiny_clf.cfg, surrogate)
    aligned = KNNClassifier(tiny_clf.net, tiny_clf.bank, tiny_clf.bank_labels, tiny_clf.cfg, surrogate, aligned=True)
    # points on the way to adversarial: where surrogate and vote disagree most
    x = (tiny_data.test.floats() + 0.15 * torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    x = x.clamp(0, 1)
    with torch.no_grad():
        assert torch.equal(aligned(x).argmax(1), aligned.predict(x))
    w = torch.randn(100, 10, generator=torch.Generator().manual_seed(1))
    grads = []
    for clf in (plain, aligned):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((clf(xr) * w).sum(), xr)
        grads.append(g)
    assert torch.allclose(grads[0], grads[1])


class TinyEmbedding(nn.Module):
    """A user's own embedding: nothing of this project's model in it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3072, 16), nn.Tanh(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x - 0.5)


def test_benchmark_a_user_defense_in_three_lines(tiny_data, tiny_data_dir, tmp_path):
    defense = KNNDefense(TinyEmbedding(), tiny_data.train.y, bank_images=tiny_data.train.x, k=5, metric="cosine")
    res = benchmark(defense, n_examples=30, eps=8 / 255, attacks="kfgsm,aa:apgd,feature", data_dir=str(tiny_data_dir),
                    device="cpu", out=tmp_path, name="mine", progress=False)
    clean_acc, robust_acc = res
    assert isinstance(res, BenchmarkResult) and res.n_examples == 30
    x, y = tiny_data.test.head(30).floats(), tiny_data.test.head(30).y
    assert clean_acc == pytest.approx(100 * (defense.predict(x) == y).float().mean().item(), abs=0.01)
    assert set(res.per_attack) == {"native:kfgsm", "aa:apgd", "native:feature"}
    per_sample = res.per_sample()
    assert robust_acc == pytest.approx(100 * per_sample["robust worst case"].mean(), abs=0.01)
    assert list(res.to_frame()["attack"])[-1] == "worst case"
    card = json.loads((tmp_path / "mine.model-card.json").read_text())
    assert card["threat_model"] == "Linf" and card["eps"] == "8/255" and card["n_examples"] == 30
    assert float(card["worst_case_robust_acc"]) == robust_acc and isinstance(card["unreliable"], bool)
    assert "Cheap checks" in card["footnote"]  # a run that checked says so: never "unreliable": null
    assert (tmp_path / "mine.csv").is_file() and json.loads((tmp_path / "mine.json").read_text())["robust_acc"] == robust_acc


def test_benchmark_a_plain_logit_module(tiny_data, tiny_data_dir, tiny_trained):
    net = tiny_trained.net  # outputs 6 numbers: read as 6 class logits by argmax, nothing k-NN about it
    torch.manual_seed(0)
    model = nn.Sequential(net, nn.Linear(6, 10))
    res = benchmark(model, n_examples=20, attacks="kfgsm,aa:apgd", data_dir=str(tiny_data_dir), device="cpu",
                    progress=False, resume=False)
    x, y = tiny_data.test.head(20).floats(), tiny_data.test.head(20).y
    with torch.no_grad():  # the decision of a logit model is its argmax
        assert res.clean_acc == pytest.approx(100 * (model(x).argmax(1) == y).float().mean().item(), abs=0.01)
    assert res.name == "Sequential" and res.n_examples == 20
    with pytest.raises(UsageError, match="k-NN vote"):  # adaptive k-NN attacks: refused before any work
        benchmark(nn.Sequential(net, nn.Linear(6, 10)), attacks="adaptive", data_dir=str(tiny_data_dir),
                  device="cpu", progress=False)
    with pytest.raises(UsageError, match="nn.Module"):
        benchmark(object(), data_dir=str(tiny_data_dir), progress=False)


def test_raw_pixel_subject_chooses_k_on_validation(tiny_data_dir, tiny_data):
    from robustbench_knn.defenses.subjects import K_CANDIDATES, raw_pixel_knn

    d = raw_pixel_knn(str(tiny_data_dir), device="cpu", val_size=100)
    scores = d.k_choice["val_acc"]
    assert set(scores) == set(K_CANDIDATES) and d.k == d.k_choice["chosen"]
    assert scores[d.k] == max(scores.values()) and len(d.bank) == 400  # scored on 300 vs 100, then all 400
    pixels, y = tiny_data.train.floats().flatten(1), tiny_data.train.y
    for k, score in scores.items():  # each candidate's score is its own k-NN's validation accuracy
        pred = knn_predict(pixels[300:], pixels[:300], y[:300], k=k, n_spaces=1, n_classes=10)
        assert score == round(100 * (pred == y[300:]).float().mean().item(), 2)
    x = tiny_data.test.floats()
    dist = torch.cdist(x.flatten(1), tiny_data.train.floats().flatten(1))
    nearest = dist.argmin(1)
    one_nn = raw_pixel_knn(str(tiny_data_dir), k=1, device="cpu")
    assert torch.equal(one_nn.predict(x), tiny_data.train.y[nearest])


def test_deep_knn_subject_on_row_a_features(tiny_data_dir, tiny_data, cache_dir):
    from robustbench_knn.defenses.subjects import deep_knn_a

    sets = ["model.w_r=32", "model.d=3", "train.epochs=3", "train.batch_size=100"]
    d = deep_knn_a(str(tiny_data_dir), k=5, device="cpu", cache_dir=str(cache_dir), sets=sets)
    assert d.bank.shape == (400, 32 + 6) and d.metric == "l2"
    x = tiny_data.test.floats()
    assert torch.allclose(d.embed(x[:4]), d.net.net.features(x[:4]))
    assert (d.predict(x) == tiny_data.test.y).float().mean() > 0.5  # well-separated tiny classes
    # the backbone is named, with its own weights hash and head accuracy (planted bug caught: a subject that
    # records neither, so a deep k-NN on a wrong checkpoint could not be told from one on the right one)
    from robustbench_knn.config import apply_overrides, get_model_config
    from robustbench_knn.paper.train import train_model

    b = d.backbone
    trained = train_model(apply_overrides(get_model_config("a"), sets), tiny_data, device="cpu", cache_dir=str(cache_dir))
    with torch.no_grad():
        head = (trained.net(x).argmax(1) == tiny_data.test.y).float().mean().item()
    assert b["model"] == "a" and b["dataset_sha256"] == tiny_data.sha256 and len(b["weights_hash"]) == 12
    # the hash row A's own results carry (planted bug caught: the bare network's digest, another name for row A)
    from robustbench_knn.evaluation.experiment import weights_hash
    from robustbench_knn.paper.classifier import build_classifier

    assert b["weights_hash"] == weights_hash(build_classifier(trained))
    assert b["head_clean_acc"] == round(100 * head, 2)
    other = deep_knn_a(str(tiny_data_dir), k=5, device="cpu", cache_dir=str(cache_dir), sets=[*sets, "train.seed=1"])
    assert other.backbone["weights_hash"] != b["weights_hash"]
