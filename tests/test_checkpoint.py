"""Release checkpoint format: round trip, pretrained initialisation, clear errors."""
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import icd.io
from icd.checkpoint import gather, load_checkpoint, read_params, save_checkpoint
from icd.features import conv5_feature_extractor, load_backbone
from icd.model import ICDNet, build_model
from icd.model.backbone import is_imagenet_key
from icd.model.pretrained import PRETRAINED_COPIES, initialize
from icd.runs import checkpoint_path
from icd.tasks import train


def make_net():
    net = ICDNet(num_classes=3, width=0.0625)
    initialize(net, [mx.cpu()])
    return net


def test_round_trip_in_release_format(tmp_path):
    net = make_net()
    net.icd_accum_resign_moving_mean.set_data(mx.nd.array([[1, 2], [3, 4], [5, 6]]))
    path = str(tmp_path / "vgg16_icd-0000.params")
    save_checkpoint(net, path)
    saved = mx.nd.load(path)
    assert "aux:feat_bn_moving_mean" in saved and "arg:icd_bu_weight" in saved
    assert "aux:icd_accum_resign_moving_mean" in saved
    other = ICDNet(num_classes=3, width=0.0625)
    load_checkpoint(other, path)
    for key, value in gather(other).items():
        np.testing.assert_array_equal(value.asnumpy(), saved[key].asnumpy(), err_msg=key)


def test_errors_name_missing_extra_and_misshaped_keys(tmp_path):
    values = gather(make_net())
    values.pop("arg:fc8_bias")
    values["arg:surplus_weight"] = mx.nd.zeros((1,))
    values["arg:conv_ft_weight"] = mx.nd.zeros((3, 7, 1, 1))
    path = str(tmp_path / "bad.params")
    mx.nd.save(path, values)
    with pytest.raises(ValueError) as err:
        load_checkpoint(ICDNet(num_classes=3, width=0.0625), path)
    message = str(err.value)
    assert path in message and "arg:fc8_bias" in message and "arg:surplus_weight" in message
    assert "arg:conv_ft_weight (3, 7, 1, 1)" in message
    with pytest.raises(FileNotFoundError, match="nowhere.params"):
        read_params(str(tmp_path / "nowhere.params"))
    (tmp_path / "junk.params").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.params"):
        read_params(str(tmp_path / "junk.params"))


def test_pretrained_initialisation_copies_fc_and_draws_missing(tmp_path):
    """vgg16_20M-style file: backbone + fc6/fc7 only, in the release's format."""
    full = gather(make_net())
    imagenet = {k: mx.nd.random.normal(0, 1, v.shape) for k, v in full.items()
                if k.startswith(("arg:conv", "arg:fc6_", "arg:fc7_")) and "_ft_" not in k
                and not k.startswith("arg:conv_ft")}
    path = str(tmp_path / "vgg16_20M.params")
    mx.nd.save(path, imagenet)
    net = ICDNet(num_classes=3, width=0.0625)
    initialize(net, [mx.cpu()], pretrained=path)
    got = gather(net)
    np.testing.assert_array_equal(got["arg:fc6_ft_weight"].asnumpy(),
                                  imagenet["arg:fc6_weight"].asnumpy())
    np.testing.assert_array_equal(got["arg:conv3_2_weight"].asnumpy(),
                                  imagenet["arg:conv3_2_weight"].asnumpy())
    new = np.concatenate([got[k].asnumpy().ravel() for k in ("arg:fc8_weight",
                                                               "arg:conv_ft_weight")])
    assert abs(new.std() - 0.01) < 0.003 and (got["arg:fc8_bias"].asnumpy() == 0).all()
    np.testing.assert_array_equal(got["aux:icd_accum_resign_moving_mean"].asnumpy(), 0)
    np.testing.assert_array_equal(got["aux:feat_bn_moving_var"].asnumpy(), 1)
    backbone = load_backbone(path, mx.cpu())
    conv4, conv5 = backbone(mx.nd.zeros((1, 3, 40, 40)))
    assert conv5.shape == (1, 32, 5, 5)


# every model the commands build, with the ablations' layers (Tables 5-6): what initialize draws
INIT_MODELS = [("vgg16_icd", {}), ("vgg16_cam", {}), ("vgg16_bn_cam", {}),
               ("vgg16_icd", {"bottom_up_features": "concat", "top_down_structure": "b"}),
               ("vgg16_icd", {"top_down_structure": "a", "bottom_up_variant": "sig"}),
               ("vgg16_largefov", {}), ("vgg16_aspp", {})]


@pytest.mark.parametrize("name, options", INIT_MODELS)
def test_new_parameters_are_initialised_by_name_suffix(name, options):
    """Release section 2: what vgg16_20M.params lacks goes through mx.init.Normal(0.01) called
    with its name: *_weight ~ N(0, 0.01), *_bias 0, *_gamma 1, *_beta 0 (read from the
    checkpoint's values, icd.checkpoint.gather)."""
    mx.random.seed(0)
    net = build_model(name, num_classes=5, width=0.25, **options)
    initialize(net, [mx.cpu()])
    values = {k: v.asnumpy() for k, v in gather(net).items()}
    copied = {f"arg:{dst}" for dst, src in PRETRAINED_COPIES.items()
              if f"arg:{dst}" in values and f"arg:{src}" in values
              and values[f"arg:{dst}"].shape == values[f"arg:{src}"].shape}
    drawn = {k for k in values if k.startswith("arg:") and not is_imagenet_key(k)} - copied
    assert drawn, values.keys()
    for key in sorted(drawn):
        value = values[key]
        if key.endswith("_weight"):
            assert abs(value.std() - 0.01) < 0.002 and abs(value.mean()) < 0.002, key
        elif key.endswith(("_bias", "_beta")):
            assert (value == 0).all(), key
        else:
            assert key.endswith("_gamma") and (value == 1).all(), key
    if name == "vgg16_icd":
        assert {"arg:fc8_bias", "arg:feat_bn_beta", "arg:feat_bn_gamma",
                "arg:icd_bu_weight", "arg:conv_ft_weight"} <= drawn


def test_a_checkpoint_after_one_epoch_at_a_negligible_rate_keeps_the_release_init(tiny_config):
    """Issue 20's check on the written file: after one epoch at lr 1e-12, fc8_bias and
    feat_bn_beta are still 0 (to 1e-9) and the drawn weights have std 0.01."""
    cfg = tiny_config(num_epoch=1, learning_rate=1e-12, width=0.125)
    train(cfg)
    values = {k: v.asnumpy() for k, v in read_params(checkpoint_path(cfg, 0)).items()}
    for key in ("arg:fc8_bias", "arg:feat_bn_beta"):
        assert np.abs(values[key]).max() < 1e-9, key
    for key in ("arg:fc8_weight", "arg:icd_bu_weight", "arg:conv_ft_weight"):
        assert abs(values[key].std() - 0.01) < 0.002, key


def test_superpixels_from_a_backbone_checkpoint(tmp_path, tiny_voc):
    """icd-superpixels --pretrained: conv5_3 features of a release-format file."""
    from icd.commands import superpixels
    from icd.data.superpixels import read_superpixels
    from icd.data.voc import read_image, read_list

    net = ICDNet(num_classes=3, width=0.0625)
    initialize(net, [mx.cpu()])
    path = str(tmp_path / "vgg16_20M.params")
    mx.nd.save(path, gather(net))   # a full ICD checkpoint also serves: its backbone is used
    name = read_list(tiny_voc["data_list"])[0]
    image = read_image(f"{tiny_voc['image_root']}/{name}.jpg")
    features = conv5_feature_extractor(path, mx.cpu())(image)
    assert features.shape == image.shape[:2] + (32,) and features.std() > 0
    out = tmp_path / "sp"
    assert superpixels.main(["--image-root", tiny_voc["image_root"], "--data-list",
                             tiny_voc["data_list"], "--out", str(out), "--pretrained", path]) == 0
    ids = read_superpixels(str(out / f"{name}.png"), image.shape[:2])
    assert 1 < len(set(ids.ravel())) <= 64


def test_batch_norm_stand_in_folds_into_the_plain_vgg16(tmp_path):
    """vgg16_bn_cam: BN starts at gamma 1 / beta 0; its export is a vgg16_20M-shaped file whose
    plain VGG16 computes what the BN network computes in inference mode."""
    from mxnet import autograd
    from icd.pipeline.demo import write_imagenet_part
    from icd.model import build_model
    net = build_model("vgg16_bn_cam", num_classes=3, width=0.0625)
    initialize(net, [mx.cpu()])
    got = gather(net)
    np.testing.assert_array_equal(got["arg:conv2_1_bn_gamma"].asnumpy(), 1)
    np.testing.assert_array_equal(got["arg:conv2_1_bn_beta"].asnumpy(), 0)
    data = mx.nd.random.uniform(0, 255, (2, 3, 40, 40))
    with autograd.record():                   # moves the BN statistics away from 0 / 1
        for _ in range(3):
            net(data, mx.nd.array([[1, 0, 0], [0, 1, 1]]))
    for name, param in net.collect_params().items():
        if name.endswith("_bn_gamma") or name.endswith("_bn_beta"):
            param.set_data(mx.nd.random.uniform(0.5, 1.5, param.shape))
    source, stand_in = str(tmp_path / "bn.params"), str(tmp_path / "stand_in.params")
    save_checkpoint(net, source)
    write_imagenet_part(source, stand_in)
    keys = set(read_params(stand_in))
    assert not any("_bn_" in k for k in keys) and "arg:conv5_3_weight" in keys
    assert "arg:fc7_bias" in keys and "arg:fc8_weight" not in keys
    plain = build_model("vgg16_cam", num_classes=3, width=0.0625)
    initialize(plain, [mx.cpu()], pretrained=stand_in)
    expected = net.backbone(data)[1].asnumpy()
    np.testing.assert_allclose(plain.backbone(data)[1].asnumpy(), expected,
                               rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_disk_full_in_mxnet_names_the_file(tmp_path, monkeypatch):
    """MXNet says `FileStream.Write incomplete` on a full disk: the error names the file."""
    from icd.checkpoint import save_checkpoint
    net = gluon.nn.Dense(2, in_units=2)
    net.initialize()
    path = str(tmp_path / "m-0000.params")
    real = os.statvfs

    def full(folder):
        stat = real(folder)
        return os.statvfs_result((stat.f_bsize, stat.f_frsize, stat.f_blocks, 0, 0) + tuple(
            stat)[5:])

    def incomplete(*args):
        raise mx.base.MXNetError("Check failed: FileStream.Write incomplete")

    monkeypatch.setattr(icd.io.os, "statvfs", full)
    monkeypatch.setattr(mx.nd, "save", incomplete)
    with pytest.raises(OSError, match=rf"{path}: no space left on device"):
        save_checkpoint(net, path)
    assert os.listdir(tmp_path) == []
