"""ICDNet structure, custom operators, loss gradients and optimiser multipliers."""
import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from icd.checkpoint import release_keys
from icd.model import CAMNet, ICDNet, named_losses, ops
from icd.model.losses import top_down_warmup

RELEASE_KEYS = {  # docs/release.md section 2, full width, 20 classes
    **{f"arg:conv{b}_{i}_{t}": s for b, n, c_in, c in
       ((1, 2, 3, 64), (2, 2, 64, 128), (3, 3, 128, 256), (4, 3, 256, 512), (5, 3, 512, 512))
       for i in range(1, n + 1)
       for t, s in (("weight", (c, c_in if i == 1 else c, 3, 3)), ("bias", (c,)))},
    "arg:fc6_weight": (1024, 512, 3, 3), "arg:fc6_bias": (1024,),
    "arg:fc7_weight": (1024, 1024, 1, 1), "arg:fc7_bias": (1024,),
    "arg:fc8_weight": (20, 1024, 1, 1), "arg:fc8_bias": (20,),
    "arg:fc6_ft_weight": (1024, 512, 3, 3), "arg:fc6_ft_bias": (1024,),
    "arg:fc7_ft_weight": (1024, 1024, 1, 1), "arg:fc7_ft_bias": (1024,),
    "arg:conv_ft_weight": (20, 2560, 1, 1),
    "arg:feat_bn_gamma": (512,), "arg:feat_bn_beta": (512,), "arg:icd_bu_weight": (20, 512),
    "aux:feat_bn_moving_mean": (512,), "aux:feat_bn_moving_var": (512,),
    "aux:icd_accum_resign_moving_mean": (20, 2),
}


def small_net(**kwargs):
    net = ICDNet(num_classes=4, width=0.125, dropout=0.0, **kwargs)
    net.initialize(mx.init.Xavier(magnitude=2))
    return net


def test_full_width_parameter_names_and_shapes_equal_release_keys():
    keys = release_keys(ICDNet())
    assert keys == RELEASE_KEYS


@pytest.mark.parametrize("size, feature", [(321, 41), (513, 65), (64, 8)])
def test_feature_resolution(size, feature):
    net = CAMNet(num_classes=3, width=0.0625)
    net.initialize()
    x_cam, _ = net(mx.nd.zeros((1, 3, size, size)), mx.nd.zeros((1, 3)))
    assert x_cam.shape == (1, 3, feature, feature)


def test_release_optimiser_multipliers():
    params = ICDNet(num_classes=4, width=0.125).collect_params()
    lr10 = {n for n, p in params.items() if p.lr_mult == 10}
    assert lr10 == {"fc8_weight", "fc8_bias", "conv_ft_weight"}
    decayed = {n for n, p in params.items() if p.wd_mult == 1}
    assert "feat_bn_gamma" in decayed and "icd_bu_weight" in decayed
    assert not any(n.endswith(("_bias", "_beta", "_mean", "_var")) for n in decayed)
    assert params["feat_bn_gamma"].grad_req == "write"


def test_warmup_counts_down_from_w():
    W = 4
    assert top_down_warmup(0, W) == pytest.approx(math.exp(-10))
    assert top_down_warmup(W - 1, W) == pytest.approx(math.exp(-10 / W))
    assert top_down_warmup(W, W) == 1.0 and top_down_warmup(100, W) == 1.0
    assert top_down_warmup(0, 0) == 1.0


def sign_flip(s_hat, cam, label, stored, is_train):
    """Run the sign-flip operator once; returns (S, stored after)."""
    aux = mx.nd.array(stored)
    sym = mx.sym.Custom(mx.sym.var("s"), mx.sym.var("c"), mx.sym.var("y"), mx.sym.var("m"),
                        op_type="icd_sign_flip", share_key="test")
    exe = sym.bind(mx.cpu(), {"s": mx.nd.array(s_hat), "c": mx.nd.array(cam),
                              "y": mx.nd.array(label)}, aux_states={"m": aux})
    out = exe.forward(is_train=is_train)[0].asnumpy()
    return out, exe.aux_dict["m"].asnumpy()


def test_sign_flip_moving_mean_and_signs():
    s_hat = np.array([[[[1.0, -2.0]], [[3.0, -1.0]], [[0.5, 0.5]]]], np.float32)  # (1,3,1,2)
    cam = np.array([[[[0.0, 4.0]], [[2.0, -5.0]], [[1.0, 1.0]]]], np.float32)
    label = np.array([[1, 1, 0]], np.float32)                       # class 2 absent
    stored = np.array([[0.0, 0.0], [0.0, 0.0], [0.1, 0.3]], np.float32)
    S, after = sign_flip(s_hat, cam, label, stored, is_train=True)
    # class 0: camP = 0, camQ = 4 -> stored (0, 0.4) -> sign -1; class 1: (0.2, 0) -> +1
    np.testing.assert_allclose(after, [[0.0, 0.4], [0.2, 0.0], [0.1, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(S, s_hat * np.array([-1, 1, -1]).reshape(1, 3, 1, 1))
    # inference: no update, ties give +1
    S, after = sign_flip(s_hat, cam, label, np.zeros((3, 2), np.float32), is_train=False)
    np.testing.assert_array_equal(after, 0)
    np.testing.assert_array_equal(S, s_hat)


def reference_refine(S, sp, y):
    """Section 3.3 with loops, for H == h (hard memberships) and K = max id + 1."""
    n_img, C, h, w = S.shape
    out = np.zeros_like(S)
    for n in range(n_img):
        X = S[n] * y[n][:, None, None]
        for k in range(int(sp[n].max()) + 1):
            m = sp[n] == k
            if not m.any():
                continue
            capable = any((np.sign(X[c][m])).sum() > 1e-5 for c in range(C))
            norm = np.maximum(X, 0) / np.maximum(X.max(axis=0), 1e-5)
            winner = int(np.argmax([norm[c][m].mean() for c in range(C)]))
            for c in range(C):
                fg = capable and c == winner and y[n, c] > 0
                out[n, c][m] = np.maximum(X[c][m], 0).mean() if fg else np.minimum(X[c][m], 0).mean()
    return out


def test_superpixel_pool_matches_reference_and_fixed_bound():
    rng = np.random.RandomState(0)
    S = rng.randn(2, 3, 6, 6).astype(np.float32)
    sp = rng.randint(0, 5, (2, 6, 6)).astype(np.float32)
    y = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    ref = reference_refine(S, sp, y)
    for num_ids in (5, 65):   # release K = max id + 1, ours a fixed bound
        ours = ops.superpixel_pool(mx.nd.array(S), mx.nd.array(sp), mx.nd.array(y), num_ids)
        np.testing.assert_allclose(ours.asnumpy(), ref, rtol=1e-5, atol=1e-6)


def test_losses_route_gradients_like_the_release():
    """Each named loss (named_losses) reaches the parameters the release's operator of that
    name reaches: the names are the values' own, not an order to remember."""
    net = small_net()
    x = mx.nd.random.uniform(0, 255, (2, 3, 48, 48))
    sp = mx.nd.array(np.random.RandomState(1).randint(0, 9, (2, 48, 48)))
    y = mx.nd.array([[1, 0, 0, 0], [0, 1, 1, 0]])
    grads = {}
    assert net.loss_names == ("cam_loss", "bu_loss", "td_loss")
    for name in net.loss_names:   # backward through one loss at a time
        with autograd.record():
            loss = named_losses(net, net(x, sp, y, mx.nd.array([1.0]))[-1])[name]
        loss.backward()
        grads[name] = {n: p.grad().abs().sum().asscalar()
                       for n, p in net.collect_params().items() if p.grad_req != "null"}
    # L_bu reaches only the directional vectors; L_cam and L_td never reach them
    assert [n for n, g in grads["bu_loss"].items() if g > 0] == ["icd_bu_weight"]
    assert grads["cam_loss"]["icd_bu_weight"] == 0 and grads["td_loss"]["icd_bu_weight"] == 0
    assert grads["cam_loss"]["conv_ft_weight"] == 0 and grads["td_loss"]["fc8_weight"] == 0
    assert grads["td_loss"]["conv1_1_weight"] > 0 and grads["cam_loss"]["conv1_1_weight"] > 0


def test_the_cam_only_network_names_its_one_loss():
    net = CAMNet(num_classes=4, width=0.125, dropout=0.0)
    net.initialize(mx.init.Xavier(magnitude=2))
    x_cam, loss = net(mx.nd.random.uniform(0, 255, (2, 3, 32, 32)),
                      mx.nd.array([[1, 0, 0, 0], [0, 1, 1, 0]]))
    assert list(named_losses(net, loss)) == ["cam_loss"]
    assert named_losses(net, loss)["cam_loss"].asscalar() == loss.asscalar()
    with pytest.raises(ValueError, match=r"CAMNet: 3 loss values for the names \('cam_loss',\)"):
        named_losses(net, mx.nd.zeros((3,)))


@pytest.mark.parametrize("option", [dict(bottom_up_features=f) for f in
                                    ("conv4", "fc6", "concat")]
                         + [dict(top_down_structure=t) for t in "abd"]
                         + [dict(bottom_up_variant=v) for v in ("abs", "sig")])
def test_ablation_variants_build_and_step(option):
    net = small_net(**option)
    net.hybridize()
    with autograd.record():
        out = net(mx.nd.random.uniform(0, 255, (2, 3, 32, 32)), mx.nd.zeros((2, 32, 32)),
                  mx.nd.array([[1, 0, 0, 0], [0, 0, 1, 0]]), mx.nd.array([0.5]))
    out[-1].backward()
    assert out[3].shape == (2, 4, 4, 4)
    assert np.isfinite(out[-1].asnumpy()).all()
    assert net.icd_bu_weight.grad().abs().sum().asscalar() > 0


def test_bad_model_options_are_named():
    with pytest.raises(ValueError, match="top-down structure 'e'"):
        ICDNet(top_down_structure="e")
    with pytest.raises(ValueError, match="bottom-up loss 'l2'"):
        ICDNet(bottom_up_variant="l2")
