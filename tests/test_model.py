import pytest
import torch

from robustbench_knn.config import MODELS, ModelConfig, get_model_config
from robustbench_knn.paper.model import IdRes, IdResNet


def test_fresh_idres_layer_is_identity():
    layer = IdRes(40, 40, depth=2)
    x = torch.randn(8, 40)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
    narrow = IdRes(40, 6)
    torch.testing.assert_close(narrow(x), x[:, -6:], rtol=0, atol=0)


def test_fresh_idres_layer_still_trains():
    layer = IdRes(10, 10)
    x = torch.randn(16, 10)
    ((layer(x) - 1.0) ** 2).mean().backward()
    assert layer.branch[-1].weight.grad.abs().sum() > 0


def test_fresh_idresnet_is_last_wp_features_of_ots():
    cfg = ModelConfig(w_r=16, d=4, normalization="position")
    net = IdResNet(cfg, mean=torch.full((3, 32, 32), 0.5), std=torch.full((3, 32, 32), 0.25))
    x = torch.rand(5, 3, 32, 32)
    want = net.ots(((x - 0.5) / 0.25).flatten(1))[:, -cfg.w_p:]
    torch.testing.assert_close(net(x), want)


def test_plain_layers_are_not_identity():
    net = IdResNet(ModelConfig(w_r=16, d=4, identity_init=False))
    h = torch.randn(4, 24)
    assert not torch.allclose(net.dec[0](h), h)


def test_shared_vs_unshared_parameter_counts():
    shared = IdResNet(ModelConfig(w_r=64, d=5, share_dec=True))
    unshared = IdResNet(ModelConfig(w_r=64, d=5, share_dec=False))
    width = 64 + 10
    per_dec = width * width + width
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(unshared) - n(shared) == 2 * per_dec
    assert len(shared.dec) == 1 and len(unshared.dec) == 3


def test_paper_sizes_and_rows():
    full = IdResNet(get_model_config("full").model)
    assert full.ots.out_features == 2048 + 30 and full.cl.out_dim == 30
    assert get_model_config("a").model.head == "logits" and not get_model_config("a").model.identity_init
    assert get_model_config("b").model.identity_init and not get_model_config("b").model.share_dec
    assert {"full", "a", "b", "c", "d", "e", "untrained"} <= set(MODELS)
    # every row differs from FULL in what Table 2 says, and so hashes to its own checkpoint
    assert len({MODELS[m].config_hash() for m in MODELS}) == len(MODELS)


def test_noise_only_when_asked():
    net = IdResNet(ModelConfig(w_r=8, d=2))
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(net(x), net(x))
    assert not torch.allclose(net(x), net(x, noise=True))


def test_branch_depth_configurable():
    net = IdResNet(ModelConfig(w_r=8, d=2, branch_depth=3))
    assert sum(isinstance(m, torch.nn.Linear) for m in net.dec[0].modules()) == 3
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(net(x), net.ots(net.normalise(x).flatten(1))[:, -4:])


def test_bad_config_rejected():
    from robustbench_knn.config import UsageError

    with pytest.raises(UsageError):
        IdResNet(ModelConfig(head="softmax"))


def _image_net() -> IdResNet:
    return IdResNet(ModelConfig(w_r=16, d=4, normalization="image"))


def test_per_image_normalisation_has_mean_0_std_1_per_image():
    x = torch.rand(6, 3, 32, 32) * 0.5 + torch.rand(6, 1, 1, 1) * 0.5  # images of different brightness
    z = _image_net().normalise(x).flatten(1)
    torch.testing.assert_close(z.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(6), atol=1e-5, rtol=0)


def test_per_image_normalisation_ignores_brightness_and_contrast():
    x = torch.rand(3, 3, 32, 32) * 0.5
    net = _image_net()
    torch.testing.assert_close(net.normalise(x), net.normalise(0.2 + 1.5 * x), atol=1e-5, rtol=0)


def test_constant_image_gives_finite_outputs_and_gradients():
    net = _image_net()
    x = torch.full((2, 3, 32, 32), 0.5, requires_grad=True)
    z = net.normalise(x)
    assert torch.equal(z, torch.zeros_like(z))
    out = net(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_per_image_normalisation_is_differentiable_in_pixel_units():
    # the gradient w.r.t. the [0, 1] image matches finite differences: attacks and eps stay in pixel units
    net = _image_net().double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: net.normalise(t)[0, :, :2, :2].sum() + net.normalise(t).pow(3).sum(),
                                    (x,), eps=1e-6, atol=1e-5)


def test_unknown_normalisation_is_rejected():
    from robustbench_knn.config import UsageError

    with pytest.raises(UsageError, match="normalization"):
        IdResNet(ModelConfig(w_r=16, d=4, normalization="batch"))
