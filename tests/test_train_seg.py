"""DeepLab trained on seeds or masks through the one training loop (icd.tasks.SegmentationTask)
and the tools/train_seg.py -> tools/infer_seg.py path."""
import json
import os
import shutil

import cv2
import mxnet as mx
import numpy as np
import pytest

import icd.tasks.segmentation
from icd.commands import train_seg
from icd.config import load_config
from icd.data.dataset import DataPaths
from icd.data.synthetic import make_synthetic_voc
from icd.data.voc import VOC_CLASSES, read_list, read_mask, write_mask
from icd.engine import TrainingDiverged, poly_lr
from icd.evaluate import evaluate_seeds
from icd.io import write_json
from icd.metrics import confusion_matrix
from icd.model import MODELS, register
from icd.provenance import record_path
from icd.runs import checkpoint_path
from icd.segment import SegmentSettings, segment
from icd.tasks import train

from helpers import REPO, load_tool, params_of


def seg_config(tiny_config, tiny_voc, **overrides):
    """The segmentation task on the tiny set's ground-truth masks (width 1/16, 32 px crops)."""
    return tiny_config(**{"model": "vgg16_largefov", "label_root": tiny_voc["gt_root"],
                          **overrides})


def test_records_figures_checkpoints_and_poly_lr_per_iteration(tiny_config, tiny_voc):
    cfg = seg_config(tiny_config, tiny_voc, num_epoch=3, learning_rate=0.01)
    records = train(cfg)["records"]
    # 8 images, batch 4: 2 iterations per epoch, 6 in all; an epoch's lr is its first step's
    assert [r["lr"] for r in records] == [poly_lr(0.01, 2 * e, 6) for e in range(3)]
    assert records[1]["lr"] == pytest.approx(0.01 * (1 - 2 / 6) ** 0.9)
    for r in records:
        assert r["seg_loss"] > 0 and 0 <= r["pixel_accuracy"] <= 1 and "warm" not in r
    assert records[-1]["seg_loss"] < records[0]["seg_loss"]
    with open(os.path.join(cfg.snapshot, "vgg16_largefov-log.json")) as f:
        assert json.load(f) == json.loads(json.dumps(records))
    run = json.load(open(checkpoint_path(cfg, 2, "json")))
    assert run["config"]["label_root"] == tiny_voc["gt_root"] and "sign_flip_store" not in run
    picture = cv2.imread(os.path.join(cfg.snapshot, "demo", "vgg16_largefov-0002.jpg"))
    assert picture.shape == (32, 3 * 32, 3)   # image | labels | prediction


def test_resume_with_dropout_is_bit_identical(tiny_config, tiny_voc):
    """A 4-epoch run with dropout 0.5 equals its checkpoint of epoch 1 resumed to epoch 4."""
    straight = seg_config(tiny_config, tiny_voc, num_epoch=4, dropout=0.5)
    straight.snapshot += "_straight"
    records = train(straight)["records"]
    resumed = seg_config(tiny_config, tiny_voc, num_epoch=4, dropout=0.5, begin_epoch=2)
    os.makedirs(resumed.snapshot)
    for suffix in ("params", "states", "json"):   # a run stopped after epoch 1
        shutil.copy(checkpoint_path(straight, 1, suffix), resumed.snapshot)
    shutil.copy(os.path.join(straight.snapshot, "vgg16_largefov-log.json"), resumed.snapshot)
    again = train(resumed)["records"]
    a, b = params_of(checkpoint_path(straight, 3)), params_of(checkpoint_path(resumed, 3))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert [r["lr"] for r in again] == [r["lr"] for r in records]
    assert [r["seg_loss"] for r in again[2:]] == [r["seg_loss"] for r in records[2:]]


def test_two_devices_step_equals_one_device_step(tiny_config, tiny_voc):
    """One step (8 images, batch 8) from the same initialisation on cpu(0), cpu(1) equals the
    step on one device: the loss is summed over images and the Trainer rescales by the batch."""
    one = seg_config(tiny_config, tiny_voc, num_epoch=1, batch_size=8, learning_rate=0.01)
    one.snapshot += "_one"
    two = seg_config(tiny_config, tiny_voc, num_epoch=1, batch_size=8, learning_rate=0.01,
                     cpus=2)
    train(one)
    net = train(two)["net"]
    weights = net.collect_params()["fc8_weight"].list_data()
    assert len(weights) == 2 and (weights[0] - weights[1]).abs().max().asscalar() == 0
    still = seg_config(tiny_config, tiny_voc, num_epoch=1, batch_size=8, learning_rate=1e-30)
    still.snapshot += "_still"
    train(still)
    a, b = params_of(checkpoint_path(one, 0)), params_of(checkpoint_path(two, 0))
    start = params_of(checkpoint_path(still, 0))   # the common initialisation, (almost) unmoved
    assert np.abs(a["arg:fc8_weight"] - start["arg:fc8_weight"]).max() > 1e-3
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_nan_loss_stops_naming_the_last_good_checkpoint(tiny_config, tiny_voc, monkeypatch):
    cfg = seg_config(tiny_config, tiny_voc, num_epoch=1)
    train(cfg)
    before = open(checkpoint_path(cfg, 0), "rb").read()
    loss = icd.tasks.segmentation.segmentation_loss
    monkeypatch.setattr(icd.tasks.segmentation, "segmentation_loss",
                        lambda F, logits, label: loss(F, logits, label) * np.nan)
    with pytest.raises(TrainingDiverged, match=r"epoch 1 by iteration 2 \(seg_loss nan\).*last "
                                               r"good checkpoint: .*vgg16_largefov-0000.params"):
        train(seg_config(tiny_config, tiny_voc, num_epoch=3, begin_epoch=1))
    assert open(checkpoint_path(cfg, 0), "rb").read() == before
    assert not os.path.exists(checkpoint_path(cfg, 1))


@pytest.fixture(scope="module")
def one_class_voc(tmp_path_factory):
    """32 train / 12 val images of ~64 px holding aeroplanes only (bodies on textures)."""
    root = str(tmp_path_factory.mktemp("one_class_voc"))
    make_synthetic_voc(root, num_train=32, num_val=12, size=64, seed=3, classes=("aeroplane",))
    return root


@pytest.mark.slow
def test_short_training_on_masks_beats_chance_on_val(one_class_voc, tmp_path):
    """30 epochs on the masks of a one-class synthetic set, then val mIoU (release rule, 21
    classes) beats the best constant prediction, and the aeroplanes are found.

    Adam, as the demo's stand-in pre-training: the recipe's SGD needs the ImageNet start; from a
    random init a VGG16 without BatchNorm sits on the all-background plateau for tens of epochs
    (measured: SGD lr 3e-3, 60 epochs, aeroplane IoU 0.17-0.51 over seeds 0-3; Adam lr 1e-3,
    30 epochs, 0.41-0.58)."""
    voc = one_class_voc
    cfg = load_config(os.path.join(REPO, "experiments", "synthetic_deeplab.yaml"),
                      image_root=os.path.join(voc, "JPEGImages"),
                      data_list=os.path.join(voc, "ImageSets", "Segmentation", "train.txt"),
                      label_root=os.path.join(voc, "SegmentationClass"), pretrained="",
                      image_size=64, batch_size=8, num_epoch=30, optimizer="adam",
                      num_workers=0, snapshot=str(tmp_path / "snapshot"))
    net = train(cfg)["net"]
    val = os.path.join(voc, "ImageSets", "Segmentation", "val.txt")
    out = str(tmp_path / "seg")
    # read as VOC data (the model has VOC's 21 outputs): its one class, aeroplane, is VOC's id 1
    segment(net, DataPaths(cfg.image_root, None, val, VOC_CLASSES), out, [mx.cpu()],
            SegmentSettings(infer_size=80))
    result = evaluate_seeds(os.path.join(out, "pred"), os.path.join(voc, "SegmentationClass"),
                            read_list(val), classes=VOC_CLASSES)
    gt = [read_mask(os.path.join(voc, "SegmentationClass", f"{n}.png")) for n in read_list(val)]
    counts = sum(confusion_matrix(g, np.zeros_like(g), 21) for g in gt).sum(axis=1)
    chance = counts.max() / counts.sum() / len(counts)   # every pixel the most frequent class
    assert result["miou"] > 1.25 * chance
    assert result["iou"]["aeroplane"] > 0.25


# ---------------------------------------------------------------------------------------------
# A trainer that can be trusted: it overfits a handful of images, and the labels the
# loss sees line up with the image

def test_icd_train_seg_overfits_a_handful_of_images(tmp_path):
    """icd-train-seg on the ground truth of 4 synthetic images (width 1/8, 64 px crops, no
    dropout) fits them: >= 95% pixel accuracy on its training crops over the last 20 of 400
    steps (measured: 96.9%; the augmentation still rescales and mirrors every crop)."""
    data = str(tmp_path / "voc")
    make_synthetic_voc(data, num_train=4, num_val=2, size=64, seed=3)
    snapshot = str(tmp_path / "deeplab")
    argv = ["--config", os.path.join(REPO, "experiments", "synthetic_deeplab.yaml"),
            "--image-root", os.path.join(data, "JPEGImages"),
            "--data-list", os.path.join(data, "ImageSets", "Segmentation", "train.txt"),
            "--classes", os.path.join(data, "classes.txt"),
            "--seeds", os.path.join(data, "SegmentationClass"), "--pretrained", "",
            "--width", "0.125", "--image-size", "64", "--batch-size", "4", "--dropout", "0",
            "--optimizer", "adam", "--learning-rate", "0.001", "--num-epoch", "400",
            "--num-workers", "0", "--num-save", "1", "--log-frequency", "1000", "--cpus", "1",
            "--snapshot", snapshot]
    assert train_seg.main(argv) == 0
    with open(os.path.join(snapshot, "vgg16_largefov-log.json")) as f:
        records = json.load(f)
    assert records[0]["pixel_accuracy"] < 0.8
    assert np.mean([r["pixel_accuracy"] for r in records[-20:]]) >= 0.95


class Stride8Net(mx.gluon.HybridBlock):
    """A small network with the DeepLab networks' geometry (score cell i centred on pixel 8i:
    three 3x3 stride-2 poolings with padding 1) that learns in seconds (BatchNorm)."""

    def __init__(self, num_classes=20, width=1.0, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = mx.gluon.nn.HybridSequential()
            for i in range(4):
                self.body.add(mx.gluon.nn.Conv2D(32, 3, padding=1, in_channels=3 if i == 0 else 32),
                              mx.gluon.nn.BatchNorm(in_channels=32),
                              mx.gluon.nn.Activation("relu"))
                if i < 3:
                    self.body.add(mx.gluon.nn.MaxPool2D(3, 2, 1))
            self.head = mx.gluon.nn.Conv2D(num_classes + 1, 1, in_channels=32)

    def hybrid_forward(self, F, x):
        return self.head(self.body((x - 127) / 64))


def colour_blocks(root, count=8, side=64, seed=0):
    """Images of overlapping 8-19 px rectangles in three colours whose label maps are the
    colours (0 dark, 1 red, 2 green): labels drawn from the image itself."""
    rng = np.random.default_rng(seed)
    colours = np.array([[40, 40, 40], [230, 60, 60], [60, 200, 60]], np.uint8)
    for folder in ("JPEGImages", "SegmentationClass"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    names = [f"blocks_{k}" for k in range(count)]
    for name in names:
        label = np.zeros((side, side), np.uint8)
        for _ in range(30):
            (h, w), (y, x) = rng.integers(8, 20, 2), rng.integers(0, side, 2)
            label[y:y + h, x:x + w] = rng.integers(0, 3)
        cv2.imwrite(os.path.join(root, "JPEGImages", f"{name}.jpg"), colours[label][:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 98])
        write_mask(os.path.join(root, "SegmentationClass", f"{name}.png"), label)
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("red\ngreen\n")


@pytest.fixture
def stride8_net():
    register("stride8_test_net", Stride8Net, task="segmentation")
    yield "stride8_test_net"
    MODELS.pop("stride8_test_net")


def test_labels_drawn_from_the_image_are_learned(stride8_net, tmp_path):
    """The label of every score cell is the colour at its centre pixel, so a network that sees
    the image learns them nearly all (200 steps: 94.7% over the last 20 against 88.8% when the
    labels are shrunk by the corner-aligned rule, which reads pixel 9i instead of 8i on these
    64 px crops); the augmentation's scale, mirror and crop move image and labels together."""
    data = str(tmp_path / "blocks")
    colour_blocks(data)
    cfg = load_config(None, model=stride8_net, image_root=os.path.join(data, "JPEGImages"),
                      data_list=os.path.join(data, "train.txt"),
                      label_root=os.path.join(data, "SegmentationClass"),
                      classes=os.path.join(data, "classes.txt"), pretrained="", image_size=64,
                      batch_size=8, num_epoch=200, optimizer="adam", learning_rate=0.01,
                      dropout=0.0, num_workers=0, num_save=1, log_frequency=1000,
                      snapshot=str(tmp_path / "snapshot"))
    records = train(cfg)["records"]
    assert np.mean([r["pixel_accuracy"] for r in records[-20:]]) >= 0.93


def test_train_seg_then_infer_seg_end_to_end(tiny_voc, tmp_path, capsys):
    snapshot = str(tmp_path / "deeplab")
    common = ["--config", os.path.join(REPO, "experiments", "synthetic_deeplab.yaml"),
              "--image-root", tiny_voc["image_root"], "--width", "0.0625", "--cpus", "2",
              "--snapshot", snapshot]
    train_argv = common + ["--data-list", tiny_voc["data_list"], "--seeds", tiny_voc["gt_root"],
                           "--image-size", "32", "--batch-size", "4", "--num-epoch", "2",
                           "--num-workers", "0"]
    assert load_tool("train_seg").main(train_argv) == 0
    assert os.path.isfile(os.path.join(snapshot, "vgg16_largefov-0001.params"))
    capsys.readouterr()

    infer = load_tool("infer_seg")
    out = tmp_path / "seg"
    assert infer.main(common + ["--num-epoch", "2", "--data-list", tiny_voc["val_list"],
                                "--infer-size", "64", "--out", str(out), "--scales", "1", "1.25",
                                "--flip", "--gt-root", tiny_voc["gt_root"]]) == 0
    names = read_list(tiny_voc["val_list"])
    for name in names:
        pred = cv2.imread(str(out / "pred" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(os.path.join(tiny_voc["image_root"], f"{name}.jpg"))
        assert pred.dtype == np.uint8 and pred.shape == image.shape[:2] and pred.max() <= 20
    written = json.loads((out / "eval.json").read_text())
    report = evaluate_seeds(str(out / "pred"), tiny_voc["gt_root"], names)
    assert written["miou"] == pytest.approx(report["miou"]) and written["num_images"] == 4

    # a fresh run into the same snapshot refuses, --overwrite replaces it
    assert load_tool("train_seg").main(train_argv) == 1
    assert "holds checkpoints of vgg16_largefov" in capsys.readouterr().err
    assert load_tool("train_seg").main(train_argv + ["--num-epoch", "1", "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(snapshot, "vgg16_largefov-0001.params"))


def test_train_seg_refuses_unfinished_seeds_and_non_segmentation_models(tiny_voc, tmp_path,
                                                                         capsys):
    seeds = tmp_path / "seeds" / "crf"
    shutil.copytree(tiny_voc["gt_root"], seeds)
    write_json(record_path(str(seeds)), {"stage": "seeds", "state": "running", "pid": 1,
                                         "host": "h", "started": "then"})
    argv = ["--config", os.path.join(REPO, "experiments", "synthetic_deeplab.yaml"),
            "--image-root", tiny_voc["image_root"], "--data-list", tiny_voc["data_list"],
            "--width", "0.0625", "--image-size", "32", "--batch-size", "4", "--num-epoch", "1",
            "--num-workers", "0", "--snapshot", str(tmp_path / "snapshot")]
    tool = load_tool("train_seg")
    assert tool.main(argv + ["--seeds", str(seeds)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {seeds}: the seeds run that writes it is running") and \
        err.count("\n") == 1
    assert tool.main(argv + ["--seeds", str(tmp_path / "none")]) == 1
    assert f"error: {tmp_path / 'none'}: no label map for 8 of the 8 images" in \
        capsys.readouterr().err
    assert tool.main(argv + ["--seeds", tiny_voc["gt_root"], "--model", "vgg16_icd"]) == 1
    assert "error: --model: vgg16_icd is not a segmentation model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "snapshot")
