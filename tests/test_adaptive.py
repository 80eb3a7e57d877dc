"""Adaptive attacks (issue 5): each breaks weak k-NNs where the answer is known, returns valid examples, keeps
its best iterate by the hard vote; vote-square never calls backward; transfer uses the installed source."""

import pytest
import torch

from robustbench_knn.attacks import get_attack, parse_attack_list
from robustbench_knn.attacks.adaptive import ADAPTIVE_SUITE
from robustbench_knn.attacks.knn_tools import embed_batched, swap_gap, vote_state
from robustbench_knn.attacks.transfer import source_config, trained_sources, transfer_sources
from robustbench_knn.config import ModelConfig, UsageError, get_model_config
from robustbench_knn.defenses.knn import knn_votes, vote_margin
from robustbench_knn.evaluation.evaluate import check_adversarial, run_attacks
from robustbench_knn.paper.classifier import KNNClassifier

from .conftest import TINY_CFG

# cheap settings: every attack runs in well under a second on these models
CHEAP = {"native:feature": {"steps": 20}, "native:softknn-apgd": {"steps": 20},
         "native:softknn-apgd-dlr": {"steps": 20}, "native:vote-square": {"n_queries": 300},
         "native:transfer": {"steps": 10}}
WHITE_AND_FREE = ["feature", "softknn-apgd", "softknn-apgd-dlr", "vote-square"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def levels_clf():
    """3 classes of near-constant images (grey levels 0.3 / 0.5 / 0.7, noise 0.02), identity embedding, k = 5.

    Known answer: at ε = 0.3 every point can be pushed past the midpoint to a neighbouring class; at ε = 0.05
    no point can (it stays closer to its own level)."""
    g = torch.Generator().manual_seed(0)

    def levels(n):
        y = torch.arange(3).repeat_interleave(n)
        x = (0.3 + 0.2 * y.float()).view(-1, 1, 1, 1) + 0.02 * torch.randn(len(y), 3, 32, 32, generator=g)
        return x.clamp(0, 1), y

    xb, yb = levels(20)
    cfg = TINY_CFG.replace(k=5, model={"n_spaces": 1, "d": 3 * 32 * 32, "n_classes": 3})
    clf = KNNClassifier(torch.nn.Flatten(), xb.flatten(1), yb, cfg)
    return clf, *levels(6)


@pytest.mark.parametrize("name", WHITE_AND_FREE)
def test_breaks_identity_knn_where_answer_is_known(name, levels_clf):
    clf, x, y = levels_clf
    spec = get_attack(name)
    few = {k: max(1, v // 5) for k, v in CHEAP[spec.key].items()}
    small = run_attacks(clf, x, y, [spec], [0.05], overrides={spec.key: few}, progress=False)["per_eps"][0]
    large = run_attacks(clf, x, y, [spec], [0.3], overrides={spec.key: CHEAP[spec.key]}, progress=False)["per_eps"][0]
    assert small["clean_acc"] == 100
    assert small["attacks"][spec.key]["robust_acc"] == 100  # impossible to break: nothing is claimed
    assert large["attacks"][spec.key]["valid"] and large["attacks"][spec.key]["robust_acc"] == 0


@pytest.mark.parametrize("name", WHITE_AND_FREE)
def test_breaks_tiny_model_and_examples_are_valid(name, tiny_clf, tiny_data):
    sub = tiny_data.test.head(30)
    x, y = sub.floats(), sub.y
    spec = get_attack(name)
    eps = 16 / 255
    torch.manual_seed(0)
    x_adv = spec.build(tiny_clf, eps, **CHEAP[spec.key])(x, y)
    rep = check_adversarial(x, x_adv, eps)
    assert rep.ok, rep
    clean = tiny_clf.predict(x) == y
    robust = clean & (tiny_clf.predict(x_adv) == y)
    assert clean.float().mean() > 0.8 and robust.float().mean() < clean.float().mean() - 0.5


@pytest.mark.parametrize("name", ["feature", "softknn-apgd"])
def test_never_returns_worse_than_clean_by_hard_vote(name, tiny_clf, tiny_data):
    """The best iterate is judged by the hard vote margin and starts at the clean point."""
    sub = tiny_data.test.head(30)
    x, y = sub.floats(), sub.y
    x_adv = get_attack(name).build(tiny_clf, 1 / 255, steps=3)(x, y)

    def margin(z):
        return vote_margin(tiny_clf.votes(z)[0], y)

    assert (margin(x_adv) <= margin(x)).all()


def test_vote_square_never_calls_backward(tiny_clf, tiny_data, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("vote-square used a gradient")

    monkeypatch.setattr(torch.autograd, "grad", boom)
    monkeypatch.setattr(torch.Tensor, "backward", boom)
    sub = tiny_data.test.head(20)
    x, y = sub.floats(), sub.y
    x_adv = get_attack("vote-square").build(tiny_clf, 16 / 255, n_queries=100)(x, y)
    assert not x_adv.requires_grad and check_adversarial(x, x_adv, 16 / 255).ok
    assert (tiny_clf.predict(x_adv) != y).any()


def test_vote_state_and_swap_gap(tiny_clf, tiny_data):
    sub = tiny_data.test.head(20)
    x, y = sub.floats(), sub.y
    emb = embed_batched(tiny_clf, x)
    st = vote_state(tiny_clf, emb, y, with_gap=True)
    votes, _ = knn_votes(emb, tiny_clf.bank, tiny_clf.bank_labels, k=tiny_clf.k, n_spaces=tiny_clf.n_spaces)
    assert torch.equal(st.margin, vote_margin(votes, y))
    assert torch.equal(st.broken, tiny_clf.predict(x) != y)
    gap = swap_gap(emb, tiny_clf.bank, tiny_clf.bank_labels, y, tiny_clf.k, tiny_clf.n_spaces)
    assert torch.equal(gap, st.gap) and (gap >= 0).all()  # ≥ 0: a swap has not happened yet


def test_gradient_attacks_masked_but_adaptive_ones_are_not(tiny_clf, masked_clf, tiny_data):
    """Scaling embeddings and bank by 10⁴ leaves every k-NN decision unchanged but underflows the paper's
    potential (zero gradient): kFGSM finds nothing, the adaptive attacks still break the model."""
    masked = masked_clf
    sub = tiny_data.test.head(30)
    x, y = sub.floats(), sub.y
    assert torch.equal(masked.predict(x), tiny_clf.predict(x))
    specs = [get_attack(n) for n in ("kfgsm", "feature", "softknn-apgd", "vote-square")]
    r = run_attacks(masked, x, y, specs, [16 / 255], overrides=CHEAP, progress=False)["per_eps"][0]
    acc = {k: a["robust_acc"] for k, a in r["attacks"].items()}
    assert r["attacks"]["native:kfgsm"]["zero_or_nonfinite_grad_frac"] == 1.0
    assert acc["native:kfgsm"] == r["clean_acc"]
    for k in ("native:feature", "native:softknn-apgd", "native:vote-square"):
        assert acc[k] < r["clean_acc"] - 50, (k, acc)


def test_adaptive_group_and_parameters():
    keys = [s.key for s in parse_attack_list("kfgsm,adaptive,feature")]
    assert keys == ["native:kfgsm"] + [f"native:{n}" for n in ADAPTIVE_SUITE]
    with pytest.raises(UsageError):
        get_attack("feature").build(None, 0.1, stepz=3)


def test_knn_only_attacks_refuse_logit_models(tiny_data):
    from robustbench_knn.paper.classifier import LogitClassifier
    from robustbench_knn.paper.model import IdResNet

    logit = LogitClassifier(IdResNet(ModelConfig(w_r=8, d=3, head="logits")))
    with pytest.raises(UsageError, match="k-NN"):
        get_attack("feature").build(logit, 0.1)


class Shifted(torch.nn.Module):
    """The tiny network with a copy of its weights nudged by 1e-4: nearly its decisions, none of its tensors."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        import copy

        self.net = copy.deepcopy(net)
        with torch.no_grad():
            for p in self.net.parameters():
                p.add_(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_transfer_needs_a_provider_and_uses_it(tiny_clf, tiny_data):
    sub = tiny_data.test.head(20)
    x, y = sub.floats(), sub.y
    with pytest.raises(UsageError, match="source model"):
        get_attack("transfer").build(tiny_clf, 16 / 255)
    calls = []

    source = KNNClassifier(Shifted(tiny_clf.net), tiny_clf.bank, tiny_clf.bank_labels, tiny_clf.cfg)

    def provider(name, seed, target):
        calls.append((name, seed))
        return source  # the target's geometry with other weights: a transfer from it must break the target

    with transfer_sources(provider):
        attack = get_attack("transfer").build(tiny_clf, 16 / 255, steps=10, source_seed=3)
        x_adv = attack(x, y)
        get_attack("transfer").build(tiny_clf, 16 / 255, source_seed=3)  # built once per (name, seed, target)
    assert calls == [("a", 3)]
    assert check_adversarial(x, x_adv, 16 / 255).ok
    assert (tiny_clf.predict(x_adv) != y).float().mean() > 0.5


def test_a_freed_targets_source_goes_with_it():
    # sources are built once per target and cached. Planted bug caught: a cache keyed by id(target), which keeps a
    # freed target's source alive under its id and hands it to any later target that CPython allocates at the
    # same address (a source trained for another model: a silently wrong transfer)
    import gc
    import weakref

    from torch import nn

    from robustbench_knn.attacks.transfer import get_source

    def provider(name, seed, target):
        return nn.Linear(1, 1)  # a fresh source per build

    with transfer_sources(provider):
        target, other = nn.Identity(), nn.Identity()
        source = get_source("a", 0, target)
        assert get_source("a", 0, target) is source and get_source("a", 0, other) is not source
        gone = weakref.ref(source)
        del target, source
        gc.collect()
        assert gone() is None, "the cache kept a freed target's source"
        assert get_source("a", 0, other) is get_source("a", 0, other)


def test_source_config_is_the_row_at_the_targets_size():
    a = source_config(TINY_CFG, "a", None)
    assert a.model.head == "logits" and not a.model.identity_init and not a.model.share_dec
    assert a.model.w_r == TINY_CFG.model.w_r and a.train.epochs == TINY_CFG.train.epochs
    same = source_config(TINY_CFG, "full", None)
    assert same.train.seed == TINY_CFG.train.seed + 1 and same.config_hash() != TINY_CFG.config_hash()
    assert source_config(TINY_CFG, "full", 7).train.seed == 7


def test_a_row_audited_with_another_rows_transfer_gets_that_row_itself():
    a, b = get_model_config("a"), get_model_config("b")
    assert source_config(a, "b", None).config_hash() == b.config_hash()  # not row A's net under row B's name
    assert source_config(b, "a", None).config_hash() == a.config_hash()
    assert source_config(a, "a", None).train.seed == a.train.seed + 1  # never the attacked weights
    full_a = source_config(get_model_config("full"), "a", None)
    assert full_a.config_hash() == a.config_hash()
    long_a = source_config(get_model_config("full-100ep"), "a", None)  # the target's budget, row A's architecture
    assert long_a.train.epochs == 100 and long_a.replace(train={"epochs": a.train.epochs}).config_hash() == a.config_hash()


def test_transfer_from_trained_tiny_source(tiny_clf, tiny_data, cache_dir):
    sub = tiny_data.test.head(20)
    x, y = sub.floats(), sub.y
    with transfer_sources(trained_sources(tiny_data, cache_dir=cache_dir, device="cpu")):
        res = run_attacks(tiny_clf, x, y, [get_attack("transfer")], [32 / 255], overrides=CHEAP, progress=False)
    entry = res["per_eps"][0]["attacks"]["native:transfer"]
    assert entry["n_invalid"] == 0 and entry["zero_or_nonfinite_grad_frac"] == 0.0
