"""ImageNet weights: the registrations' `pretrained` entries, the model-zoo VGG16 converter
(`icd-pretrained`, docs/release.md section 13) and its file in the commands; no network: the
model-zoo files are built here with random weights, named as the model store names them."""
import hashlib
import json
import os
import shutil

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon.model_zoo import model_store, vision

from icd.checkpoint import read_params
from icd.commands import pretrained as pretrained_command, superpixels, train
from icd.model import build_model, model_spec
from icd.model.backbone import VGG16DeepLab
from icd.model.pretrained import (IMAGENET_MEAN, IMAGENET_STD, RESNET101_V1B, VGG16_RELEASE,
                                  describe_pretrained, imagenet_file, initialize, release_layout,
                                  store_path, zoo_vgg16_names)

from helpers import REPO

SIZE = 232   # conv5_3 cells 14 and 15 see no zero padding of conv1_1's input (radius 105 px)


def zoo_file(tmp_path_factory, constructor, name, random=True):
    """The parameters of model-zoo network `constructor()` (He-uniform weights and uniform
    biases, or zeros), saved as the model store's files are (`save_parameters`: structural names)
    under the store's file name in a fresh cache folder; returns (cache folder, file)."""
    net = constructor()
    net.infer_shape(mx.nd.zeros((1, 3, 224, 224)))
    rng = np.random.default_rng(0)
    values = {}
    for key, param in net._collect_params_with_prefix().items():
        shape = param.shape
        bound = np.sqrt(6.0 / np.prod(shape[1:])) if len(shape) > 1 else 0.1
        values[key] = mx.nd.array(
            (rng.random(shape, dtype=np.float32) * 2 - 1) * bound if random else np.zeros(shape))
    root = str(tmp_path_factory.mktemp("models"))
    path = os.path.join(root, f"{name}-{model_store.short_hash(name)}.params")
    mx.nd.save(path, values)
    return root, path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The random zoo VGG16 converted from the model store's cache (`modelzoo:vgg16 --root`)
    and from its path."""
    root, path = zoo_file(tmp_path_factory, vision.vgg16, "vgg16")
    zoo = vision.vgg16()
    zoo.load_parameters(path)   # the file is the zoo network's
    out = str(tmp_path_factory.mktemp("data"))
    from_store, from_path = os.path.join(out, "store.params"), os.path.join(out, "path.params")
    assert pretrained_command.main(["--from", "modelzoo:vgg16", "--root", root,
                                    "--out", from_store]) == 0
    assert pretrained_command.main(["--from", path, "--out", from_path]) == 0
    return {"zoo": zoo, "root": root, "path": path, "store": from_store, "file": from_path}


def zoo_params(zoo):
    return {name: p.data().asnumpy() for name, p in zoo._collect_params_with_prefix().items()}


def test_the_store_and_the_path_give_one_file_of_the_release_layout(converted):
    store, path = read_params(converted["store"]), read_params(converted["file"])
    assert {k: tuple(v.shape) for k, v in path.items()} == release_layout()
    for key in path:
        np.testing.assert_array_equal(store[key].asnumpy(), path[key].asnumpy())
    record = json.load(open(converted["file"] + ".json"))
    digest = hashlib.sha256(open(converted["path"], "rb").read()).hexdigest()
    assert record["source_sha256"] == "sha256:" + digest
    assert record["source"] == os.path.abspath(converted["path"])
    assert record["source_is_model_store_file"] is False   # random weights, not the store's
    assert "::4" in record["rule"] and "section 13" in record["rule"]
    described = describe_pretrained(converted["file"])
    assert described["made_from"] == "mxnet model zoo vgg16"
    assert described["source_sha256"] == record["source_sha256"]


def test_conv_names_follow_the_zoo_network():
    names = zoo_vgg16_names()
    assert names["features.0"] == "conv1_1" and names["features.28"] == "conv5_3"
    assert names["features.31"] == "fc6" and names["features.33"] == "fc7"
    assert len(names) == 15


def normalised(rgb):
    """The zoo's input: (RGB / 255 - mean) / std per channel."""
    mean = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, np.float32)[:, None, None]
    return (rgb / 255.0 - mean) / std


def backbone_with(values):
    net = VGG16DeepLab(1.0, prefix="")
    net.initialize()
    for name, param in net.collect_params().items():
        param.set_data(values[name])
    return net


def test_backbone_responses_equal_the_zoo_network_away_from_the_border(converted):
    """Ours on RGB - 127 against the zoo's weights on the normalised image: the zoo network
    itself up to conv1_2 (where the architectures agree), then the DeepLab backbone carrying
    the zoo's weights unchanged (its -127 undone on the input). The zero padding of conv1_1's
    input differs (section 13), so the comparison stays where conv1_1 saw no padding."""
    values = {k[4:]: v for k, v in read_params(converted["file"]).items()}
    ours = backbone_with(values)
    zoo = zoo_params(converted["zoo"])
    reference = backbone_with({f"{ours_name}_{kind}": mx.nd.array(zoo[f"{layer}.{kind}"])
                               for layer, ours_name in zoo_vgg16_names().items()
                               if ours_name.startswith("conv") for kind in ("weight", "bias")})
    rgb = np.random.RandomState(0).uniform(0, 255, (1, 3, SIZE, SIZE)).astype(np.float32)
    x = normalised(rgb)

    conv1 = ours.stages[0](mx.nd.array(rgb - 127)).asnumpy()
    zoo_conv1 = converted["zoo"].features[:4](mx.nd.array(x)).asnumpy()
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(conv1[inner], zoo_conv1[inner], rtol=1e-4,
                               atol=1e-5 * np.abs(zoo_conv1).max())
    assert not np.allclose(conv1[..., 0, :], zoo_conv1[..., 0, :], rtol=1e-4)   # the border

    conv4, conv5 = (a.asnumpy() for a in ours(mx.nd.array(rgb)))
    ref4, ref5 = (a.asnumpy() for a in reference(mx.nd.array(x + 127)))
    for got, want, cells in ((conv4, ref4, slice(7, 22)), (conv5, ref5, slice(14, 16))):
        np.testing.assert_allclose(got[..., cells, cells], want[..., cells, cells], rtol=1e-3,
                                   atol=1e-4 * np.abs(want).max())


def test_fc6_fc7_are_deeplabs_decimation_of_the_zoo_layers(converted):
    """fc6[o, c, i, j] = W6[4o, c, 3i, 3j] (W6 the zoo's 4096 x 512x7x7), fc7[o, i] = W7[4o, 4i],
    biases b[4o] (section 13)."""
    values = {k: v.asnumpy() for k, v in read_params(converted["file"]).items()}
    zoo = zoo_params(converted["zoo"])
    w6 = zoo["features.31.weight"].reshape(4096, 512, 7, 7)
    w7 = zoo["features.33.weight"]
    rng = np.random.RandomState(1)
    for o, c, i, j in zip(rng.randint(1024, size=50), rng.randint(512, size=50),
                          rng.randint(3, size=50), rng.randint(3, size=50)):
        assert values["arg:fc6_weight"][o, c, i, j] == w6[4 * o, c, 3 * i, 3 * j]
    for o, i in zip(rng.randint(1024, size=50), rng.randint(1024, size=50)):
        assert values["arg:fc7_weight"][o, i, 0, 0] == w7[4 * o, 4 * i]
    np.testing.assert_array_equal(values["arg:fc6_weight"], w6[::4, :, ::3, ::3])
    np.testing.assert_array_equal(values["arg:fc7_weight"][:, :, 0, 0], w7[::4, ::4])
    np.testing.assert_array_equal(values["arg:fc6_bias"], zoo["features.31.bias"][::4])
    np.testing.assert_array_equal(values["arg:fc7_bias"], zoo["features.33.bias"][::4])


def test_the_converted_file_initialises_a_model_by_name(converted):
    net = build_model("vgg16_largefov", num_classes=2)
    initialize(net, [mx.cpu()], pretrained=converted["file"])
    params = net.collect_params()
    file = read_params(converted["file"])
    for name in ("conv1_1_weight", "conv5_3_bias", "fc6_weight", "fc7_weight"):
        np.testing.assert_array_equal(params[name].data().asnumpy(), file[f"arg:{name}"].asnumpy())


def test_icd_superpixels_take_the_converted_file(converted, tiny_voc, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text(open(tiny_voc["data_list"]).read().split()[0] + "\n")
    out = str(tmp_path / "superpixels")
    assert superpixels.main(["--image-root", tiny_voc["image_root"], "--data-list", str(one),
                             "--out", out, "--pretrained", converted["file"]]) == 0
    assert len(os.listdir(out)) == 1


def test_icd_train_takes_the_converted_file(converted, tiny_voc, tmp_path):
    snapshot = str(tmp_path / "snapshot")
    assert train.main(["--image-root", tiny_voc["image_root"],
                       "--annotation-root", tiny_voc["annotation_root"],
                       "--superpixel-root", tiny_voc["superpixel_root"],
                       "--data-list", tiny_voc["data_list"], "--pretrained", converted["file"],
                       "--width", "1", "--image-size", "32", "--batch-size", "4",
                       "--num-epoch", "1", "--num-workers", "0", "--snapshot", snapshot]) == 0
    trained = read_params(os.path.join(snapshot, "vgg16_icd-0000.params"))
    assert trained["arg:conv1_1_weight"].shape == (64, 3, 3, 3)


def error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("constructor, name", [(vision.vgg11, "vgg11"),
                                               (vision.resnet18_v1, "resnet18_v1")])
def test_another_architecture_is_refused_naming_the_file(constructor, name, tmp_path_factory,
                                                         tmp_path, capsys):
    _, path = zoo_file(tmp_path_factory, constructor, name, random=False)
    out = str(tmp_path / "vgg16_20M.params")
    assert pretrained_command.main(["--from", path, "--out", out]) == 1
    line = error_line(capsys)
    assert path in line and "not mxnet.gluon.model_zoo.vision.vgg16's parameters" in line
    assert not os.path.exists(out) and not os.path.exists(out + ".json")


def test_a_truncated_file_is_refused_naming_it(converted, tmp_path, capsys):
    truncated = str(tmp_path / os.path.basename(converted["path"]))
    with open(converted["path"], "rb") as f, open(truncated, "wb") as g:
        g.write(f.read(1 << 20))
    out = str(tmp_path / "vgg16_20M.params")
    assert pretrained_command.main(["--from", truncated, "--out", out]) == 1
    line = error_line(capsys)
    assert truncated in line and "not an MXNet parameter file" in line
    assert not os.path.exists(out)


def test_an_existing_output_is_kept(converted, tmp_path, capsys):
    out = tmp_path / "vgg16_20M.params"
    out.write_text("mine")
    assert pretrained_command.main(["--from", converted["path"], "--out", str(out)]) == 1
    assert str(out) in error_line(capsys) and out.read_text() == "mine"


def test_an_empty_model_store_names_the_file_it_looked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")   # no download
    root = str(tmp_path / "empty")
    assert pretrained_command.main(["--from", "modelzoo:vgg16", "--root", root,
                                    "--out", str(tmp_path / "out.params")]) == 1
    line = error_line(capsys)
    assert store_path(VGG16_RELEASE, root) in line and "without network" in line


def test_each_registration_names_its_imagenet_source():
    for name in ("vgg16_icd", "vgg16_cam", "vgg16_bn_cam", "vgg16_largefov", "vgg16_aspp"):
        assert model_spec(name).pretrained is VGG16_RELEASE
    assert model_spec("resnet101_largefov").pretrained is RESNET101_V1B
    assert VGG16_RELEASE.file == "./data/vgg16_20M.params" and VGG16_RELEASE.convert


def test_the_resolver_finds_resnet101_v1b_in_the_cache_folder(tmp_path, monkeypatch):
    """`modelzoo` (or True) is gluoncv's file in the cache folder, a path is taken as it is,
    nothing is random initialisation; VGG16 models need the converted file."""
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    root = str(tmp_path / "models")
    cached = store_path(RESNET101_V1B, root)
    assert os.path.basename(cached).startswith("resnet101_v1b-")
    with pytest.raises(FileNotFoundError, match="without network"):
        imagenet_file("resnet101_largefov", "modelzoo", root)
    open(cached, "wb").close()   # (the store made the folder)
    assert imagenet_file("resnet101_largefov", "modelzoo", root) == cached
    assert imagenet_file("resnet101_largefov", True, root) == cached
    assert imagenet_file("resnet101_largefov", cached) == cached
    assert imagenet_file("resnet101_largefov", "") is None
    with pytest.raises(ValueError, match="icd-pretrained --from modelzoo:vgg16"):
        imagenet_file("vgg16_icd", "modelzoo", root)
    with pytest.raises(FileNotFoundError, match="icd-pretrained --from modelzoo:vgg16 --out"):
        imagenet_file("vgg16_largefov", str(tmp_path / "vgg16_20M.params"))


def test_describe_a_file_without_a_record(converted, tmp_path):
    bare = str(tmp_path / "vgg16_20M.params")
    shutil.copy(converted["file"], bare)
    assert describe_pretrained(bare)["made_from"] == "release file"
    with open(bare + ".json", "w") as f:
        json.dump({"made_from": "something", "sha256": "sha256:0"}, f)
    assert describe_pretrained(bare)["made_from"] == "unknown"
    assert describe_pretrained(converted["path"])["made_from"] == "unknown"   # not the store's


@pytest.mark.slow
def test_icd_run_starts_from_the_converted_file(converted, tiny_voc, tmp_path):
    """Issue 33's end to end: the model-zoo file in the store's cache, `icd-pretrained`, then
    the paper's pipeline (superpixels on its conv5_3, ICD, the CAM baseline, seeds, DeepLab)
    at width 1.0 on tiny images (about 75 s on one CPU)."""
    from icd.commands import run
    data = os.path.dirname(tiny_voc["image_root"])
    lists = os.path.join(data, "ImageSets", "Segmentation")
    small = "width: 1.0\nimage_size: 32\nbatch_size: 4\nnum_epoch: 1\nnum_workers: 0\n" \
            "infer_size: 64\ninfer_batch_size: 2\n"
    (tmp_path / "seg.yaml").write_text(
        f"base: {REPO}/experiments/synthetic_deeplab.yaml\n{small}"
        f"image_root: {tiny_voc['image_root']}\nannotation_root: {tiny_voc['annotation_root']}\n"
        f"classes: {tiny_voc['classes']}\n")
    (tmp_path / "run.yaml").write_text(
        f"base: {REPO}/experiments/synthetic_run.yaml\n{small}warmup_epochs: 0\n"
        f"image_root: {tiny_voc['image_root']}\nannotation_root: {tiny_voc['annotation_root']}\n"
        f"data_list: {tiny_voc['data_list']}\nclasses: {tiny_voc['classes']}\n"
        f"pretrained: {converted['file']}\n"
        f"pipeline:\n  gt_root: {tiny_voc['gt_root']}\n"
        f"  splits: {{train: {tiny_voc['data_list']}}}\n"
        f"  superpixels: {{features: pretrained}}\n  seeds: {{rows: [crf]}}\n"
        f"  segment: {{config: {tmp_path / 'seg.yaml'}, list: {lists}/val.txt}}\n")
    assert run.main(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"),
                     "--cpus", "1", "--workers", "1"]) == 0
    tables = tmp_path / "run" / "tables"
    imagenet = json.loads((tables / "tables.json").read_text())["imagenet"]
    assert imagenet["file"] == converted["file"]
    assert imagenet["made_from"] == describe_pretrained(converted["file"])["made_from"]
    assert imagenet["made_from"].startswith("mxnet model zoo vgg16")
    assert f"ImageNet weights: {imagenet['made_from']}" in (tables / "tables.md").read_text()


def test_the_tables_name_the_imagenet_file(converted):
    """icd-run's tables say which ImageNet file the networks started from."""
    from icd.pipeline.tables import imagenet_source
    assert imagenet_source(None)["made_from"] == "none (random initialisation)"
    assert imagenet_source("modelzoo")["made_from"] == "the model store's file (modelzoo)"
    found = imagenet_source(converted["file"])
    assert found["made_from"] == json.load(open(converted["file"] + ".json"))["made_from"]
    assert found["sha256"] == describe_pretrained(converted["file"])["sha256"]
