"""The ablation variants of Tables 4-6 against their equations, forward and gradient.

One training forward/backward of a small ICDNet per variant, compared with a float64 numpy
reference written from the paper (Eqs. 1-3, 5, 7, 8-10) and the release's scaling
(docs/release.md sections 3.1, 3.4):
- features (Table 5): the conv4_3 / conv5_3 / fc6 maps come from the release's graph written
  with mx.sym (symbols/icd_symbol.py), not from ICDNet, then through BatchNorm in numpy;
- bottom-up losses (Table 4): the gradient on the raw directional vectors w_hat is the finite
  difference of the paper's loss of w_hat (through Eq. 2) times the release's factor;
- top-down structures (Table 6): S'' from numpy convolutions of the structure, and the gradient
  of every parameter the branch trains is compared with finite differences of the release's L_td
  along random directions (full finite differences for feat_bn's beta).
A sign slip in any variant's formula or a wrong feature / structure fails these tests.
"""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from icd.model import ICDNet
from symbols.icd_symbol import get_symbol

NUM_CLASSES, WIDTH, SIZE = 4, 1 / 16, 64      # 32 conv channels, 64 fc channels, 8x8 maps
# one class per image except image 2 (two classes: the release skips it in L_bu)
LABELS = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], np.float64)
WARM = 0.5
BN_EPS = 1e-5
# release gradient on w = FACTOR * N * dL/dw of the paper's loss (its mean 1/(N H W) replaced by
# 10/(h w) summed over the batch; L_bu's gradient without the factor 2 of d(s^2)/ds)
RELEASE_FACTOR = {"bu": 5.0, "abs": 10.0, "sig": 10.0}
FD_STEP = 1e-6


def make_net(**options):
    """A width-1/16 ICDNet (no dropout), hybridized as in training, with a non-zero BN beta."""
    mx.random.seed(7)
    net = ICDNet(num_classes=NUM_CLASSES, width=WIDTH, dropout=0.0, **options)
    net.initialize(mx.init.Xavier(magnitude=2))
    net.feat_bn.beta.set_data(mx.nd.array(np.random.RandomState(5).randn(
        *net.feat_bn.beta.shape) * 0.3))
    net.hybridize()
    return net


def batch():
    rng = np.random.RandomState(3)
    data = rng.uniform(0, 255, (len(LABELS), 3, SIZE, SIZE)).astype(np.float32)
    # 9 regions per image: each pixel takes the id of its nearest of 9 random centres
    centres = rng.uniform(0, SIZE, (len(LABELS), 9, 2))
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"), axis=-1)
    distance = ((grid[None, :, :, None, :] - centres[:, None, None]) ** 2).sum(axis=-1)
    superpixel = distance.argmin(axis=-1).astype(np.float32)                 # (N, H, W)
    return data, superpixel


def step(net, part):
    """One training forward; backward through loss `part` (1: L_bu, 2: L_td) only.
    Returns the outputs (x_cam, S, S', S'') as float64 numpy arrays."""
    data, superpixel = batch()
    with autograd.record():
        out = net(mx.nd.array(data), mx.nd.array(superpixel), mx.nd.array(LABELS),
                  mx.nd.array([WARM]))
        loss = out[-1][part]
    loss.backward()
    return [o.asnumpy().astype(np.float64) for o in out[:4]]


def params64(net):
    return {name: p.data().asnumpy().astype(np.float64)
            for name, p in net.collect_params().items()}


def release_features(net):
    """conv4_3_relu, conv5_3_relu, fc6_relu (N, D, h, w) of the release's mx.sym graph with the
    net's parameters (inference mode: no dropout, and the backbone has no BatchNorm)."""
    internals = get_symbol(NUM_CLASSES, WIDTH, mode="infer", dropout=0.0).get_internals()
    group = mx.sym.Group([internals[f"{n}_output"]
                          for n in ("conv4_3_relu", "conv5_3_relu", "fc6_relu")])
    values = {k: p.data() for k, p in net.collect_params().items()}
    args = {name: values[name] for name in group.list_arguments() if name != "data"}
    outs = group.eval(ctx=mx.cpu(), data=mx.nd.array(batch()[0]), **args)
    return dict(zip(("conv4", "conv5", "fc6"), (o.asnumpy().astype(np.float64) for o in outs)))


def normalized(x):
    """feat_bn in training: batch statistics (biased variance), gamma fixed at 1, without beta."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + BN_EPS)


def bottom_up_input(features, which):
    """Table 5: the features the directional vectors act on, concat = [conv4, conv5, fc6]."""
    if which == "concat":
        return np.concatenate([features["conv4"], features["conv5"], features["fc6"]], axis=1)
    return features[which]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bce(logits, target):
    """-(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x)))."""
    return np.logaddexp(0, logits) - target * logits


def projections(w_hat, f):
    """Eqs. 2-3: S_hat[n, c, k] = w_c . f[n, :, k] with w_c = w_hat_c / ||w_hat_c||."""
    w = w_hat / np.linalg.norm(w_hat, axis=1, keepdims=True)
    return np.einsum("cd,ndhw->nchw", w, f)


def paper_bottom_up_loss(w_hat, f, label, variant, pseudo_label=None):
    """L_bu (Eq. 1), L_abs (Eq. 8) or L_sig (Eqs. 9-10) as functions of the raw w_hat, over the
    single-class images only (release: rows with label sum >= 1.001 are zeroed).
    `pseudo_label`: Y of Eq. 9, held fixed (an online target, not differentiated)."""
    n, _, h, w = f.shape
    s = projections(w_hat, f)
    y = label * (label.sum(axis=1, keepdims=True) < 1.001)
    if variant == "bu":
        per_pixel = -s ** 2
    elif variant == "abs":
        per_pixel = -np.abs(s)
    else:
        per_pixel = bce(s, pseudo_label)
    return (y[:, :, None, None] * per_pixel).sum() / (n * h * w)


def numerical_gradient(func, x, step=FD_STEP):
    """Central differences of the scalar func at x, every entry (float64)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += step
        minus[i] -= step
        grad[i] = (func(plus) - func(minus)) / (2 * step)
    return grad


@pytest.mark.parametrize("features, variant", [
    ("conv5", "bu"), ("conv5", "abs"), ("conv5", "sig"),        # Table 4
    ("conv4", "bu"), ("fc6", "bu"), ("concat", "bu"),           # Table 5
    ("concat", "sig")])
def test_bottom_up_variant_forward_and_gradient(features, variant):
    net = make_net(bottom_up_features=features, bottom_up_variant=variant)
    before = params64(net)
    _, S, _, _ = step(net, part=1)
    x = bottom_up_input(release_features(net), features)
    f = normalized(x) + before["feat_bn_beta"].reshape(1, -1, 1, 1)
    assert f.shape[1] == before["icd_bu_weight"].shape[1]
    # forward, Eqs. 3 and 5: S = S_hat * sign_c, sign_c read from the moving mean after the update
    stored = net.icd_accum_resign_moving_mean.data().asnumpy()
    sign = np.where(stored[:, 0] >= stored[:, 1], 1.0, -1.0).reshape(1, -1, 1, 1)
    s_hat = projections(before["icd_bu_weight"], f)
    np.testing.assert_allclose(S, s_hat * sign, rtol=1e-4, atol=1e-4 * np.abs(s_hat).max())
    # gradient on w_hat: the paper's loss differentiated numerically, at the release's scale
    pseudo_label = (s_hat > 0).astype(np.float64)                       # Eq. 9
    expected = RELEASE_FACTOR[variant] * len(LABELS) * numerical_gradient(
        lambda w_hat: paper_bottom_up_loss(w_hat, f, LABELS, variant, pseudo_label),
        before["icd_bu_weight"])
    grad = net.icd_bu_weight.grad().asnumpy()
    assert np.abs(expected).max() > 0 and not expected[1].any()    # class 1: multi-class only
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def conv(x, weight, bias=None, relu=False):
    """Convolution (N, I, h, w) x (O, I, k, k) with pad (k - 1) / 2, stride 1, optional ReLU."""
    k = weight.shape[2]
    pad = (k - 1) // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, w = x.shape[2:]
    out = sum(np.einsum("oi,nihw->nohw", weight[:, :, i, j], padded[:, :, i:i + h, j:j + w])
              for i in range(k) for j in range(k))
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return np.maximum(out, 0) if relu else out


def top_down_logits(p, f, structure):
    """S'' of Table 6: a) conv_ft on the BN features; b) on fc7_ft(fc6_ft(f)); c) on
    [f, fc6_ft, fc7_ft]; d) as c) with the CAM branch's fc6 / fc7 (shared parameters)."""
    if structure == "a":
        return conv(f, p["conv_ft_weight"])
    prefix = "fc{}_" if structure == "d" else "fc{}_ft_"
    fc6 = conv(f, p[prefix.format(6) + "weight"], p[prefix.format(6) + "bias"], relu=True)
    fc7 = conv(fc6, p[prefix.format(7) + "weight"], p[prefix.format(7) + "bias"], relu=True)
    if structure == "b":
        return conv(fc7, p["conv_ft_weight"])
    return conv(np.concatenate([f, fc6, fc7], axis=1), p["conv_ft_weight"])


def release_top_down_loss(logits, refined, label, warm):
    """Eq. 7 at the release's scale: y * [|Z| > 0.2] * warm / (h w) * BCE(S'', B), summed over
    the batch, with Z the per-(n, c) normalised S' and B = Z > 0 (Eq. 6); S' is a target."""
    h, w = refined.shape[2:]
    top = np.maximum(refined.max(axis=(2, 3), keepdims=True), 1e-5)
    bottom = -np.minimum(refined.min(axis=(2, 3), keepdims=True), -1e-5)
    z = np.maximum(refined, 0) / top + np.minimum(refined, 0) / bottom
    weight = label[:, :, None, None] * (np.abs(z) > 0.2) * warm / (h * w)
    return (weight * bce(logits, (z > 0).astype(np.float64))).sum()


TRAINED_BY_TOP_DOWN = {
    "a": ("conv_ft_weight",),
    "b": ("conv_ft_weight", "fc6_ft_weight", "fc6_ft_bias", "fc7_ft_weight", "fc7_ft_bias"),
    "c": ("conv_ft_weight", "fc6_ft_weight", "fc6_ft_bias", "fc7_ft_weight", "fc7_ft_bias"),
    "d": ("conv_ft_weight", "fc6_weight", "fc6_bias", "fc7_weight", "fc7_bias")}


@pytest.mark.parametrize("structure", "abcd")
def test_top_down_structure_forward_and_gradient(structure):
    net = make_net(top_down_structure=structure)
    before = params64(net)
    assert ("fc6_ft_weight" in before) == (structure in "bc")
    _, _, refined, logits = step(net, part=2)
    xhat = normalized(release_features(net)["conv5"])

    def loss(p):
        f = xhat + p["feat_bn_beta"].reshape(1, -1, 1, 1)
        return release_top_down_loss(top_down_logits(p, f, structure), refined, LABELS, WARM)

    # forward: S'' of the structure on the BN features
    f = xhat + before["feat_bn_beta"].reshape(1, -1, 1, 1)
    expected_logits = top_down_logits(before, f, structure)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4,
                               atol=1e-4 * np.abs(expected_logits).max())
    assert loss(before) > 0
    # gradient of every parameter the branch trains, along random directions
    rng = np.random.RandomState(11)
    for name in TRAINED_BY_TOP_DOWN[structure]:
        grad = net.collect_params()[name].grad().asnumpy().astype(np.float64)
        assert np.abs(grad).max() > 0, name
        for _ in range(3):
            direction = rng.randn(*grad.shape)

            def along(t):
                return loss({**before, name: before[name] + t * direction})

            numeric = (along(FD_STEP) - along(-FD_STEP)) / (2 * FD_STEP)
            assert abs((grad * direction).sum() - numeric) <= 1e-3 * np.linalg.norm(grad), name
    # beta shifts the features every structure reads: full finite differences
    expected = numerical_gradient(lambda beta: loss({**before, "feat_bn_beta": beta}),
                                  before["feat_bn_beta"])
    np.testing.assert_allclose(net.feat_bn.beta.grad().asnumpy(), expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
