"""Arrays on their devices: devices are CPU contexts other than cpu(0) (MXNet does not check
device ids between an operator's inputs, so an array left on the default device goes unnoticed
on CPU and fails or copies on GPUs); a training step keeps every array on its device and never
synchronises with the host (the sync calls are made to raise); batches leave the loaders as
uint8 and are cast exactly on the device, pinned only when asked; --gpus/--cpus parsing."""
import contextlib
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from icd import amp, devices as devices_module, distributed as dist
from icd.commands import infer, train
from icd.config import Config, load_config
from icd.data.dataset import InferDataset, infer_loader, train_loader
from icd.data.segmentation import segmentation_loader
from icd.devices import parse_context, parse_devices
from icd.engine import make_trainer
from icd.model import build_model, model_from_config
from icd.model.pretrained import initialize
from icd.tasks import ICDTask, RunningMetrics

from helpers import DEVICES, error_line, tiny_train_flags


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
# Loaders: uint8 bytes, exact float32 on the device, pinned memory opt-in

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


# ---------------------------------------------------------------------------------------------
# Device flags

def test_devices_that_do_not_exist(tiny_voc, tmp_path, capsys):
    flags = tiny_train_flags(tiny_voc, str(tmp_path / "s"))
    assert train.main(flags + ["--gpus", "0"]) == 1   # the test machines have no GPU
    assert error_line(capsys).startswith("error: --gpus: no GPU 0: MXNet sees no GPU")
    assert train.main(flags + ["--gpus", "a"]) == 1
    assert error_line(capsys) == ("error: --gpus: not a GPU id: 'a' in 'a' "
                                  "(expected ids like 0 or 0,1)")
    assert train.main(flags + ["--cpus", "8"]) == 1
    assert error_line(capsys) == ("error: --batch-size: a batch of 4 cannot be split over 8 "
                                  "devices (each needs at least one image)")
    assert infer.main(flags + ["--cpus", "3", "--infer-batch-size", "2"]) == 1
    assert error_line(capsys).startswith("error: --infer-batch-size: a batch of 2 cannot be split")
    assert not os.path.exists(tmp_path / "s")


def test_parse_devices_and_contexts():
    assert parse_devices(cpus=2) == [parse_context("cpu(0)"), parse_context("cpu1")]
    assert parse_devices() == [parse_context("cpu")]
    with pytest.raises(ValueError, match="--ctx: no GPU 1"):
        parse_context("gpu(1)")
    with pytest.raises(ValueError, match="--gpus: GPU ids repeat"):
        parse_devices("0,0")
    with pytest.raises(ValueError, match="not both"):
        parse_devices("0", 2)
