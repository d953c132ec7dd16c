"""Issue 25 on CPU: what would break, differ or idle on GPUs.

Devices are CPU contexts other than cpu(0) (MXNet does not check device ids between an
operator's inputs, so an array left on the default device goes unnoticed on CPU and fails or
copies on GPUs); host synchronisation is caught by making the sync calls raise; the DeepLab
inference's input shapes are counted; the pipelined inference loops are compared file by file
with serial ones.
"""
import contextlib
import multiprocessing
import os

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from icd import amp
from icd import devices as devices_module
from icd import distributed as dist
from icd.bench import loader_throughput
from icd.checkpoint import gather, load_checkpoint, save_checkpoint
from icd.model.pretrained import initialize
from icd.commands import superpixels as superpixels_command
from icd.data import superpixels as sp
from icd.config import Config, load_config
from icd.data.dataset import DataPaths, InferDataset, infer_loader, train_loader
from icd.data.segmentation import segmentation_loader
from icd.features import cell_shares, conv5_feature_extractor, make_feature_factory
from icd.data.voc import read_image, read_list, write_image
from icd.visualize import overlay
from icd import infer as infer_module
from icd import segment as segment_module
from icd.infer import OUTPUT_FOLDERS, infer
from icd.model import build_model, model_from_config
from icd.model.icd_net import ICDNet
from icd.segment import (SegmentSettings, canvas_side, predict_labels, predict_probabilities,
                         segment, write_label_map)
from icd.engine import make_trainer
from icd.tasks import ICDTask, RunningMetrics

DEVICES = [mx.cpu(1), mx.cpu(2)]


# ---------------------------------------------------------------------------------------------
# A training step on cpu(1), cpu(2): every array stays on its device, no host synchronisation

def _icd_step(tiny_config, contexts, precision="off"):
    """An ICD task, network and trainer on `contexts`, as the training loop sets them up, and a
    function running one step (forward, backward, optimizer, figures) on a batch; `precision`
    fp16 gives the loss-scaled Trainer (its operators stay float32 here: no amp.init)."""
    cfg = tiny_config(batch_size=4)
    task = ICDTask(cfg)
    loader = task.loader()
    net = model_from_config(cfg)
    task.initialize(net, contexts)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net, cfg.learning_rate, cfg.momentum, cfg.wd, cfg.optimizer, "device",
                           precision)
    task.start(net, contexts, None, dist.Workers("device"))

    def step(batch, figures):
        inputs = task.inputs(batch, contexts, 0)
        with autograd.record():
            outputs = [task.forward(net, device) for device in inputs]
        amp.backward([out["loss"] for out in outputs], trainer)
        trainer.step(cfg.batch_size)
        batch_figures = RunningMetrics(task, contexts[0])
        task.update_metrics(batch_figures, outputs, inputs)
        figures.add(batch_figures)
        return inputs, outputs
    return task, net, trainer, loader, step


def test_training_step_keeps_every_array_on_its_device(tiny_config):
    task, net, _, loader, step = _icd_step(tiny_config, DEVICES)
    try:
        batch = next(iter(loader))
        figures = RunningMetrics(task, DEVICES[0])
        inputs, outputs = step(batch, figures)
        for ctx, device_inputs, device_outputs in zip(DEVICES, inputs, outputs):
            losses = device_outputs.pop("losses")
            arrays = {**device_inputs, **device_outputs, **losses}
            assert {"cam_loss", "bu_loss", "td_loss"} <= set(arrays)   # the named losses too
            for name, array in arrays.items():
                assert array.context == ctx, name
            assert device_inputs["data"].dtype == np.float32   # the loader's uint8, cast here
        for name, param in net.collect_params().items():
            assert param.list_ctx() == DEVICES, name
            for ctx, data in zip(DEVICES, param.list_data()):
                assert data.context == ctx, name
            if param.grad_req != "null":
                for ctx, grad in zip(DEVICES, param.list_grad()):
                    assert grad.context == ctx, name
        moving = net.icd_accum_resign_moving_mean.list_data()    # the sign flip's aux state
        assert [m.context for m in moving] == DEVICES
        assert task.store is not None and task.store.master.context == DEVICES[0]
        # (the Trainer's momentum lives in the kvstore's merge buffers, cpu_pinned(0) with CPU
        # contexts and the GPUs with GPU ones: MXNet's placement, saved device-free by item 1)
        for array in (figures.sums, figures.low, figures.high):
            assert array.context == DEVICES[0]
        values = figures.read()
        assert np.isfinite(values["cam_loss"]) and values["icd_min"] <= values["icd_max"]
    finally:
        task.stop(net)


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Make NDArray.asnumpy, asscalar, wait_to_read and mx.nd.waitall raise."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise HostSync(f"{name} inside a training step")
        return call
    patched = [(mx.nd.NDArray, "asnumpy"), (mx.nd.NDArray, "asscalar"),
               (mx.nd.NDArray, "wait_to_read"), (mx.nd, "waitall"), (mx.ndarray, "waitall")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    for owner, name in patched:
        setattr(owner, name, forbidden(name))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@pytest.mark.parametrize("precision", ["off", "fp16"])
def test_no_host_synchronisation_inside_a_training_step(tiny_config, precision):
    """Forward, backward, the optimizer step (first and later: the kvstore's setup too), with
    fp16 the loss scaling and its overflow check, and the figures queue work only; a step reads
    nothing back to the host."""
    task, net, trainer, loader, step = _icd_step(tiny_config, DEVICES, precision)
    try:
        figures = RunningMetrics(task, DEVICES[0])
        batches = iter(loader)
        for _ in range(2):
            batch = next(batches)
            with no_host_sync():
                step(batch, figures)
        mx.nd.waitall()
        assert np.isfinite(figures.read()["cam_loss"])
        if precision == "fp16":
            assert amp.trainer_state(trainer)["unskipped"] == 2
    finally:
        task.stop(net)


def test_the_sync_patch_catches_a_sync():
    with no_host_sync(), pytest.raises(HostSync, match="asnumpy"):
        mx.nd.ones((1,), ctx=DEVICES[0]).asnumpy()
    with no_host_sync(), pytest.raises(HostSync, match="waitall"):
        mx.nd.waitall()
    assert mx.nd.ones((1,)).asnumpy()[0] == 1   # restored


def test_custom_operators_keep_their_devices():
    """The sign flip and the superpixel pooling (custom operators) inside ICDNet on cpu(2)."""
    ctx = DEVICES[1]
    net = build_model("vgg16_icd", num_classes=3, width=1 / 16)
    initialize(net, [ctx])
    rng = np.random.default_rng(0)
    data = mx.nd.array(rng.uniform(0, 255, (2, 3, 32, 32)), ctx=ctx)
    superpixel = mx.nd.array(rng.integers(0, 5, (2, 32, 32)), ctx=ctx)
    label = mx.nd.array([[1, 0, 0], [0, 1, 1]], ctx=ctx)
    warm = mx.nd.ones((1,), ctx=ctx)
    net.hybridize(static_alloc=True)
    data.attach_grad()
    with autograd.record():
        outputs = net(data, superpixel, label, warm)
    autograd.backward([outputs[-1]])
    for name, array in zip(net.output_names, outputs):
        assert array.context == ctx, name
    assert data.grad.context == ctx
    for name, param in net.collect_params().items():
        assert param.data(ctx).context == ctx, name


# ---------------------------------------------------------------------------------------------
# DeepLab inference: few input shapes, and the same probabilities as the serial loop

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


class QueueOrder:
    """Records, in order, each call of `module.name` (queueing batch t's forward: ("queue", t))
    and each host read-back of an array it returned (("read", t))."""

    def __init__(self, monkeypatch, module, name, arrays_of):
        self.events, self.tags = [], {}
        queue, read = getattr(module, name), mx.nd.NDArray.asnumpy

        def queued(*args, **kwargs):
            result = queue(*args, **kwargs)
            t = sum(kind == "queue" for kind, _ in self.events)
            self.events.append(("queue", t))
            self.tags.update({id(a): (t, a) for a in arrays_of(result)})
            return result

        def asnumpy(array):
            if id(array) in self.tags:
                self.events.append(("read", self.tags[id(array)][0]))
            return read(array)

        monkeypatch.setattr(module, name, queued)
        monkeypatch.setattr(mx.nd.NDArray, "asnumpy", asnumpy)

    def assert_overlapped(self, batches):
        """Batch t+1's forward was queued before anything of batch t was read back."""
        assert [t for kind, t in self.events if kind == "queue"] == list(range(batches))
        for t in range(batches - 1):
            assert self.events.index(("queue", t + 1)) < self.events.index(("read", t)), \
                self.events


def test_inference_queues_the_next_batch_before_reading_one_back(tiny_config, tmp_path,
                                                                monkeypatch):
    cfg = tiny_config(infer_batch_size=2, num_workers=0)
    net = model_from_config(cfg)
    initialize(net, [mx.cpu(0)])
    params = str(tmp_path / "model.params")
    save_checkpoint(net, params)
    order = QueueOrder(monkeypatch, infer_module, "_queue",
                       lambda result: [a for device in result[1] for a in device.values()])
    names = infer(cfg, params, str(tmp_path / "results"), DEVICES)
    order.assert_overlapped(-(-len(names) // 2))


def test_segmentation_queues_the_next_batch_before_reading_one_back(tiny_voc, tmp_path,
                                                                   monkeypatch):
    order = QueueOrder(monkeypatch, segment_module, "queue_probabilities", list)
    names = segment(ShapeRecorder(), DataPaths(tiny_voc["image_root"], None,
                                               tiny_voc["data_list"],
                                               tuple(f"c{i}" for i in range(20))),
                    str(tmp_path / "out"), [mx.cpu(1)],
                    SegmentSettings(infer_size=48, batch_size=2), host_workers=0)
    order.assert_overlapped(-(-len(names) // 2))


def test_pipelined_score_maps_equal_the_serial_loops(tiny_config, tiny_voc, tmp_path):
    """icd.infer's files hold exactly what the network returns for the loader's batches."""
    cfg = tiny_config(infer_batch_size=3, num_workers=0)
    net = model_from_config(cfg)
    initialize(net, [mx.cpu(0)])
    params = str(tmp_path / "model.params")
    save_checkpoint(net, params)
    out = str(tmp_path / "results")
    names = infer(cfg, params, out, [mx.cpu(1), mx.cpu(2)])
    assert names == read_list(cfg.data_list)

    reference = model_from_config(cfg)
    load_checkpoint(reference, params, [mx.cpu(1), mx.cpu(2)])
    reference.hybridize(static_alloc=True)
    loader = infer_loader(cfg.image_root, cfg.superpixel_root, cfg.annotation_root,
                          cfg.data_list, image_size=cfg.infer_size, batch_size=3,
                          classes=cfg.class_names)
    seen = set()
    for data, superpixel, label, index, _ in loader:
        parts = devices_module.split_batch(
            {"data": data, "superpixel": superpixel, "label": label}, [mx.cpu(1), mx.cpu(2)])
        outs = [dict(zip(reference.output_names, reference(
            part["data"], part["superpixel"], part["label"],
            mx.nd.ones((1,), ctx=part["data"].context)))) for part in parts]
        for j, i in enumerate(index.asnumpy()):
            name = names[int(i)]
            if name in seen:
                continue
            seen.add(name)
            present = np.flatnonzero(label[j].asnumpy())
            for key, folder in OUTPUT_FOLDERS.items():
                if key not in outs[0]:
                    continue
                expected = np.concatenate([o[key].asnumpy() for o in outs])[j, present]
                np.testing.assert_array_equal(
                    np.load(os.path.join(out, folder, name + ".npy")), expected)
    assert seen == set(names)


# ---------------------------------------------------------------------------------------------
# Loader: uint8 bytes, exact float32 on the device

def test_loader_ships_uint8_and_the_device_cast_is_exact(tiny_voc):
    args = (tiny_voc["image_root"], tiny_voc["superpixel_root"], tiny_voc["annotation_root"],
            tiny_voc["data_list"])
    data, superpixel, label = next(iter(train_loader(*args, image_size=32, batch_size=4,
                                                     num_workers=0)))
    assert data.dtype == np.uint8 and superpixel.dtype == np.uint8
    assert label.dtype == np.float32
    part = devices_module.split_batch({"data": data, "superpixel": superpixel},
                                      [mx.cpu(1)])[0]
    assert part["data"].dtype == np.float32 and part["data"].context == mx.cpu(1)
    np.testing.assert_array_equal(part["data"].asnumpy(), data.asnumpy().astype(np.float32))
    item = InferDataset(*args, image_size=48)[0]
    assert item[0].dtype == np.uint8 and item[0].shape == (3, 48, 48)


def test_deeplab_loader_ships_uint8_and_the_device_cast_is_exact(tiny_voc):
    """The DeepLab loader as the ICD ones: image and label map as bytes, float32 on the device
    (255, the ignore label, included)."""
    data, label = next(iter(segmentation_loader(tiny_voc["image_root"], tiny_voc["gt_root"],
                                                tiny_voc["data_list"], crop_size=32,
                                                batch_size=4, num_workers=0)))
    assert data.dtype == np.uint8 and label.dtype == np.uint8
    assert (label.asnumpy() == 255).any()   # the crop's padding: ignore
    parts = devices_module.split_batch({"data": data, "label": label}, DEVICES)
    for name, host in (("data", data), ("label", label)):
        device = np.concatenate([p[name].asnumpy() for p in parts])
        assert all(p[name].dtype == np.float32 for p in parts)
        np.testing.assert_array_equal(device, host.asnumpy().astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Superpixel features on the run's devices, reduced per region there

@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    net = ICDNet(num_classes=3, width=0.0625)
    initialize(net, [mx.cpu()])
    path = str(tmp_path_factory.mktemp("backbone") / "vgg16.params")
    mx.nd.save(path, gather(net))
    return path


def textured(h, w, seed):
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8), (w, h))
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(120, 90), (70, 130)])
def test_region_means_on_the_device_equal_the_per_pixel_ones(backbone_file, size):
    """conv5 x cell shares on cpu(1) = the region means of the upsampled per-pixel map (to
    float32 rounding), hence the same superpixels; the shares of a region sum to its size."""
    features = conv5_feature_extractor(backbone_file, mx.cpu(1), input_size=100)
    image = textured(*size, seed=size[0])
    labels = sp.initial_regions(image)
    expected, expected_sizes = sp.region_means(labels, features(image))
    means, sizes = features.region_means(image, labels)
    np.testing.assert_array_equal(sizes, expected_sizes)
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 0.1
    shares = cell_shares(labels, (max(100, size[0]), max(100, size[1])), (13, 17))
    np.testing.assert_allclose(shares.sum(axis=1), sizes, rtol=1e-5)
    np.testing.assert_array_equal(sp.compute_superpixels(image, features(image), 8),
                                  sp.compute_superpixels(image, features, 8))


def test_superpixel_features_run_on_the_devices_they_are_given(backbone_file, monkeypatch):
    """The feature network and its conv5 live on the device passed; the
    factory a worker calls builds on its device of the list (k mod D in pool worker k)."""
    features = conv5_feature_extractor(backbone_file, mx.cpu(2), input_size=64)
    assert {ctx for p in features.net.collect_params().values() for ctx in p.list_ctx()} == \
        {mx.cpu(2)}
    image = textured(40, 50, seed=1)
    assert features._conv5(image)[0].context == mx.cpu(2)
    devices = ["cpu(2)", "cpu(1)"]
    assert make_feature_factory(backbone_file, devices)().ctx == mx.cpu(2)   # no pool worker
    for worker, ctx in ((1, mx.cpu(2)), (2, mx.cpu(1)), (3, mx.cpu(2))):
        monkeypatch.setattr(multiprocessing.current_process(), "_identity", (worker,))
        assert make_feature_factory(backbone_file, devices)().ctx == ctx


def test_superpixels_command_on_two_devices_writes_the_single_device_maps(backbone_file,
                                                                         tiny_voc, tmp_path,
                                                                         capsys):
    out = tmp_path / "sp"
    command = ["--image-root", tiny_voc["image_root"], "--data-list", tiny_voc["val_list"],
               "--out", str(out), "--pretrained", backbone_file]
    assert superpixels_command.main(command + ["--cpus", "2", "--workers", "2"]) == 0
    features = conv5_feature_extractor(backbone_file, mx.cpu(0))   # the former per-pixel path
    for name in read_list(tiny_voc["val_list"]):
        image = read_image(os.path.join(tiny_voc["image_root"], name + ".jpg"))
        expected = sp.compute_superpixels(image, features(image))
        np.testing.assert_array_equal(
            sp.read_superpixels(str(out / f"{name}.png"), image.shape[:2]), expected)
    assert superpixels_command.main(command + ["--gpus", "0", "--cpus", "2"]) != 0
    assert "error: --gpus, --cpus: give either GPUs or CPU contexts" in capsys.readouterr().err


def test_bench_measures_the_loaders_throughput_in_uint8_batches():
    figures = loader_throughput(32, 2, workers=0, batches=2, image_size=48)
    assert figures["images"] == 4 and figures["images_per_s"] > 0 and figures["workers"] == 0
    num_classes = 6    # labels over the synthetic set's own 6 classes (its classes.txt)
    assert figures["bytes_per_batch"] == 2 * (3 * 32 * 32 + 32 * 32) + 2 * num_classes * 4


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


def test_batches_are_not_pinned_unless_asked_even_with_gpus(tiny_voc, monkeypatch):
    """Pinned memory is opt-in (MXNet 1.9.1 allocates and frees it for every batch): by default
    no loader pins, on a machine with GPUs too, and the config's pin_memory is off."""
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 2)
    args = (tiny_voc["image_root"], tiny_voc["superpixel_root"], tiny_voc["annotation_root"],
            tiny_voc["data_list"])
    data = next(iter(train_loader(*args, image_size=32, batch_size=4, num_workers=0)))[0]
    assert data.context == mx.cpu(0)
    data = next(iter(infer_loader(*args, image_size=32, batch_size=2)))[0]
    assert data.context == mx.cpu(0)
    data = next(iter(segmentation_loader(tiny_voc["image_root"], tiny_voc["gt_root"],
                                         tiny_voc["data_list"], crop_size=32, batch_size=4,
                                         num_workers=0)))[0]
    assert data.context == mx.cpu(0)
    assert Config().pin_memory is False
    assert load_config(None, pin_memory=True).pin_memory is True


def test_pinned_batches_reach_the_devices_as_float32(tiny_voc):
    """pin_memory=True (opt-in) on a CPU build: batches in page-locked host memory, split onto
    the devices and cast there."""
    args = (tiny_voc["image_root"], tiny_voc["superpixel_root"], tiny_voc["annotation_root"],
            tiny_voc["data_list"])
    data, superpixel, label = next(iter(train_loader(*args, image_size=32, batch_size=4,
                                                     num_workers=0, pin_memory=True)))
    assert data.context == mx.Context("cpu_pinned", 0)
    parts = devices_module.split_batch({"data": data, "label": label}, DEVICES)
    assert [p["data"].context for p in parts] == DEVICES
    assert all(p["data"].dtype == np.float32 for p in parts)


def test_icd_run_builds_the_superpixel_features_on_the_runs_devices(backbone_file, tiny_voc,
                                                                    tmp_path, monkeypatch):
    """icd-run's superpixel step on the run's devices (cpu(1), cpu(2)): pool worker k builds
    its conv5_3 extractor, weights included, on device k mod 2; the pool has worker_plan's
    processes, each spawned capped at cores // processes threads (the pool is simulated in
    this process: worker k is the process whose multiprocessing identity is (k,))."""
    import multiprocessing
    from conftest import REPO
    from icd import features
    from icd.pipeline import settings as pipeline_settings, superpixels as superpixel_step
    config = tmp_path / "run.yaml"
    config.write_text(f"""base: {os.path.join(REPO, "experiments", "synthetic_run.yaml")}
image_root: {tiny_voc["image_root"]}
annotation_root: {tiny_voc["annotation_root"]}
data_list: {tiny_voc["data_list"]}
classes: {tiny_voc["classes"]}
pretrained: {backbone_file}
width: 0.0625
pipeline:
  cam: null
  splits: {{train: {tiny_voc["data_list"]}}}
  superpixels: {{features: pretrained}}
  segment: {{config: null}}
""")
    monkeypatch.setattr(superpixel_step, "parse_devices", lambda gpus="", cpus=0: list(DEVICES))
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    built, pools = [], []
    build = features.build_feature_fn
    monkeypatch.setattr(features, "build_feature_fn",
                        lambda pretrained, ctx: built.append(build(pretrained, ctx)) or built[-1])
    process = multiprocessing.current_process()

    def pool(func, items, workers, desc, initializer=None, initargs=(), ordered=False,
             env=None):
        pools.append((workers, env))
        for k in range(1, workers + 1):
            monkeypatch.setattr(process, "_identity", (k,))
            initializer(*initargs)
        monkeypatch.setattr(process, "_identity", ())
        return iter([])
    monkeypatch.setattr(sp, "map_images", pool)
    settings = pipeline_settings.PaperSettings(str(config), str(tmp_path / "run"),
                                   devices=dict(cpus=2, gpus=""), workers=4)
    superpixel_step.step_superpixels(settings, settings.seeds[0], None)
    assert pools == [(4, {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"})]
    assert [extractor.ctx for extractor in built] == DEVICES * 2
    for extractor in built:
        assert {ctx for p in extractor.net.collect_params().values()
                for ctx in p.list_ctx()} == {extractor.ctx}
