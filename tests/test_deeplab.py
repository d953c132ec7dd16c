"""DeepLab models, segmentation data and loss, inference (multi-scale, flip, CRF) and evaluation."""
import os
import tempfile

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, init

from icd.checkpoint import load_checkpoint, read_params, release_key, release_keys, save_checkpoint
from icd.data.segmentation import SegmentationDataset, segmentation_loader, segmentation_transform
from icd.data.voc import read_list, write_mask
from icd.model import MODELS, build_model
from icd.model.backbone import is_imagenet_key, pool5
from icd.model.deeplab import DilatedResNet101, vgg16_largefov
from icd.model.losses import nearest_label, segmentation_loss
from icd.model.pretrained import initialize, random_imagenet_params


# ---------------------------------------------------------------------------------------------
# The release's graphs (docs/release.md sections 2 and 12), written with mx.sym


def release_backbone(x, width=1.0):
    """vgg16_deeplab: x - 127, conv1_1 .. conv5_3 (+ ReLU), pool1-4, pool5 max, pool5a avg
    (channel counts times `width`, to run the graph with narrow weights)."""
    x = x - 127
    for block, convs, channels, dilation in ((1, 2, 64, 1), (2, 2, 128, 1), (3, 3, 256, 1),
                                             (4, 3, 512, 1), (5, 3, 512, 2)):
        for i in range(1, convs + 1):
            x = mx.sym.Convolution(x, kernel=(3, 3), pad=(dilation, dilation),
                                   dilate=(dilation, dilation),
                                   num_filter=max(1, round(channels * width)),
                                   name=f"conv{block}_{i}")
            x = mx.sym.Activation(x, act_type="relu", name=f"conv{block}_{i}_relu")
        if block < 5:
            stride = 2 if block < 4 else 1
            x = mx.sym.Pooling(x, kernel=(3, 3), stride=(stride, stride), pad=(1, 1),
                               pool_type="max", name=f"pool{block}")
    x = mx.sym.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="max",
                       name="pool5")
    return mx.sym.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="avg",
                          name="pool5a")


def release_branch(x, num_cls, dilation, suffix="", width=1.0):
    fc = max(1, round(1024 * width))
    x = mx.sym.Convolution(x, kernel=(3, 3), pad=(dilation, dilation),
                           dilate=(dilation, dilation), num_filter=fc, name=f"fc6{suffix}")
    x = mx.sym.Dropout(mx.sym.Activation(x, act_type="relu"), p=0.5, name=f"drop6{suffix}")
    x = mx.sym.Convolution(x, kernel=(1, 1), num_filter=fc, name=f"fc7{suffix}")
    x = mx.sym.Dropout(mx.sym.Activation(x, act_type="relu"), p=0.5, name=f"drop7{suffix}")
    return mx.sym.Convolution(x, kernel=(1, 1), num_filter=num_cls, name=f"fc8{suffix}")


def release_vgg16_largefov(num_cls, width=1.0):
    return release_branch(release_backbone(mx.sym.var("data"), width), num_cls, 12, "", width)


def release_vgg16_aspp(num_cls, width=1.0):
    x = release_backbone(mx.sym.var("data"), width)
    return mx.sym.add_n(*[release_branch(x, num_cls, d, f"_aspp{d}", width)
                          for d in (6, 12, 18, 24)])


def release_arguments(symbol, size=321):
    shapes, _, _ = symbol.infer_shape(data=(1, 3, size, size))
    return {f"arg:{n}": tuple(s) for n, s in zip(symbol.list_arguments(), shapes) if n != "data"}


# Section 12 spelled out: the keys every VGG16 DeepLab graph shares and the head's.
BACKBONE_KEYS = {
    f"arg:conv{b}_{i}_{t}": s for b, n, c_in, c in
    ((1, 2, 3, 64), (2, 2, 64, 128), (3, 3, 128, 256), (4, 3, 256, 512), (5, 3, 512, 512))
    for i in range(1, n + 1)
    for t, s in (("weight", (c, c_in if i == 1 else c, 3, 3)), ("bias", (c,)))}


def head_keys(suffix=""):
    return {f"arg:fc6{suffix}_weight": (1024, 512, 3, 3), f"arg:fc6{suffix}_bias": (1024,),
            f"arg:fc7{suffix}_weight": (1024, 1024, 1, 1), f"arg:fc7{suffix}_bias": (1024,),
            f"arg:fc8{suffix}_weight": (21, 1024, 1, 1), f"arg:fc8{suffix}_bias": (21,)}


def test_vgg16_largefov_names_and_shapes_equal_the_release_symbol():
    expected = {**BACKBONE_KEYS, **head_keys()}
    assert release_arguments(release_vgg16_largefov(21)) == expected
    assert release_keys(build_model("vgg16_largefov", num_classes=20)) == expected


def test_vgg16_aspp_names_and_shapes_equal_the_release_symbol():
    expected = dict(BACKBONE_KEYS)
    for d in (6, 12, 18, 24):
        expected.update(head_keys(f"_aspp{d}"))
    assert release_arguments(release_vgg16_aspp(21)) == expected
    assert release_keys(build_model("vgg16_aspp", num_classes=20)) == expected


@pytest.mark.parametrize("name", ["vgg16_largefov", "vgg16_aspp"])
def test_vgg_forward_equals_the_release_symbol(name):
    """Same weights (width 1/16), same input: our Gluon graph and the release's symbol (inference
    mode) give the same logits."""
    net = build_model(name, num_classes=3, width=1 / 16)
    net.initialize(mx.init.Xavier(magnitude=2))
    release = {"vgg16_largefov": release_vgg16_largefov, "vgg16_aspp": release_vgg16_aspp}
    symbol = release[name](4, width=1 / 16)
    params = {k[4:]: v for k, v in save_and_read(net).items()}
    data = mx.nd.random.uniform(0, 255, shape=(2, 3, 48, 40))
    expected = symbol.eval(ctx=mx.cpu(), data=data, **params)[0]
    got = net(data)
    assert got.shape == expected.shape == (2, 4, 6, 5)
    np.testing.assert_allclose(got.asnumpy(), expected.asnumpy(), rtol=1e-4, atol=1e-5)


def save_and_read(net):
    """The release-format dict of `net` (through save_checkpoint/read_params)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "net.params")
        save_checkpoint(net, path)
        return read_params(path)


def test_registry_serves_every_family():
    assert {"vgg16_icd", "vgg16_cam", "vgg16_largefov", "vgg16_aspp",
            "resnet101_largefov"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="no width multiplier"):
        build_model("resnet101_largefov", width=0.5)


@pytest.mark.parametrize("name", ["vgg16_largefov", "vgg16_aspp"])
def test_release_optimiser_multipliers(name):
    params = build_model(name, width=1 / 16).collect_params()
    lr10 = {n for n, p in params.items() if p.lr_mult == 10}
    assert lr10 == {n for n in params if n.startswith("fc8")} and len(lr10) >= 2
    decayed = {n for n, p in params.items() if p.wd_mult == 1}
    assert decayed == {n for n in params if n.endswith("_weight")}


@pytest.mark.parametrize("name", ["vgg16_largefov", "vgg16_aspp"])
@pytest.mark.parametrize("size, feature", [(321, 41), (64, 8)])
def test_vgg_output_resolution(name, size, feature):
    net = build_model(name, num_classes=4, width=1 / 16)
    net.initialize()
    net.hybridize()
    assert net(mx.nd.zeros((2, 3, size, size))).shape == (2, 5, feature, feature)


def test_resnet101_largefov_has_output_stride_8():
    net = build_model("resnet101_largefov", num_classes=4)
    net.initialize_imagenet([mx.cpu()])
    for size, feature in ((64, 8), (72, 9)):
        assert net(mx.nd.zeros((1, 3, size, size))).shape == (1, 5, feature, feature)
    head = {n for n, p in net.collect_params().items() if p.lr_mult == 10}
    assert head == {"fc8_weight", "fc8_bias"}
    for name in ("fc6_weight", "fc8_weight"):   # release: new layers by name, N(0, 0.01) ...
        assert 0.005 < net.collect_params()[name].data().asnumpy().std() < 0.02, name
    for name in ("fc6_bias", "fc8_bias"):       # ... and biases 0
        assert (net.collect_params()[name].data().asnumpy() == 0).all(), name
    # without ImageNet weights the residual branches start at zero: finite, moderate logits
    # (frozen BN does not normalise; a plain He-initialised trunk gives ~1e3 logits)
    assert all(block.bn3.gamma.data().abs().max().asscalar() == 0 for block in net.trunk.layer4)
    logits = net(mx.nd.random.uniform(0, 255, shape=(1, 3, 64, 64)))
    assert 0 < logits.abs().max().asscalar() < 10


def test_resnet101_trunk_loads_gluoncv_imagenet_parameter_names():
    """The trunk's structural names are gluoncv resnet101_v1b's minus its classifier, so
    `load_parameters(gluoncv_file, ignore_extra=True)` fills every trunk parameter."""
    from gluoncv.model_zoo import resnetv1b
    ours = set(DilatedResNet101()._collect_params_with_prefix())
    theirs = set(resnetv1b.resnet101_v1b(dilated=True)._collect_params_with_prefix())
    assert ours == {n for n in theirs if not n.startswith("fc.")}
    assert theirs - ours == {"fc.weight", "fc.bias"}


@pytest.mark.slow
def test_resnet101_trunk_loads_a_gluoncv_file(tmp_path):
    """A gluoncv resnet101_v1b parameter file (classifier included) loads into the trunk."""
    from gluoncv.model_zoo import resnetv1b
    source = resnetv1b.resnet101_v1b(dilated=True)
    source.initialize(mx.init.Normal(0.02))
    source(mx.nd.zeros((1, 3, 32, 32)))
    path = str(tmp_path / "resnet101_v1b.params")
    source.save_parameters(path)
    net = build_model("resnet101_largefov", num_classes=2)
    net.initialize_imagenet([mx.cpu()], pretrained=path)
    np.testing.assert_array_equal(net.trunk.layer4[2].conv3.weight.data().asnumpy(),
                                  source.layer4[2].conv3.weight.data().asnumpy())


# ---------------------------------------------------------------------------------------------
# Checkpoints

def test_checkpoint_round_trip_by_release_keys(tmp_path):
    net = build_model("vgg16_largefov", num_classes=3, width=1 / 16)
    net.initialize(mx.init.Normal(0.05))
    path = str(tmp_path / "vgg16_largefov-0000.params")
    save_checkpoint(net, path)
    assert set(read_params(path)) == set(release_keys(net))
    assert "arg:fc6_weight" in read_params(path)
    other = build_model("vgg16_largefov", num_classes=3, width=1 / 16)
    load_checkpoint(other, path)
    data = mx.nd.random.uniform(0, 255, shape=(1, 3, 40, 40))
    np.testing.assert_array_equal(net(data).asnumpy(), other(data).asnumpy())


def test_imagenet_file_initialises_largefov_by_name_and_not_the_aspp_branches(tmp_path):
    """A vgg16_20M-like file (backbone + fc6 + fc7) fills vgg16_largefov except fc8, and only
    the backbone of vgg16_aspp."""
    largefov = build_model("vgg16_largefov", num_classes=3, width=1 / 16)
    largefov.initialize(mx.init.Normal(0.05))
    imagenet = {k: v for k, v in save_and_read(largefov).items() if not k.startswith("arg:fc8")}
    path = str(tmp_path / "vgg16_20M.params")
    mx.nd.save(path, imagenet)

    fresh = build_model("vgg16_largefov", num_classes=3, width=1 / 16)
    initialize(fresh, [mx.cpu()], pretrained=path)
    loaded = save_and_read(fresh)
    for key, value in imagenet.items():
        np.testing.assert_array_equal(loaded[key].asnumpy(), value.asnumpy())
    assert 0.005 < loaded["arg:fc8_weight"].asnumpy().std() < 0.02   # N(0, 0.01)

    aspp = build_model("vgg16_aspp", num_classes=3, width=1 / 16)
    initialize(aspp, [mx.cpu()], pretrained=path)
    loaded = save_and_read(aspp)
    np.testing.assert_array_equal(loaded["arg:conv5_3_weight"].asnumpy(),
                                  imagenet["arg:conv5_3_weight"].asnumpy())
    branch = loaded["arg:fc6_aspp12_weight"].asnumpy()
    assert branch.shape == imagenet["arg:fc6_weight"].shape
    assert not np.array_equal(branch, imagenet["arg:fc6_weight"].asnumpy())
    assert 0.005 < branch.std() < 0.02


def test_every_batchnorm_statistic_is_an_aux_state():
    """MXNet's convention: any *_moving_mean / *_moving_var is aux, whatever the network (the
    ResNet-101's 104 BatchNorms included), and a checkpoint round trip keeps them as aux."""
    keys = release_keys(build_model("resnet101_largefov", num_classes=2))
    aux = {k for k in keys if k.startswith("aux:")}
    assert len(aux) == 2 * 104
    assert aux == {k for k in keys if k.endswith(("_moving_mean", "_moving_var"))}
    assert not any("running" in k for k in keys)
    assert release_key("feat_bn_running_var") == "aux:feat_bn_moving_var"
    assert release_key("icd_accum_resign_moving_mean") == "aux:icd_accum_resign_moving_mean"
    assert release_key("fc8_weight") == "arg:fc8_weight"


def test_random_imagenet_stand_in_covers_what_the_file_would_name():
    """The ASPP branches are not in vgg16_20M.params: the stand-in leaves them to N(0, 0.01)."""
    aspp = set(random_imagenet_params(build_model("vgg16_aspp", width=1 / 16)))
    assert aspp == {k for k in BACKBONE_KEYS}
    largefov = set(random_imagenet_params(build_model("vgg16_largefov", width=1 / 16)))
    assert largefov == set(BACKBONE_KEYS) | {k for k in head_keys() if "fc8" not in k}
    assert not is_imagenet_key("arg:fc7_aspp24_bias") and is_imagenet_key("arg:fc7_bias")


def test_resnet101_checkpoint_loads_into_a_fresh_model(tmp_path):
    """Every shape is known at construction (gluoncv infers conv input channels at the first
    forward), so a saved ResNet-101 loads by shape on two devices and predicts the same."""
    net = build_model("resnet101_largefov", num_classes=2)
    net.initialize_imagenet([mx.cpu()])
    path = str(tmp_path / "resnet101_largefov-0000.params")
    save_checkpoint(net, path)
    other = build_model("resnet101_largefov", num_classes=2)
    load_checkpoint(other, path, [mx.cpu(0), mx.cpu(1)])
    data = mx.nd.random.uniform(0, 255, shape=(1, 3, 40, 40))
    np.testing.assert_array_equal(net(data).asnumpy(), other(data).asnumpy())


# ---------------------------------------------------------------------------------------------
# Loss

def receptive_field_middle(net, side: int, cell: int) -> float:
    """The middle of the input rows that score row `cell` of `net`'s stride-8 map depends on:
    with positive weights on a uniform image, a brighter row raises every activation it
    reaches, and each max pooling passes the raise on, so it changes the cell exactly when it
    lies in the cell's field (the field's ends found by bisection)."""
    for param in net.collect_params().values():
        param.set_data(param.data().abs() + 1e-3)
    base = mx.nd.full((1, 3, side, side), 200)

    def score(x):
        _, conv5 = net.backbone(x)
        return pool5(mx.nd, conv5)[0, :, cell, :].asnumpy()
    reference = score(base)

    def reaches(row):
        x = base.copy()
        x[:, :, row, :] = 255
        return not np.array_equal(score(x), reference)

    def first(low, high, inside_at_high):   # the first row of [low, high] on the inside side
        while low < high:
            middle = (low + high) // 2
            if reaches(middle) == inside_at_high:
                high = middle
            else:
                low = middle + 1
        return low
    centre = 8 * cell
    top = first(0, centre, True)
    bottom = first(centre, side - 1, False) - 1
    return (top + bottom) / 2


def test_score_cell_i_is_centred_on_input_pixel_8i():
    """What the label shrink and the upsampling below rely on: the three stride-2 poolings with
    the release's padding put cell i's receptive field around pixel 8i (not 8i + 3.5)."""
    net = vgg16_largefov(num_classes=1, width=1 / 16)
    net.initialize(init.Uniform(0.02))
    for cell in (16, 17, 18):   # receptive fields of 243 px, inside the 289 px input
        assert receptive_field_middle(net, 289, cell) == 8 * cell


@pytest.mark.parametrize("side", [96, 97, 100, 321])
def test_labels_shrink_to_the_pixel_at_each_cell_centre(side):
    """Each score cell takes the label of input pixel 8i (the last cell at most the last row):
    the corner-aligned rule round(i (H - 1) / (h - 1)) agrees only for sides 8k + 1 and drifts
    to pixel 95 instead of 88 for the last cell of a 96 px crop."""
    cells = (side + 7) // 8
    label = mx.nd.array(np.tile(np.arange(side), (1, side, 1)))
    shrunk = nearest_label(mx.nd, label, mx.nd.zeros((1, 2, cells, cells)))
    np.testing.assert_array_equal(shrunk[0, 0].asnumpy(),
                                  np.minimum(8 * np.arange(cells), side - 1))
    shrunk = nearest_label(mx.nd, label.transpose((0, 2, 1)), mx.nd.zeros((1, 2, cells, cells)))
    np.testing.assert_array_equal(shrunk[0, :, 0].asnumpy(),
                                  np.minimum(8 * np.arange(cells), side - 1))


def reference_loss(logits, label):
    """NumPy: per image, mean softmax cross-entropy over the non-255 pixels; summed."""
    total = 0.0
    for z, y in zip(logits, label):
        z = z - z.max(axis=0)
        logp = z - np.log(np.exp(z).sum(axis=0))
        valid = y != 255
        if valid.any():
            total += -np.mean(np.take_along_axis(logp, np.where(valid, y, 0)[None].astype(int),
                                                 0)[0][valid])
    return total


def test_segmentation_loss_ignores_255_in_value_and_gradient():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    label = rng.integers(0, 4, size=(2, 5, 5)).astype(np.float32)
    label[0, :2] = 255
    label[1, :, 3] = 255
    label[1, 4, 4] = 255

    crop = rng.integers(0, 4, size=(2, 33, 33)).astype(np.float32)   # 33 px -> 5 x 5 cells
    crop[:, ::8, ::8] = label                                          # the cells' centres

    def run(z):
        z = mx.nd.array(z)
        z.attach_grad()
        with autograd.record():
            loss = segmentation_loss(mx.nd, z, mx.nd.array(crop))
        loss.backward()
        return loss.asnumpy()[0], z.grad.asnumpy()

    loss, grad = run(logits)
    assert loss == pytest.approx(reference_loss(logits, label.astype(int)), rel=1e-5)
    ignored = np.broadcast_to((label == 255)[:, None], grad.shape)
    assert np.all(grad[ignored] == 0)
    assert np.all(np.abs(grad[~ignored]).sum() > 0)
    changed = logits.copy()
    changed[ignored] = rng.normal(scale=10, size=ignored.sum())
    loss2, grad2 = run(changed)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(grad2[~ignored], grad[~ignored], rtol=1e-5, atol=1e-7)
    all_ignored = np.full_like(crop, 255)
    z = mx.nd.array(logits)
    assert segmentation_loss(mx.nd, z, mx.nd.array(all_ignored)).asnumpy()[0] == 0


def test_segmentation_loss_hybridizes_and_matches_on_a_shrunk_label():
    """Symbolic graph; 20x20 labels on 3x3 logits pick rows/columns 0, 8, 16 (the cells'
    centres; not round(9.5 i) = 0, 10, 19)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 3, 3, 3)).astype(np.float32)
    label = rng.integers(0, 3, size=(1, 20, 20)).astype(np.float32)
    label[0, 8] = 255
    z, y = mx.sym.var("z"), mx.sym.var("y")
    out = segmentation_loss(mx.sym, z, y).eval(z=mx.nd.array(logits), y=mx.nd.array(label))
    picked = label[:, [0, 8, 16]][:, :, [0, 8, 16]]
    assert out[0].asnumpy()[0] == pytest.approx(reference_loss(logits, picked.astype(int)),
                                                rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Data

def test_transform_pads_image_with_mean_and_labels_with_255():
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.ones((20, 30), np.uint8)
    out_image, out_label = segmentation_transform(image, label, 48, np.random.default_rng(0),
                                                  scale_range=(1.0, 1.0))
    assert out_image.shape == (48, 48, 3) and out_label.shape == (48, 48)
    assert set(np.unique(out_label)) == {1, 255}
    assert np.all(out_image[out_label == 255] == 127)
    assert np.all(out_image[out_label == 1] == 200)
    assert (out_label == 1).sum() == 20 * 30


def test_transform_keeps_image_and_labels_aligned():
    """A label = (image brightness > 128) survives scale, flip and crop up to the resampling."""
    rng = np.random.default_rng(3)
    image = np.zeros((60, 80, 3), np.uint8)
    image[10:40, 20:70] = 255
    label = (image[..., 0] > 128).astype(np.uint8)
    for _ in range(10):
        out_image, out_label = segmentation_transform(image, label, 32, rng)
        inside = out_label != 255
        agree = (out_image[..., 0] > 128) == (out_label == 1)
        assert agree[inside].mean() > 0.95


def test_loader_same_batches_for_0_and_2_workers_and_epochs_differ(tiny_voc):
    kwargs = dict(crop_size=32, batch_size=4, seed=5)
    args = (tiny_voc["image_root"], tiny_voc["gt_root"], tiny_voc["data_list"])
    serial = [[b.asnumpy() for b in batch] for batch in segmentation_loader(
        *args, num_workers=0, **kwargs)]
    parallel = [[b.asnumpy() for b in batch] for batch in segmentation_loader(
        *args, num_workers=2, **kwargs)]
    assert len(serial) == 2 and serial[0][0].shape == (4, 3, 32, 32)
    assert serial[0][1].shape == (4, 32, 32)
    for a, b in zip(serial, parallel):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    loader = segmentation_loader(*args, num_workers=0, **kwargs)
    loader.set_epoch(1)
    assert not np.array_equal(next(iter(loader))[0].asnumpy(), serial[0][0])


def test_dataset_errors_name_the_label_file(tiny_voc, tmp_path):
    names = read_list(tiny_voc["data_list"])
    labels = tmp_path / "labels"
    for name in names[1:]:
        write_mask(str(labels / f"{name}.png"), np.zeros((4, 4), np.uint8))
    missing = str(labels / f"{names[0]}.png")
    with pytest.raises(FileNotFoundError, match=rf"{labels}: no label map for 1 of the 8 images "
                                                rf"of .*train.txt \(first: {missing}\)"):
        SegmentationDataset(tiny_voc["image_root"], str(labels), tiny_voc["data_list"])
    write_mask(missing, np.zeros((10, 10), np.uint8))
    dataset = SegmentationDataset(tiny_voc["image_root"], str(labels), tiny_voc["data_list"],
                                  crop_size=32)
    with pytest.raises(ValueError, match=rf"{missing}: label map \(10, 10\) does not match"):
        dataset[0]
    image = cv2.imread(os.path.join(tiny_voc["image_root"], f"{names[0]}.jpg"))
    bad = np.zeros(image.shape[:2], np.uint8)
    bad[0, 0] = 21
    write_mask(missing, bad)
    with pytest.raises(ValueError, match=rf"{missing}: label 21 outside 0..20"):
        dataset[0]
