"""The training loop: LR and warm-up schedules, resume, checkpoint rotation, NaN stop, devices."""
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import pytest

from icd.data.synthetic import DEFAULT_CLASSES
from icd.devices import parse_devices
from icd.engine import TrainingDiverged, TrainingInterrupted, poly_lr
from icd.infer import OUTPUT_FOLDERS, infer
from icd.model import MODELS, CAMNet, model_options, register
from icd.runs import checkpoint_path
from icd.tasks import task_for, train

from helpers import REPO, params_of


ABLATIONS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "experiments",
                                                                        "*.yaml"))
                   if "synthetic" not in p)


def test_poly_lr_per_epoch():
    assert poly_lr(1e-3, 0, 20) == 1e-3
    assert poly_lr(1e-3, 10, 20) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert poly_lr(1e-3, 19, 20) == pytest.approx(1e-3 * 0.05 ** 0.9)


def test_optimizer_choice(tiny_config):
    cfg = tiny_config(num_epoch=1, optimizer="adam", model="vgg16_cam")
    assert np.isfinite(train(cfg)["records"][0]["cam_loss"])
    with pytest.raises(ValueError, match="--optimizer: must be one of sgd, adam, got 'rmsprop'"):
        tiny_config(optimizer="rmsprop")                        # load_config checks choices
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        train(dataclasses.replace(tiny_config(), optimizer="rmsprop"))   # and the loop


def test_resume_continues_schedules_and_state(tiny_config):
    """Epochs 0-2 in one run equal epoch 0, then a resumed run from checkpoint 0 (--begin-epoch 1):
    same LR schedule, warm-up position (W spans 2 epochs), optimizer momentum, BN and sign means."""
    straight = tiny_config(num_epoch=3)
    straight.snapshot += "_straight"
    records = train(straight)["records"]
    first = tiny_config(num_epoch=1)
    train(first)
    resumed = train(tiny_config(num_epoch=3, begin_epoch=1))["records"]
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in records]
    # W = 2 * 8 // 4 = 4 iterations, 2 per epoch: epoch 1 ends at iteration 3 -> e^(-10/4)
    assert resumed[1]["warm"] == pytest.approx(np.exp(-10 / 4)) and resumed[2]["warm"] == 1.0
    a = params_of(checkpoint_path(straight, 2))
    b = params_of(checkpoint_path(first, 2))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_checkpoints_rotate_and_are_written_atomically(tiny_config):
    cfg = tiny_config(num_epoch=3, num_save=2, model="vgg16_cam")
    train(cfg)
    files = sorted(os.listdir(cfg.snapshot))
    assert files == ["demo", "vgg16_cam-0001.json", "vgg16_cam-0001.params",
                     "vgg16_cam-0001.states", "vgg16_cam-0002.json", "vgg16_cam-0002.params",
                     "vgg16_cam-0002.states", "vgg16_cam-log.json"]
    with open(os.path.join(cfg.snapshot, "vgg16_cam-log.json")) as f:
        log = json.load(f)
    assert [r["epoch"] for r in log] == [0, 1, 2] and all(np.isfinite(r["cam_loss"]) for r in log)
    assert log[0]["icd_min"] is None                  # a CAM-only model has no ICD range
    assert sorted(os.listdir(os.path.join(cfg.snapshot, "demo"))) == [
        f"vgg16_cam-{e:04d}.jpg" for e in range(3)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config):
    cfg = tiny_config(num_epoch=1)
    train(cfg)
    good = checkpoint_path(cfg, 0)
    before = open(good, "rb").read()
    with pytest.raises(TrainingDiverged, match="last good checkpoint: .*vgg16_icd-0000.params"):
        train(tiny_config(num_epoch=3, begin_epoch=1, learning_rate=1e30, allow_changes=True))
    assert open(good, "rb").read() == before
    assert not os.path.exists(checkpoint_path(cfg, 1))
    assert not [f for f in os.listdir(cfg.snapshot) if ".tmp" in f]


def test_two_devices_train_and_infer(tiny_config, tiny_voc, tmp_path):
    cfg = tiny_config(num_epoch=1, cpus=2)
    net = train(cfg)["net"]
    weights = net.collect_params()["conv1_1_weight"].list_data()
    assert len(weights) == 2 and (weights[0] - weights[1]).abs().max().asscalar() == 0
    out = str(tmp_path / "results")
    names = infer(cfg, checkpoint_path(cfg, 0), out, parse_devices(cpus=2))
    assert len(names) == 8
    for folder in OUTPUT_FOLDERS.values():
        for name in names:
            scores = np.load(os.path.join(out, folder, name + ".npy"))
            assert scores.ndim == 3 and scores.shape[1:] == (8, 8) and np.isfinite(scores).all()
    assert glob.glob(os.path.join(out, "scores_demo", "class_*.jpg"))


@pytest.mark.parametrize("config_file", ABLATIONS)
def test_every_experiment_config_builds_and_trains_a_step(tiny_config, tiny_voc, config_file):
    """ICD configs through the ICD task, deeplab_* through the segmentation task (on the
    ground-truth masks; ResNet-101 has no width multiplier, so it runs at full width). Every
    config, COCO's included, takes the tiny data's own class list (6 classes):
    num_cls follows it and the masks' ids 1..6 are in range."""
    classes = tiny_voc["classes"]
    data = dict(num_epoch=1, classes=classes, num_cls=len(DEFAULT_CLASSES))
    if config_file.startswith("deeplab"):
        cfg = tiny_config(config_file, label_root=tiny_voc["gt_root"], **data)
        if cfg.model == "resnet101_largefov":
            cfg.width, cfg.batch_size = 1.0, 2
        loss = "seg_loss"
    else:
        cfg = tiny_config(config_file, **data)
        loss = "cam_loss"
    assert cfg.class_names == DEFAULT_CLASSES
    records = train(cfg)["records"]
    assert len(records) == 1 and np.isfinite(records[0][loss]) and records[0][loss] > 0


def test_a_model_without_a_training_task_is_refused(tiny_config):
    register("untrainable_test_net", lambda **kwargs: None)
    try:
        with pytest.raises(ValueError, match="model 'untrainable_test_net' cannot be trained: "
                                             "no training task for it .*vgg16_icd, "
                                             "vgg16_largefov"):
            train(tiny_config(model="untrainable_test_net"))
    finally:
        MODELS.pop("untrainable_test_net")


def test_a_model_registered_in_one_call_is_trained_by_name(tiny_config):
    """A new network is one registration: its task and the Config fields its constructor takes
    (here dropout under another keyword) come with it; no other file names it."""
    made = []

    def toy(num_classes, width, dropout, drop_rate):
        made.append(drop_rate)
        return CAMNet(num_classes=num_classes, width=width, dropout=drop_rate)
    register("toy_cam_test_net", toy, task="icd", options=dict(drop_rate="dropout"))
    try:
        cfg = tiny_config(model="toy_cam_test_net", num_epoch=1, dropout=0.25)
        assert model_options(cfg.model, cfg) == dict(num_classes=cfg.num_cls, width=cfg.width,
                                          dropout=0.25, drop_rate=0.25)
        records = train(cfg)["records"]
        assert made == [0.25] and len(records) == 1 and np.isfinite(records[0]["cam_loss"])
    finally:
        MODELS.pop("toy_cam_test_net")


def test_a_network_with_its_own_imagenet_weights_initialises_itself(tiny_config):
    calls = []

    class OwnWeights(CAMNet):
        def initialize_imagenet(self, contexts, pretrained):
            calls.append((contexts, pretrained))
            self.initialize(ctx=contexts)
    cfg = tiny_config(model="vgg16_cam", pretrained="imagenet.params")
    net = OwnWeights(num_classes=cfg.num_cls, width=cfg.width)
    task_for(cfg).initialize(net, [mx.cpu(0)])   # not read as vgg16_20M.params (no such file)
    assert calls == [([mx.cpu(0)], "imagenet.params")]


def test_cli_resumes_after_being_killed_mid_epoch(tiny_voc, tmp_path):
    snapshot = str(tmp_path / "cli")
    args = [sys.executable, os.path.join(REPO, "tools", "train_icd.py"),
            "--image-root", tiny_voc["image_root"], "--annotation-root",
            tiny_voc["annotation_root"], "--superpixel-root", tiny_voc["superpixel_root"],
            "--data-list", tiny_voc["data_list"], "--width", "0.0625", "--image-size", "32",
            "--batch-size", "2", "--num-epoch", "30", "--num-workers", "0",
            "--snapshot", snapshot, "--cpus", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(snapshot, "vgg16_icd-0001.params")):
            assert proc.poll() is None and time.time() < deadline, "training did not progress"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    done = sorted(int(p[-11:-7]) for p in glob.glob(os.path.join(snapshot, "*.params")))
    resume = str(done[-1] + 1)
    result = subprocess.run(args[:-6] + ["--num-epoch", str(done[-1] + 2), "--snapshot", snapshot,
                                         "--cpus", "2", "--begin-epoch", resume],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(os.path.join(snapshot, f"vgg16_icd-{done[-1] + 1:04d}.params"))
    assert not [f for f in os.listdir(snapshot) if ".tmp" in f]


def log_of(cfg):
    with open(os.path.join(cfg.snapshot, f"{cfg.model}-log.json")) as f:
        return json.load(f)


def test_new_run_refuses_a_folder_with_checkpoints_unless_overwrite(tiny_config):
    """Issue #11.1: a second fresh run with fewer epochs used to exit 0 after rotation deleted
    its own checkpoints (it kept the first run's higher epoch numbers)."""
    first = tiny_config(num_epoch=4, num_save=5, model="vgg16_cam")
    train(first)
    second = tiny_config(num_epoch=2, learning_rate=1e-4, model="vgg16_cam")
    with pytest.raises(FileExistsError, match=r"holds checkpoints of vgg16_cam \(vgg16_cam-0000"
                                              r".json.*vgg16_cam-0003.states\).*--overwrite"):
        train(second)
    assert len(glob.glob(os.path.join(first.snapshot, "*.params"))) == 4   # nothing touched
    second.overwrite = True
    train(second)
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(second.snapshot, "*.params"))
                  ) == ["vgg16_cam-0000.params", "vgg16_cam-0001.params"]
    log = log_of(second)
    assert [r["epoch"] for r in log] == [0, 1] and log[0]["lr"] == 1e-4
    run = json.load(open(checkpoint_path(second, 1, "json")))
    assert run["run"] == log[0]["run"] == log[1]["run"] and run["config"]["learning_rate"] == 1e-4
    names = infer(second, checkpoint_path(second, 1), second.snapshot + "/results", [mx.cpu()])
    assert len(names) == 8


def test_rotation_removes_only_the_runs_own_checkpoints(tiny_config):
    cfg = tiny_config(num_epoch=3, num_save=1, model="vgg16_cam")
    train(tiny_config(num_epoch=1, model="vgg16_cam"))
    os.remove(checkpoint_path(cfg, 0, "json"))           # like the release's checkpoint: no record
    train(tiny_config(num_epoch=3, num_save=1, model="vgg16_cam", begin_epoch=1))
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(cfg.snapshot, "*.params"))
                  ) == ["vgg16_cam-0000.params", "vgg16_cam-0002.params"]
    assert [r["epoch"] for r in log_of(cfg)] == [1, 2]   # the log describes this run's files


def test_resume_refuses_to_overwrite_later_checkpoints(tiny_config):
    train(tiny_config(num_epoch=3, model="vgg16_cam"))
    with pytest.raises(FileExistsError, match="after epoch 0 .*vgg16_cam-0001.params.*resuming "
                                              "at epoch 1 would overwrite them"):
        train(tiny_config(num_epoch=3, model="vgg16_cam", begin_epoch=1))
    cfg = tiny_config(num_epoch=2, model="vgg16_cam", begin_epoch=1, overwrite=True)
    train(cfg)
    assert not os.path.exists(checkpoint_path(cfg, 2))
    assert [r["epoch"] for r in log_of(cfg)] == [0, 1]


@pytest.mark.parametrize("cpus", [1, 2])
def test_resume_with_dropout_is_bit_identical(tiny_config, cpus):
    """Issue #11.5: a 4-epoch run with dropout 0.5 equals its checkpoint of epoch 1 resumed to
    epoch 4, bit for bit: every generator restarts each epoch from (seed, epoch), and with two
    devices the run record holds the shared sign-flip store."""
    straight = tiny_config(num_epoch=4, dropout=0.5, cpus=cpus)
    straight.snapshot += "_straight"
    train(straight)
    resumed = tiny_config(num_epoch=4, dropout=0.5, cpus=cpus, begin_epoch=2)
    os.makedirs(resumed.snapshot)
    for suffix in ("params", "states", "json"):   # a run stopped after epoch 1
        shutil.copy(checkpoint_path(straight, 1, suffix), resumed.snapshot)
    train(resumed)
    a, b = params_of(checkpoint_path(straight, 3)), params_of(checkpoint_path(resumed, 3))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    records = [json.load(open(checkpoint_path(c, 3, "json"))) for c in (straight, resumed)]
    assert records[0]["sign_flip_store"] == records[1]["sign_flip_store"]
    assert (records[0]["sign_flip_store"] is None) == (cpus == 1)


def test_ctrl_c_stops_after_the_checkpoint_being_written(tiny_config, monkeypatch, python_sigint):
    """SIGINT while a checkpoint is written: its files are all completed, then training stops
    with one message naming it and the --begin-epoch that resumes it."""
    import icd.engine.hooks
    import icd.engine.loop
    import icd.tasks.segmentation

    cfg = tiny_config(num_epoch=4, model="vgg16_cam")
    save = icd.engine.hooks.staged_params

    def save_then_ctrl_c(values, path):
        if path.endswith("0001.params"):
            os.kill(os.getpid(), signal.SIGINT)
        return save(values, path)
    monkeypatch.setattr(icd.engine.hooks, "staged_params", save_then_ctrl_c)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg)
    assert str(stopped.value) == (f"interrupted in epoch 1; last checkpoint "
                                  f"{checkpoint_path(cfg, 1)}; resume with --begin-epoch 2 and "
                                  f"otherwise the same flags")
    for suffix in ("params", "states", "json"):
        assert os.path.isfile(checkpoint_path(cfg, 1, suffix))
    assert [r["epoch"] for r in log_of(cfg)] == [0, 1]
    assert not os.path.exists(checkpoint_path(cfg, 2))


def test_stale_temporaries_are_removed_when_training_starts(tiny_config):
    cfg = tiny_config(num_epoch=1, model="vgg16_cam")
    os.makedirs(cfg.snapshot)
    stale = os.path.join(cfg.snapshot, ".vgg16_cam-0003.k2j4h5g6.tmp.params")  # SIGKILL left it
    open(stale, "w").close()
    train(cfg)
    assert not os.path.exists(stale)
