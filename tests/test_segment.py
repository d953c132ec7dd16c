"""DeepLab inference (icd.segment, icd-infer-seg): single- and multi-scale, flip, devices, CRF;
few input shapes (canvas steps, fixed batches), the pipelined loop against the serial one, and
the command-line tool."""
import json
import os

import cv2
import mxnet as mx
import numpy as np
import pytest

from icd import segment as segment_module
from icd.checkpoint import save_checkpoint
from icd.crf import DEEPLAB_CRF, dense_crf
from icd.data.dataset import DataPaths
from icd.data.voc import read_image, read_list, write_image
from icd.evaluate import SEG_CLASSES, evaluate_seeds
from icd.model import build_model
from icd.model.pretrained import initialize
from icd.segment import (SegmentSettings, canvas_side, markdown_table, predict_labels,
                         predict_probabilities, segment, upsample_scores, write_label_map)
from icd.visualize import overlay

from helpers import QueueOrder, REPO, load_tool


class ColourNet(mx.gluon.HybridBlock):
    """A deterministic stand-in for a DeepLab model (forward(data RGB 0..255) -> logits at
    stride 8, cell i centred on pixel 8i as theirs): the colour means of the 9 x 9 windows
    around every eighth pixel as 3 class logits, so the probabilities vary with the image and
    the tests of the averaging do not hang on a random initialisation."""

    def hybrid_forward(self, F, x):
        return F.Pooling(x - 127, kernel=(9, 9), stride=(8, 8), pad=(4, 4),
                         pool_type="avg") / 16


@pytest.fixture(scope="module")
def small_net():
    net = ColourNet()
    net.hybridize()
    return net


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8)
            for shape in ((40, 56, 3), (64, 30, 3), (23, 23, 3))]


def upsample_reference(scores: np.ndarray, side: int) -> np.ndarray:
    """NumPy: (K, h, w) -> (K, side, side), linear between the cells, cell i at pixel 8i, the
    pixels past the last cell equal to it."""
    def along(a, axis):
        cells = a.shape[axis]
        position = np.minimum(np.arange(side) / 8, cells - 1)
        return np.apply_along_axis(lambda v: np.interp(position, np.arange(cells), v), axis, a)
    return along(along(scores, 1), 2)


def test_single_scale_equals_the_padded_forward_upsampled(small_net):
    """One scale, no flip: pad to 65 with 127, softmax, upsample (cell i on pixel 8i), crop."""
    probs = predict_probabilities(small_net, images(), [mx.cpu()], infer_size=65)
    for image, prob in zip(images(), probs):
        h, w = image.shape[:2]
        padded = np.full((65, 65, 3), 127, np.float32)
        padded[:h, :w] = image
        logits = small_net(mx.nd.array(padded.transpose(2, 0, 1)[None]))
        soft = mx.nd.softmax(logits, axis=1)[0].asnumpy()
        up = upsample_reference(soft, 65)
        np.testing.assert_allclose(prob, up[:, :h, :w], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(prob.sum(axis=0), 1, atol=1e-5)


@pytest.mark.parametrize("side", [64, 65, 70])
def test_each_score_cell_lands_on_its_centre_pixel(side):
    """A cell's score peaks at pixel (8i, 8j) of the prediction, on canvases of any side
    (8k + 1 or not), as the training labels are read (`nearest_label`); half-pixel centres
    put it at 8i + 3.5."""
    cells = (side + 7) // 8
    scores = np.zeros((1, 1, cells, cells), np.float32)
    scores[0, 0, 3, 5] = 1
    up = upsample_scores(mx.nd.array(scores), side).asnumpy()[0, 0]
    assert up.shape == (side, side)
    assert np.unravel_index(up.argmax(), up.shape) == (24, 40)
    np.testing.assert_allclose(up, upsample_reference(scores[0], side)[0], atol=1e-6)


def test_multi_scale_is_the_mean_of_single_scales(small_net):
    run = lambda scales: predict_probabilities(small_net, images(), [mx.cpu()], 64, scales)
    half, one, both = run((0.5,)), run((1.0,)), run((0.5, 1.0))
    for h, o, b in zip(half, one, both):
        assert h.shape == o.shape
        np.testing.assert_allclose(b, (h + o) / 2, rtol=1e-5, atol=1e-6)
    assert np.abs(half[0] - one[0]).max() > 0.05


def test_flip_averaging_is_mirror_symmetric(small_net):
    originals = images()
    mirrored = [np.ascontiguousarray(im[:, ::-1]) for im in originals]
    a = predict_probabilities(small_net, originals, [mx.cpu()], 64, (1.0, 1.25), flip=True)
    b = predict_probabilities(small_net, mirrored, [mx.cpu()], 64, (1.0, 1.25), flip=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y[:, :, ::-1], rtol=1e-5, atol=1e-6)


def test_devices_split_the_batch(small_net):
    one = predict_probabilities(small_net, images(), [mx.cpu(0)], 64, (0.75, 1.0), True)
    two = predict_probabilities(small_net, images(), [mx.cpu(0), mx.cpu(1)], 64, (0.75, 1.0),
                                True)
    for x, y in zip(one, two):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_crf_cleans_a_noisy_square():
    """A white square on black; the network's guess marks it with 0.6 confidence but 20% of
    the pixels flipped. DeepLab-LargeFOV's CRF restores the square exactly."""
    size, rng = 64, np.random.default_rng(0)
    truth = np.zeros((size, size), np.uint8)
    truth[16:48, 20:52] = 1
    image = np.repeat((truth * 255)[..., None], 3, axis=2).astype(np.uint8)
    noisy = np.where(rng.random(truth.shape) < 0.2, 1 - truth, truth)
    prob = np.stack([np.where(noisy == 0, 0.6, 0.4), np.where(noisy == 1, 0.6, 0.4)])
    prob = prob.astype(np.float32)
    assert (predict_labels(image, prob) != truth).mean() > 0.15
    np.testing.assert_array_equal(predict_labels(image, prob, crf=True), truth)
    marginals = dense_crf(image, prob, DEEPLAB_CRF)
    np.testing.assert_allclose(marginals.sum(axis=0), 1, atol=1e-4)


def test_crf_parameters_are_deeplab_largefovs():
    assert DEEPLAB_CRF.bilateral == dict(sxy=121, srgb=5, compat=4)
    assert DEEPLAB_CRF.gaussian == dict(sxy=3, compat=3) and DEEPLAB_CRF.iterations == 10


def test_markdown_table_layout():
    iou = {c: 0.5 for c in SEG_CLASSES}
    text = markdown_table({"miou": 0.5, "iou": iou, "num_images": 3}, "resnet101_largefov")
    assert "Table 8" in text and "| Ours (paper) | I.+S. | 67.8 | 68.0 |" in text
    assert "| this run: resnet101_largefov, 3 images | I. | 50.0 | – |" in text
    assert "Table 7" in markdown_table({"miou": 0.5, "iou": iou, "num_images": 3},
                                       "vgg16_largefov")


# ---------------------------------------------------------------------------------------------
# Few input shapes: stride-aligned canvas sides, fixed batches

class ShapeRecorder(mx.gluon.Block):
    """Stand-in DeepLab (stride-8 cell means of the image as 3 logits) recording input shapes."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def forward(self, x):
        self.shapes.add(x.shape)
        return mx.nd.Pooling(x - 127, kernel=(8, 8), stride=(8, 8), pool_type="avg") / 16


def coco_like_images(count=22, seed=0):
    """Sizes as COCO's: longer side 480..640, shorter 300..longer (flat content)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        long = int(rng.integers(480, 641))
        short = int(rng.integers(300, long + 1))
        h, w = (long, short) if rng.random() < 0.5 else (short, long)
        images.append(np.full((h, w, 3), rng.integers(0, 256), np.uint8))
    return images


def test_canvas_sides_are_few_and_stride_aligned():
    assert canvas_side([300, 500], 513, 0) == 513 and canvas_side([625], 513, 0) == 625
    assert canvas_side([500], 513, 64) == 513 and canvas_side([514], 513, 64) == 577
    assert canvas_side([577], 513, 64) == 577 and canvas_side([800], 513, 64) == 833
    assert all((canvas_side([s], 513, 64) - 1) % 8 == 0 for s in range(1, 900))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_deeplab_inference_meets_a_bounded_number_of_input_shapes(batch_size):
    """COCO-like sizes at scales 0.75, 1, 1.25 (the last batch short with 4): with
    --canvas-step 64 at most 6 shapes (sides 513..833) of one batch size, whereas DeepLab's
    padding meets one per distinct largest side and view."""
    images, scales = coco_like_images(), (0.75, 1.0, 1.25)

    def shapes(step):
        net = ShapeRecorder()
        for start in range(0, len(images), batch_size):
            predict_probabilities(net, images[start:start + batch_size], [mx.cpu(1)], 513,
                                  scales, canvas_step=step, batch_size=batch_size)
        return net.shapes
    stepped, exact = shapes(64), shapes(0)
    assert len(stepped) <= 6 and {s[0] for s in stepped} == {batch_size}
    assert {s[2] for s in stepped} <= {513, 577, 641, 705, 769, 833}
    assert len(exact) > 6 if batch_size == 1 else len(exact) >= len(stepped)


def test_fixed_batch_and_canvas_step_keep_the_probabilities():
    """Filling a short batch with blank canvases changes nothing (bit for bit); the canvas step
    changes nothing for images within the inference size (their canvas is the same)."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 56), (23, 61))]
    net = ShapeRecorder()
    old = predict_probabilities(net, images, [mx.cpu(1), mx.cpu(2)], 64, (1.0, 0.5), True)
    new = predict_probabilities(net, images, [mx.cpu(1), mx.cpu(2)], 64, (1.0, 0.5), True,
                                canvas_step=64, batch_size=5)
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# The pipelined loop writes the serial loop's files

def serial_segment(net, image_root, names, out_dir, contexts, scales, flip, crf, infer_size,
                   batch_size, classes):
    """The loop of icd.segment before pipelining (the reference for its files)."""
    for start in range(0, len(names), batch_size):
        batch = names[start:start + batch_size]
        images = [read_image(os.path.join(image_root, n + ".jpg")) for n in batch]
        probs = predict_probabilities(net, images, contexts, infer_size, scales, flip)
        for name, image, prob in zip(batch, images, probs):
            labels = predict_labels(image, prob, crf)
            write_label_map(os.path.join(out_dir, "pred", name + ".png"), labels)
            write_image(os.path.join(out_dir, "overlay", name + ".jpg"),
                        overlay(image, labels, classes=classes))


def files_of(folder):
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


@pytest.mark.parametrize("crf, host_workers", [(False, 2), (True, 2), (True, 0)])
def test_pipelined_segmentation_writes_the_serial_loops_files(tiny_voc, tmp_path, crf,
                                                              host_workers):
    """Reads, CRF (in processes with host_workers > 0) and writes beside the devices: the
    files of the serial loop, byte for byte."""
    net = build_model("vgg16_largefov", num_classes=20, width=1 / 16)
    initialize(net, [mx.cpu(1)])
    net.hybridize(static_alloc=True)
    names = read_list(tiny_voc["data_list"])
    args = dict(scales=(1.0, 0.75), flip=True, crf=crf, infer_size=48, batch_size=3)
    classes = tuple(f"c{i}" for i in range(20))
    serial_segment(net, tiny_voc["image_root"], names, str(tmp_path / "serial"), [mx.cpu(1)],
                   **args, classes=classes)
    segment(net, DataPaths(tiny_voc["image_root"], None, tiny_voc["data_list"], classes),
            str(tmp_path / "pipelined"), [mx.cpu(1)], SegmentSettings(**args),
            host_workers=host_workers)
    serial, pipelined = files_of(tmp_path / "serial"), files_of(tmp_path / "pipelined")
    assert len(serial) == 2 * len(names) and serial.keys() == pipelined.keys()
    for key in serial:
        assert serial[key] == pipelined[key], key


def test_pipelined_segmentation_names_a_bad_image_and_leaves_no_partial_file(tiny_voc,
                                                                            tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = read_list(tiny_voc["data_list"])
    for n in names:
        os.link(os.path.join(tiny_voc["image_root"], n + ".jpg"), images / f"{n}.jpg")
    os.remove(images / f"{names[4]}.jpg")
    net = ShapeRecorder()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=f"{names[4]}.jpg: image not found"):
        segment(net, DataPaths(str(images), None, tiny_voc["data_list"],
                               tuple(f"c{i}" for i in range(20))), str(out), [mx.cpu(1)],
                SegmentSettings(infer_size=48, batch_size=2))
    written = files_of(out)
    assert all(k.endswith((".png", ".jpg")) and not os.path.basename(k).startswith(".")
               for k in written)
    for key in written:   # whole files only
        assert cv2.imread(str(out / key)) is not None, key


def test_segmentation_queues_the_next_batch_before_reading_one_back(tiny_voc, tmp_path,
                                                                   monkeypatch):
    order = QueueOrder(monkeypatch, segment_module, "queue_probabilities", list)
    names = segment(ShapeRecorder(), DataPaths(tiny_voc["image_root"], None,
                                               tiny_voc["data_list"],
                                               tuple(f"c{i}" for i in range(20))),
                    str(tmp_path / "out"), [mx.cpu(1)],
                    SegmentSettings(infer_size=48, batch_size=2), host_workers=0)
    order.assert_overlapped(-(-len(names) // 2))


# ---------------------------------------------------------------------------------------------
# The command-line tool

def test_infer_seg_writes_index_pngs_overlays_and_evaluation(tiny_voc, tmp_path, capsys):
    net = build_model("vgg16_largefov", num_classes=20, width=1 / 16)
    net.initialize(mx.init.Xavier(magnitude=2))
    params = str(tmp_path / "deeplab.params")
    save_checkpoint(net, params)
    out = tmp_path / "seg"
    argv = ["--config", os.path.join(REPO, "experiments", "synthetic_deeplab.yaml"),
            "--width", "0.0625", "--image-root", tiny_voc["image_root"],
            "--data-list", tiny_voc["val_list"], "--infer-size", "64", "--cpus", "2",
            "--params", params, "--out", str(out), "--scales", "0.75", "1",
            "--flip", "--crf", "--gt-root", tiny_voc["gt_root"]]
    tool = load_tool("infer_seg")
    assert tool.main(argv) == 0
    names = read_list(tiny_voc["val_list"])
    for name in names:
        pred = cv2.imread(str(out / "pred" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(os.path.join(tiny_voc["image_root"], f"{name}.jpg"))
        assert pred.dtype == np.uint8 and pred.shape == image.shape[:2]   # single channel
        assert pred.max() <= 20
        assert (out / "overlay" / f"{name}.jpg").is_file()
    report = evaluate_seeds(str(out / "pred"), tiny_voc["gt_root"], names)
    written = json.loads((out / "eval.json").read_text())
    assert written["miou"] == pytest.approx(report["miou"])
    assert written["model"] == "vgg16_largefov" and written["num_images"] == len(names)
    assert "| Ours (paper) | I. | 61.2 | 60.9 |" in (out / "eval.md").read_text()

    assert tool.main(argv[:-2] + ["--params", str(tmp_path / "missing.params")]) == 1
    assert f"error: {tmp_path / 'missing.params'}: checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("step", [0, 64])
def test_infer_seg_turns_autotune_off_only_for_the_exact_canvas(tiny_voc, tmp_path, monkeypatch,
                                                                step):
    """--canvas-step 0 (one shape per size): MXNET_CUDNN_AUTOTUNE_DEFAULT=0 unless set; the
    stepped canvases leave autotune as configured. Both write every prediction."""
    from icd.commands import infer_seg
    monkeypatch.delenv("MXNET_CUDNN_AUTOTUNE_DEFAULT", raising=False)
    net = build_model("vgg16_largefov", num_classes=20, width=1 / 16)
    initialize(net, [mx.cpu(0)])
    params = str(tmp_path / "deeplab.params")
    save_checkpoint(net, params)
    out = tmp_path / "seg"
    assert infer_seg.main(["--model", "vgg16_largefov", "--width", "0.0625", "--image-root",
                           tiny_voc["image_root"], "--data-list", tiny_voc["val_list"],
                           "--infer-size", "32", "--cpus", "2", "--params", params, "--out",
                           str(out), "--canvas-step", str(step)]) == 0
    assert os.environ.get("MXNET_CUDNN_AUTOTUNE_DEFAULT") == ("0" if step == 0 else None)
    assert len(os.listdir(out / "pred")) == len(read_list(tiny_voc["val_list"]))
