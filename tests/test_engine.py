"""The training loop written once (icd.engine): hooks passed in, the NaN stop as a hook of its
own, and one training step shared by the loop, icd-bench and icd-parity."""
import math
import os

import mxnet as mx
import numpy as np
import pytest

from icd import bench, parity
from icd.engine import (EpochRecordHook, Hook, LogHook, NanStopHook, TrainingDiverged,
                        default_hooks, loop, make_trainer)
from icd.model import build_model
from icd.model.pretrained import initialize
from icd.runs import checkpoint_path
from icd.tasks import ICDTask, train


class Recorder(Hook):
    """Every call the loop makes to a hook, with where the loop was."""

    def __init__(self):
        self.calls = []

    def before_train(self, state):
        self.calls.append(("before_train", state.epoch))

    def before_epoch(self, state):
        self.calls.append(("before_epoch", state.epoch))

    def after_step(self, state, index, metrics):
        self.calls.append(("after_step", state.epoch, index, state.iteration,
                           sorted(metrics.read())))

    def after_epoch(self, state):
        self.calls.append(("after_epoch", state.epoch, len(state.records)))


def test_a_hook_passed_to_train_is_called_at_every_event(tiny_config):
    """8 images in batches of 4: one epoch is two steps; the user's hook comes after the
    default ones, so the epoch's record is there when it ends."""
    cfg = tiny_config(num_epoch=1)
    recorder = Recorder()
    train(cfg, hooks=default_hooks() + [recorder])
    figures = sorted(["cam_loss", "td_loss", "recall", "icd_min", "icd_max", "images_per_s"])
    assert recorder.calls == [("before_train", 0), ("before_epoch", 0),
                              ("after_step", 0, 0, 0, figures),
                              ("after_step", 0, 1, 1, figures),
                              ("after_epoch", 0, 1)]
    assert os.path.isfile(checkpoint_path(cfg, 0))   # the default hooks ran too


def test_hooks_given_replace_the_default_ones(tiny_config):
    cfg = tiny_config(num_epoch=1)
    recorder = Recorder()
    result = train(cfg, hooks=[recorder])
    assert [c[0] for c in recorder.calls].count("after_step") == 2
    assert result["records"] == [] and not os.path.exists(checkpoint_path(cfg, 0))


@pytest.fixture
def nan_losses(monkeypatch):
    """ICD's logged losses NaN from the first step (the gradients stay finite)."""
    forward = ICDTask.forward

    def nan_forward(net, inputs):
        out = forward(net, inputs)
        out["losses"] = {name: value * np.nan for name, value in out["losses"].items()}
        return out
    monkeypatch.setattr(ICDTask, "forward", staticmethod(nan_forward))


def test_the_nan_stop_is_a_hook_of_its_own(tiny_config, nan_losses):
    with pytest.raises(TrainingDiverged, match=r"epoch 0 by iteration 0 \(cam_loss nan"):
        train(tiny_config(num_epoch=1))
    with pytest.raises(TrainingDiverged, match=r"epoch 0 by iteration 0 \(cam_loss nan"):
        train(tiny_config(num_epoch=1, snapshot=tiny_config().snapshot + "_alone"),
              hooks=[NanStopHook()])


def test_logging_without_the_nan_stop_does_not_stop_on_a_nan_loss(tiny_config, nan_losses):
    """The log lines and the epoch's record read the NaN and go on (the checkpoint's JSON log
    could not hold it: strict JSON)."""
    records = train(tiny_config(num_epoch=2), hooks=[LogHook(), EpochRecordHook()])["records"]
    assert [r["epoch"] for r in records] == [0, 1] and math.isnan(records[1]["cam_loss"])


@pytest.fixture
def steps(monkeypatch):
    """The calls of the engine's one training step: (number of devices, order, batch size)."""
    calls = []
    step = loop.train_step

    def counted(net, trainer, forward, inputs, batch_size, order=None):
        calls.append((len(inputs), order, batch_size))
        return step(net, trainer, forward, inputs, batch_size, order)
    monkeypatch.setattr(loop, "train_step", counted)
    return calls


def test_the_loop_and_the_bench_time_the_same_step(tiny_config, steps):
    train(tiny_config(num_epoch=1, cpus=2))
    assert steps == [(2, None, 4)] * 2
    del steps[:]
    for model in ("vgg16_icd", "vgg16_largefov"):
        bench.training_step(model, mx.cpu(), 32, 2, 0.0625, 4)()
    bench.build_step("cam", mx.cpu(), 32, 48, 2, 0.0625, 4)()
    assert steps == [(1, None, 2)] * 3


def test_the_parity_replay_takes_the_same_step_in_the_bundles_device_order(steps):
    net = build_model("vgg16_icd", num_classes=4, width=0.0625, dropout=0.0)
    initialize(net, [mx.cpu()])
    net.hybridize(static_alloc=True)
    rng = np.random.RandomState(0)
    part = {"data": mx.nd.array(rng.uniform(0, 255, (2, 3, 32, 32))),
            "superpixel": mx.nd.array(np.kron(rng.randint(0, 16, (2, 4, 4)), np.ones((8, 8)))),
            "label": mx.nd.array(np.eye(4)[[0, 2]])}
    result = parity.replay_step(net, make_trainer(net, 1e-3, 0.9, 5e-4), [part], 1.0,
                                [mx.cpu()], [0])
    assert steps == [(1, [0], 2)]
    assert result["cam_prob"].shape == (2, 4) and "arg:conv1_1_weight" in result
