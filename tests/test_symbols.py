"""The release's graph (symbols/): each custom op against hand-written numpy, the checkpoint
listing, the optimiser semantics and the parity bundle format (docs/release.md sections 2-4)."""
import json
import os

import mxnet as mx
import numpy as np
import pytest

from symbols import ops
from symbols.bundle import (main as bundle_main, make_batch, make_bundle, make_params,
                            run_reference_steps)
from symbols.icd_symbol import DATA_NAMES, get_symbol


@pytest.fixture(autouse=True)
def fresh_sign_flip_store():
    """The reference's sign-flip store lives for the process, like the release's key-value
    store; every test starts from its graph's own aux state."""
    ops.reset_shared_store()
    yield
    ops.reset_shared_store()


def _nd(x):
    return mx.nd.array(np.asarray(x, np.float32))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# 3.1 ICD_BottomUp
# ---------------------------------------------------------------------------------------------

def test_bottom_up_gradient_only_into_raw_weight():
    rng = np.random.RandomState(0)
    n, c, c5, h, w = 3, 3, 4, 2, 3
    feat = rng.randn(n, c5, h, w)
    weight = rng.randn(c, c5)
    label = np.array([[0, 1, 0], [1, 0, 1], [0, 0, 0]], np.float32)  # single, multi, none
    w_norm = weight / np.sqrt((weight ** 2).sum(1, keepdims=True) + 1e-10)
    s_hat = np.einsum("kc,nchw->nkhw", w_norm, feat)
    inputs = [_nd(s_hat), _nd(feat), _nd(label), _nd(weight)]
    for x in inputs:
        x.attach_grad()
    with mx.autograd.record():
        out = mx.nd.Custom(*inputs, op_type="ref_icd_bottom_up", grad_scale=10.0)
    out.backward()
    np.testing.assert_allclose(out.asnumpy(), s_hat, rtol=1e-5, atol=1e-6)
    # hand-written: only image 0 (single class 1) contributes; g[c] = -(10/hw) sum_p D[c,p] F[:,p]
    g = np.zeros((c, c5))
    for p in np.ndindex(h, w):
        g[1] -= 10.0 / (h * w) * s_hat[0, 1][p] * feat[0, :, p[0], p[1]]
    expected = np.zeros((c, c5))
    for k in range(c):
        r = np.linalg.norm(weight[k])
        expected[k] = -weight[k] * weight[k].dot(g[k]) / (r ** 3 + 1e-5) + g[k] / (r + 1e-5)
    np.testing.assert_allclose(inputs[3].grad.asnumpy(), expected, rtol=1e-4, atol=1e-6)
    assert np.abs(expected[1]).max() > 0 and not expected[[0, 2]].any()
    for x in inputs[:3]:
        assert not x.grad.asnumpy().any()


def _consumers(sym):
    """{node name: [(consumer op, consumer name, input index)]} of a symbol's graph."""
    nodes = json.loads(sym.tojson())["nodes"]
    found = {}
    for node in nodes:
        for i, (src, _, _) in enumerate(node["inputs"]):
            found.setdefault(nodes[src]["name"], []).append((node["op"], node["name"], i))
    return found


def test_bottom_up_path_is_blocked_in_graph():
    """icd_bu_weight and the BN features reach the bottom-up path only through BlockGrad (plus
    the weight's raw input of ICD_BottomUp); the graph's icd_bu_weight gradient is section 3.1's."""
    sym = get_symbol(num_cls=3, width=1 / 32, mode="train", dropout=0.0, warmup_iters=0)
    users = _consumers(sym)
    assert sorted(users["icd_bu_weight"]) == [("BlockGrad", "icd_bu_weight_fixed", 0), ("Custom", "icd_bu", 3)]
    assert ("BlockGrad", "icd_bu_feat", 0) in users["feat_bn"]
    assert {name for _, name, _ in users["icd_bu_feat"]} == {"icd_bu_conv", "icd_bu"}

    internals = sym.get_internals()
    probe = mx.sym.Group([sym, internals["feat_bn_output"], internals["icd_bu_output"]])
    exe = probe.simple_bind(mx.cpu(), data=(2, 3, 32, 32), superpixel=(2, 32, 32), label=(2, 3))
    rng = np.random.RandomState(1)
    for name, arr in exe.arg_dict.items():
        arr[:] = rng.normal(0, 0.3, arr.shape)
    exe.arg_dict["data"][:] = rng.uniform(120, 134, (2, 3, 32, 32))
    exe.arg_dict["superpixel"][:] = np.repeat(np.arange(4), 256).reshape(32, 32)[None]
    exe.arg_dict["label"][:] = [[0, 1, 0], [1, 1, 0]]
    exe.aux_dict["feat_bn_moving_var"][:] = 1
    outs = exe.forward(is_train=True)
    exe.backward([mx.nd.zeros(o.shape) for o in outs])
    feat, s_hat = outs[3].asnumpy(), outs[4].asnumpy()
    # forward: 1x1 conv with MXNet's L2Normalization (instance, eps 1e-10) of the weight
    weight = exe.arg_dict["icd_bu_weight"].asnumpy()
    w_norm = weight / np.sqrt((weight ** 2).sum(axis=1, keepdims=True) + 1e-10)
    np.testing.assert_allclose(s_hat, np.einsum("kc,nchw->nkhw", w_norm, feat), rtol=1e-4, atol=1e-5)
    expected = ops.bottom_up_weight_grad(s_hat, feat, exe.arg_dict["label"].asnumpy(), weight)
    np.testing.assert_allclose(exe.grad_dict["icd_bu_weight"].asnumpy(), expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 3.2 AccumResign
# ---------------------------------------------------------------------------------------------

def _resign(s_hat, x_cam, label, moving_mean, key, train=True):
    args = [_nd(s_hat), _nd(x_cam), _nd(label), moving_mean]
    if train:
        with mx.autograd.train_mode():
            out = mx.nd.Custom(*args, op_type="ref_icd_accum_resign", store_key=key)
    else:
        out = mx.nd.Custom(*args, op_type="ref_icd_accum_resign", store_key=key)
    return out.asnumpy()


def test_accum_resign_update_absent_classes_ties_and_sign_after_update():
    key = "test_resign_single"
    ops.reset_shared_store(key)
    # classes: 0 present (flips to -1 by this batch's own update), 1 absent (kept, -1), 2 absent tie
    stored = np.array([[0.30, 0.25], [0.1, 0.4], [0.0, 0.0]], np.float32)
    s_hat = np.zeros((1, 3, 2, 2), np.float32)
    s_hat[0, 0] = [[1, -1], [-2, 0]]  # P = {(0,0)}, Q = {(0,1), (1,0)}
    s_hat[0, 1] = [[1, 1], [1, 1]]
    s_hat[0, 2] = [[-1, 2], [3, 4]]
    x_cam = np.zeros((1, 3, 2, 2), np.float32)
    x_cam[0, 0] = [[0.5, 2.0], [-3.0, 7.0]]
    label = np.array([[1, 0, 0]], np.float32)
    moving_mean = _nd(stored)
    out = _resign(s_hat, x_cam, label, moving_mean, key)
    # class 0: camP = 0.5, camQ = (2 + 0)/2 = 1 -> stored 0.9*[0.30,0.25] + 0.1*[0.5,1] = [0.32, 0.325]
    expected = np.array([[0.32, 0.325], [0.1, 0.4], [0.0, 0.0]])
    np.testing.assert_allclose(ops.shared_moving_mean(key), expected, rtol=1e-6)
    np.testing.assert_allclose(moving_mean.asnumpy(), expected, rtol=1e-6)
    sign = np.array([-1, -1, 1])  # before the update class 0 would have been +1
    np.testing.assert_array_equal(out, s_hat * sign[None, :, None, None])

    # inference: the sign comes from the aux state, nothing is updated
    aux = _nd([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    out = _resign(s_hat, x_cam, label, aux, key, train=False)
    np.testing.assert_array_equal(out, s_hat * np.array([-1, 1, 1])[None, :, None, None])
    np.testing.assert_array_equal(aux.asnumpy(), [[0, 1], [1, 0], [2, 2]])
    np.testing.assert_allclose(ops.shared_moving_mean(key), expected, rtol=1e-6)
    ops.reset_shared_store(key)


def test_accum_resign_shared_store_updated_once_per_device():
    """Two devices' slices update one store in call order (section 3.2); the second device's
    aux state is initialised from nothing: the store, not its aux, is used."""
    key = "test_resign_shared"
    ops.reset_shared_store(key)
    rng = np.random.RandomState(3)
    s_hat = rng.randn(4, 2, 3, 3).astype(np.float32)
    x_cam = rng.randn(4, 2, 3, 3).astype(np.float32)
    label = np.array([[1, 0], [1, 1], [0, 1], [1, 0]], np.float32)
    start = np.array([[0.2, 0.1], [0.0, 0.5]], np.float32)
    aux0, aux1 = _nd(start), _nd(start)
    _resign(s_hat[:2], x_cam[:2], label[:2], aux0, key)
    out1 = _resign(s_hat[2:], x_cam[2:], label[2:], aux1, key)

    def hand_update(stored, s, x, y):
        new = stored.astype(np.float64).copy()
        for c in range(s.shape[1]):
            if y[:, c].sum() == 0:
                continue
            cur = []
            for mask in (s[:, c] > 0, s[:, c] < 0):
                per_image = [(np.maximum(x[i, c], 0) * mask[i]).sum() / max(mask[i].sum(), 1e-5)
                             for i in range(len(s))]
                cur.append(sum(p * y[i, c] for i, p in enumerate(per_image)) / y[:, c].sum())
            new[c] = 0.9 * stored[c] + 0.1 * np.array(cur)
        return new

    once = hand_update(start, s_hat[:2], x_cam[:2], label[:2])
    twice = hand_update(once, s_hat[2:], x_cam[2:], label[2:])
    np.testing.assert_allclose(aux0.asnumpy(), once, rtol=1e-5)
    np.testing.assert_allclose(ops.shared_moving_mean(key), twice, rtol=1e-5)
    np.testing.assert_allclose(aux1.asnumpy(), twice, rtol=1e-5)
    sign = np.where(twice[:, 0] >= twice[:, 1], 1, -1)
    np.testing.assert_allclose(out1, s_hat[2:] * sign[None, :, None, None], rtol=1e-6)
    ops.reset_shared_store(key)


def test_accum_resign_absent_class_pushes_the_devices_own_copy():
    """Section 3.2: for a class absent from its slice a device pushes its own aux copy, so the
    shared store moves 10% toward that copy (not 'unchanged', the former reading)."""
    key = "test_resign_own_copy"
    ops.reset_shared_store(key)
    rng = np.random.RandomState(4)
    s_hat, x_cam = rng.randn(2, 2, 3, 3).astype(np.float32), rng.randn(2, 2, 3, 3).astype(np.float32)
    label = np.array([[1, 1], [1, 0]], np.float32)    # class 1 only on device 0
    start = np.array([[0.2, 0.1], [0.3, 0.5]], np.float32)
    stale = np.array([[0.0, 0.0], [0.9, 0.1]], np.float32)   # device 1's own copy
    aux0, aux1 = _nd(start), _nd(stale)
    _resign(s_hat[:1], x_cam[:1], label[:1], aux0, key)
    after0 = ops.shared_moving_mean(key)
    _resign(s_hat[1:], x_cam[1:], label[1:], aux1, key)
    final = ops.shared_moving_mean(key)
    np.testing.assert_allclose(final[1], 0.9 * after0[1] + 0.1 * stale[1], rtol=1e-6)
    np.testing.assert_allclose(aux1.asnumpy(), final, rtol=1e-6)
    assert np.abs(final[1] - after0[1]).max() > 1e-2   # moved, toward the stale copy
    ops.reset_shared_store(key)


# ---------------------------------------------------------------------------------------------
# 3.3 SPRefine
# ---------------------------------------------------------------------------------------------

def _sp_refine(s, superpixel, label):
    return mx.nd.Custom(_nd(s), _nd(superpixel), _nd(label), op_type="ref_icd_sp_refine").asnumpy()


def test_sp_refine_hand_example_1x1x4x4():
    # ids 0 (left half) and 2 (right half); id 1 is empty (K = 3)
    superpixel = np.array([[0, 0, 2, 2]] * 4, np.float32)[None]
    s = np.array([[1, 2, -1, -2],
                  [3, -2, -1, -1],
                  [1, 1, -4, 3],
                  [1, 1, -2, -1]], np.float32)[None, None]
    # left: sum sign = 6 > 0 -> foreground-capable, class 0 -> mean max(X,0) = 10/8
    # right: sum sign = -6 -> not capable -> background, mean min(X,0) = -12/8 (the +3 is ignored)
    expected = np.array([[1.25, 1.25, -1.5, -1.5]] * 4)[None, None]
    np.testing.assert_allclose(_sp_refine(s, superpixel, [[1]]), expected, rtol=1e-6)
    # the class is absent from the image: X = 0 everywhere
    assert not _sp_refine(s, superpixel, [[0]]).any()


def test_sp_refine_two_classes_argmax_and_capable_rule():
    superpixel = np.zeros((1, 2, 2), np.float32)
    s = np.array([[[2, -1], [1, 0]], [[1, 3], [-1, -1]]], np.float32)[None]
    # per-pixel max_c X = [2, 3, 1, max(0, 1e-5)]; class 0 mean of norm = (1+0+1+0)/4 = 0.5,
    # class 1 = (0.5+1+0+0)/4 = 0.375 -> class 0 is fg (mean max = 0.75), class 1 bg (mean min = -0.5)
    expected = np.array([[[0.75] * 2] * 2, [[-0.5] * 2] * 2])[None]
    np.testing.assert_allclose(_sp_refine(s, superpixel, [[1, 1]]), expected, rtol=1e-6)
    # only class 1 present: sum sign(X) = 1+1-1-1 = 0 is not > 1e-5 -> not capable -> all background
    expected = np.array([[[0] * 2] * 2, [[-0.5] * 2] * 2])[None]
    np.testing.assert_allclose(_sp_refine(s, superpixel, [[0, 1]]), expected, rtol=1e-6)


def test_sp_refine_resized_membership_is_mxnet_bilinear():
    rng = np.random.RandomState(4)
    superpixel = rng.randint(0, 5, (1, 8, 8)).astype(np.float32)
    a = ops.superpixel_membership(superpixel, 3, 3)
    onehot = (superpixel[:, None] == np.arange(5)[None, :, None, None]).astype(np.float32)
    resized = mx.nd.contrib.BilinearResize2D(_nd(onehot), height=3, width=3, align_corners=True).asnumpy()
    np.testing.assert_array_equal(a, resized.reshape(1, 5, 9))
    # align_corners: the corner pixels keep their exact ids; memberships sum to one per pixel
    assert a[0, int(superpixel[0, 0, 0]), 0] == 1 and a[0, int(superpixel[0, 7, 7]), 8] == 1
    np.testing.assert_allclose(a.sum(axis=1), 1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3.4 ICD_TopDown, 3.5 MultiSigmoidLoss
# ---------------------------------------------------------------------------------------------

def _top_down_executor(warmup_iters, shape):
    logits, refined, label = mx.sym.var("logits"), mx.sym.var("refined"), mx.sym.var("label")
    sym = mx.sym.Custom(logits, refined, label, op_type="ref_icd_top_down", warmup_iters=warmup_iters)
    return sym.simple_bind(mx.cpu(), logits=shape, refined=shape, label=shape[:2])


def test_top_down_mask_target_and_warmup_sequence():
    logits = np.array([[[[0.5, -1.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]], np.float32)
    refined = np.array([[[[4.0, 0.5], [-1.0, -0.1]], [[1.0, 1.0], [-1.0, 1.0]]]], np.float32)
    label = np.array([[1, 0]], np.float32)
    # class 0: Z = [4/4, 0.5/4, -1/1, -0.1/1] = [1, 0.125, -1, -0.1]; mask = [1, 0, 1, 0]
    prob = _sigmoid(logits)
    base = np.zeros_like(logits)
    base[0, 0] = [[prob[0, 0, 0, 0] - 1, 0], [prob[0, 0, 1, 0] - 0, 0]]
    base /= 4.0  # h*w; class 1 is absent from the label
    exe = _top_down_executor(3, logits.shape)
    exe.arg_dict["logits"][:] = logits
    exe.arg_dict["refined"][:] = refined
    exe.arg_dict["label"][:] = label
    # W = 3: counter 3, 2, 1 -> e^-10, e^(-20/3), e^(-10/3), then 1
    for warm in [np.exp(-10.0), np.exp(-20.0 / 3), np.exp(-10.0 / 3), 1.0, 1.0]:
        out = exe.forward(is_train=True)[0].asnumpy()
        np.testing.assert_allclose(out, prob, rtol=1e-6)
        exe.backward()
        np.testing.assert_allclose(exe.grad_dict["logits"].asnumpy(), base * warm, rtol=1e-5, atol=1e-12)
        assert not exe.grad_dict["refined"].asnumpy().any() and not exe.grad_dict["label"].asnumpy().any()
    exe = _top_down_executor(0, logits.shape)
    exe.arg_dict["logits"][:] = logits
    exe.arg_dict["refined"][:] = refined
    exe.arg_dict["label"][:] = label
    for _ in range(2):  # W = 0: warm is 1 from the first call
        exe.forward(is_train=True)
        exe.backward()
        np.testing.assert_allclose(exe.grad_dict["logits"].asnumpy(), base, rtol=1e-5)


def test_multi_sigmoid_loss_gradient():
    logits, label = _nd([[0.3, -2.0, 1.0]]), _nd([[1, 0, 1]])
    logits.attach_grad()
    with mx.autograd.record():
        out = mx.nd.Custom(logits, label, op_type="ref_multi_sigmoid_loss")
    out.backward()
    prob = _sigmoid(np.array([[0.3, -2.0, 1.0]]))
    np.testing.assert_allclose(out.asnumpy(), prob, rtol=1e-6)
    np.testing.assert_allclose(logits.grad.asnumpy(), prob - [[1, 0, 1]], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# section 2: checkpoint keys at full width; section 4: optimiser
# ---------------------------------------------------------------------------------------------

def _release_checkpoint_shapes(num_cls=20):
    shapes = {}
    cin = 3
    for name, cout in [("conv1_1", 64), ("conv1_2", 64), ("conv2_1", 128), ("conv2_2", 128),
                       ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), ("conv4_1", 512),
                       ("conv4_2", 512), ("conv4_3", 512), ("conv5_1", 512), ("conv5_2", 512),
                       ("conv5_3", 512), ("fc6", 1024)]:
        shapes["arg:%s_weight" % name] = (cout, cin, 3, 3)
        shapes["arg:%s_bias" % name] = (cout,)
        cin = cout
    shapes.update({"arg:fc7_weight": (1024, 1024, 1, 1), "arg:fc7_bias": (1024,),
                   "arg:fc8_weight": (num_cls, 1024, 1, 1), "arg:fc8_bias": (num_cls,),
                   "arg:fc6_ft_weight": (1024, 512, 3, 3), "arg:fc6_ft_bias": (1024,),
                   "arg:fc7_ft_weight": (1024, 1024, 1, 1), "arg:fc7_ft_bias": (1024,),
                   "arg:conv_ft_weight": (num_cls, 2560, 1, 1),
                   "arg:feat_bn_gamma": (512,), "arg:feat_bn_beta": (512,),
                   "arg:icd_bu_weight": (num_cls, 512),
                   "aux:feat_bn_moving_mean": (512,), "aux:feat_bn_moving_var": (512,),
                   "aux:icd_accum_resign_moving_mean": (num_cls, 2)})
    return shapes


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_full_width_parameters_match_release_checkpoint(mode):
    sym = get_symbol(num_cls=20, width=1.0, mode=mode)
    arg_shapes, out_shapes, aux_shapes = sym.infer_shape(data=(2, 3, 321, 321), superpixel=(2, 321, 321),
                                                         label=(2, 20))
    listing = {"arg:" + n: s for n, s in zip(sym.list_arguments(), arg_shapes) if n not in DATA_NAMES}
    listing.update({"aux:" + n: s for n, s in zip(sym.list_auxiliary_states(), aux_shapes)})
    assert listing == _release_checkpoint_shapes()
    if mode == "train":
        assert out_shapes == [(2, 20), (2, 20, 41, 41), (2, 20, 41, 41)]
    else:
        assert out_shapes == [(2, 20, 41, 41)] * 4


def test_module_sgd_semantics_one_step():
    """Section 4 in MXNet 1.9.1's Module: wd_mult 0 for names not ending in _weight/_gamma,
    lr_mult 10 for fc8_*/conv_ft_weight, rescale_grad 1/B, w1 = w0 - lr*lr_mult*(g/B + wd*wd_mult*w0)."""
    rng = np.random.RandomState(5)
    batch = make_batch(rng, 2, 3, 32)
    params = make_params(rng, 3, 1 / 16, batch)
    lr, wd = 0.01, 0.05
    mod = mx.mod.Module(get_symbol(3, 1 / 16, "train", dropout=0.0), data_names=DATA_NAMES, label_names=None)
    mod.bind(data_shapes=[(k, batch[k].shape) for k in DATA_NAMES])
    mod.init_params(arg_params={k[4:]: _nd(v) for k, v in params.items() if k.startswith("arg:")},
                    aux_params={k[4:]: _nd(v) for k, v in params.items() if k.startswith("aux:")})
    mod.init_optimizer(kvstore="device", optimizer="sgd",
                       optimizer_params={"learning_rate": lr, "momentum": 0.9, "wd": wd, "rescale_grad": 0.5})
    opt = mod._optimizer
    assert opt.lr_mult == {"fc8_weight": 10.0, "fc8_bias": 10.0, "conv_ft_weight": 10.0}
    no_decay = {n for n in mod._param_names if not (n.endswith("_weight") or n.endswith("_gamma"))}
    assert no_decay == {n for n, m in opt.wd_mult.items() if m == 0.0}
    assert "feat_bn_beta" in no_decay and "conv1_1_bias" in no_decay
    mod.forward(mx.io.DataBatch(data=[_nd(batch[k]) for k in DATA_NAMES]), is_train=True)
    mod.backward()
    grads = {n: g.asnumpy() for n, g in mod._exec_group.execs[0].grad_dict.items() if g is not None}
    mod.update()
    after, _ = mod.get_params()
    for name, lr_mult, wd_mult in [("fc8_bias", 10, 0), ("conv_ft_weight", 10, 1), ("conv1_1_bias", 1, 0),
                                   ("icd_bu_weight", 1, 1), ("feat_bn_gamma", 1, 1), ("fc6_weight", 1, 1)]:
        w0 = params["arg:" + name]
        if name == "feat_bn_gamma":
            w0 = np.ones_like(w0)  # fix_gamma: MXNet's BatchNorm forward writes gamma = 1
            assert not grads[name].any()
        expected = w0 - lr * lr_mult * (grads[name] * 0.5 + wd * wd_mult * w0)
        np.testing.assert_allclose(after[name].asnumpy(), expected, rtol=1e-5, atol=1e-8, err_msg=name)


# ---------------------------------------------------------------------------------------------
# bundles
# ---------------------------------------------------------------------------------------------

BUNDLE = dict(num_cls=5, width=0.0625, size=32, infer_size=40, batch_size=2, steps=3, warmup_iters=2)


def _read(out_dir):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    params = {k: v.asnumpy() for k, v in mx.nd.load(os.path.join(out_dir, "params.params")).items()}
    npz = {name: dict(np.load(os.path.join(out_dir, name + ".npz")))
           for name in ("batch", "infer", "expected")}
    return meta, params, npz


def test_bundle_format_determinism_and_signs(tmp_path):
    make_bundle(str(tmp_path / "a"), seed=7, **BUNDLE)
    bundle_main([str(tmp_path / "b"), "--seed", "7", "--num-cls", "5", "--width", "0.0625", "--size", "32",
                 "--infer-size", "40", "--batch-size", "2", "--steps", "3", "--warmup-iters", "2"])
    meta, params, npz = _read(str(tmp_path / "a"))
    for key in ("num_cls", "lr", "momentum", "wd", "batch_size", "steps", "warmup_iters", "dropout"):
        assert key in meta
    assert meta["dropout"] == 0 and meta["num_cls"] == 5 and meta["steps"] == 3

    n, c, size, infer_size, h, h_infer = 2, 5, 32, 40, 4, 5
    assert set(params) == set(_release_checkpoint_shapes(c))
    for name, shape in (("batch", size), ("infer", infer_size)):
        part = npz[name]
        assert set(part) == {"data", "superpixel", "label"}
        assert part["data"].shape == (n, 3, shape, shape) and part["data"].dtype == np.float32
        assert part["superpixel"].shape == (n, shape, shape) and part["superpixel"].max() < 64
        assert part["label"].shape == (n, c)
        assert 0 <= part["data"].min() and part["data"].max() <= 255
    sums = npz["batch"]["label"].sum(axis=1)
    assert (sums == 1).any() and (sums > 1).any()

    expected = npz["expected"]
    keys = {"infer/cam", "infer/icd_bu", "infer/icd_bu_sp", "infer/icd_td"}
    for k in range(3):
        keys |= {"train/step%d/%s" % (k, o) for o in ("cam_prob", "icd_bu", "icd_td_prob")}
        keys |= {"train/step%d/%s" % (k, p) for p in params}
        keys |= {"train/step%d/mom:%s" % (k, p[4:]) for p in params if p.startswith("arg:")}
    assert set(expected) == keys   # one device: no store: key (the store is the aux state)
    assert meta["num_devices"] == 1
    assert expected["train/step0/cam_prob"].shape == (n, c)
    assert expected["train/step0/icd_bu"].shape == expected["train/step0/icd_td_prob"].shape == (n, c, h, h)
    assert all(expected["infer/" + o].shape == (n, c, h_infer, h_infer)
               for o in ("cam", "icd_bu", "icd_bu_sp", "icd_td"))
    assert all(np.isfinite(v).all() for v in expected.values())
    # inference: S' is SPRefine of S on infer.npz
    np.testing.assert_allclose(expected["infer/icd_bu_sp"],
                               ops.sp_refine(expected["infer/icd_bu"], npz["infer"]["superpixel"],
                                             npz["infer"]["label"]), rtol=1e-5, atol=1e-6)
    for k in range(3):
        for p, start in params.items():
            assert expected["train/step%d/%s" % (k, p)].shape == start.shape
    # both signs of the flip occur at the start and after every step
    for stored in [params["aux:icd_accum_resign_moving_mean"]] + \
            [expected["train/step%d/aux:icd_accum_resign_moving_mean" % k] for k in range(3)]:
        plus = stored[:, 0] >= stored[:, 1]
        assert plus.any() and not plus.all()

    # same seed -> identical bundle
    meta_b, params_b, npz_b = _read(str(tmp_path / "b"))
    assert meta_b == meta
    assert all(np.array_equal(params[k], params_b[k]) for k in params)
    for name in npz:
        assert set(npz[name]) == set(npz_b[name])
        assert all(np.array_equal(npz[name][k], npz_b[name][k]) for k in npz[name])


def _conv5_mean(params, batch, num_cls, width):
    """Per-channel batch mean of conv5_3_relu (feat_bn's input) with ``params``."""
    probe = get_symbol(num_cls, width, "train", dropout=0.0).get_internals()["conv5_3_relu_output"]
    exe = probe.simple_bind(mx.cpu(), grad_req="null", data=batch["data"].shape)
    for name, array in exe.arg_dict.items():
        array[:] = batch["data"] if name == "data" else params["arg:" + name]
    return exe.forward(is_train=True)[0].asnumpy().mean(axis=(0, 2, 3))


def test_bundle_state_momentum_and_batchnorm_quirks():
    """Section 11. The state after step k is read after BatchNorm's backward (which updates the
    moving statistics): moving_mean_k = 0.9 moving_mean_{k-1} + 0.1 mean(conv5_3_relu). The
    momentum is each step's change, except feat_bn_gamma's: fix_gamma writes 1 into gamma at
    every forward, so gamma_k = 1 + mom_k and consecutive gammas do not give the momentum."""
    rng = np.random.RandomState(2)
    num_cls, width = 4, 0.0625
    batch = make_batch(rng, 2, num_cls, 32)
    params = make_params(rng, num_cls, width, batch)
    meta = dict(num_cls=num_cls, width=width, lr=0.01, momentum=0.9, wd=5e-4, steps=3,
                warmup_iters=1, dropout=0.0)
    result = run_reference_steps(params, batch, meta)
    before = params
    for k in range(3):
        after = {key: result["train/step%d/%s" % (k, key)] for key in params}
        mean = 0.9 * before["aux:feat_bn_moving_mean"] + 0.1 * _conv5_mean(before, batch, num_cls, width)
        np.testing.assert_allclose(after["aux:feat_bn_moving_mean"], mean, rtol=1e-4, atol=1e-6)
        assert not np.allclose(after["aux:feat_bn_moving_mean"], before["aux:feat_bn_moving_mean"])
        for key in ("arg:icd_bu_weight", "arg:conv1_1_weight", "arg:fc8_bias", "arg:feat_bn_beta"):
            mom = result["train/step%d/mom:%s" % (k, key[4:])]
            np.testing.assert_allclose(after[key] - before[key], mom, rtol=1e-3, atol=1e-7, err_msg=key)
        gamma_mom = result["train/step%d/mom:feat_bn_gamma" % k]
        np.testing.assert_allclose(after["arg:feat_bn_gamma"] - 1, gamma_mom, rtol=1e-2)
        np.testing.assert_allclose(gamma_mom, -0.01 * 5e-4 * sum(0.9 ** i for i in range(k + 1)),
                                   rtol=1e-5)
        if k > 0:   # consecutive gammas differ by mom_k - mom_{k-1}, not by mom_k
            assert not np.allclose(after["arg:feat_bn_gamma"] - before["arg:feat_bn_gamma"], gamma_mom,
                                   rtol=0.1)
        before = after


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_device_checkpoint_averages_each_devices_pull(order):
    """Sections 3.2 and 11, two devices in either order of the release's race: each device pushes
    its slice's means for the classes in it and its OWN aux copy (its last pull) for the others;
    the store moves 10% toward every pushed value; each device's aux holds what it pulled right
    after its own push (devices: key) and the checkpoint their average, while the store: key
    holds the store. Class 1 is on device 0 only, class 2 on device 1 only, class 3 on neither."""
    rng = np.random.RandomState(6)
    batch = make_batch(rng, 4, 4, 32)
    batch["label"][:] = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]]
    params = make_params(rng, 4, 0.0625, batch)
    meta = dict(num_cls=4, width=0.0625, lr=1e-3, momentum=0.9, wd=5e-4, steps=3, warmup_iters=1,
                dropout=0.0)
    result = run_reference_steps(params, batch, meta, [mx.cpu(0), mx.cpu(1)], order)
    key = "icd_accum_resign_moving_mean"
    first, last = order
    store_before = params["aux:" + key]
    copies_before = np.stack([store_before] * 2)
    for k in range(3):
        saved, store, copies = (result["train/step%d/%s:%s" % (k, kind, key)]
                                for kind in ("aux", "store", "devices"))
        np.testing.assert_allclose(saved, copies.mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(copies[last], store)       # the last device pulled last
        # the first device's pull, for the class only on the other device: 10% toward its copy
        other = 1 + last
        np.testing.assert_allclose(copies[first][other], 0.9 * store_before[other] +
                                   0.1 * copies_before[first][other], rtol=1e-6)
        # the store, for the class only on the first device: 10% toward the last one's copy
        mine = 1 + first
        np.testing.assert_allclose(store[mine], 0.9 * copies[first][mine] +
                                   0.1 * copies_before[last][mine], rtol=1e-6)
        np.testing.assert_allclose(store[3], store_before[3], rtol=1e-6)   # absent everywhere
        assert not np.allclose(saved[:3], store[:3])
        store_before, copies_before = store, copies
    assert np.abs(copies_before[first] - store_before).max() > 1e-3     # the copies diverge


def test_two_device_module_run_is_deterministic():
    rng = np.random.RandomState(8)
    batch = make_batch(rng, 2, 4, 32)
    params = make_params(rng, 4, 0.0625, batch)
    meta = dict(num_cls=4, width=0.0625, lr=1e-3, momentum=0.9, wd=5e-4, steps=2, warmup_iters=1, dropout=0.0)
    runs = [run_reference_steps(params, batch, meta, [mx.cpu(0), mx.cpu(1)]) for _ in range(2)]
    assert set(runs[0]) == set(runs[1])
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
