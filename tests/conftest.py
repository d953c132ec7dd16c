"""Shared fixtures: a tiny synthetic VOC-format dataset with superpixels (made once per
session), training configs on it, trained checkpoints, class-list files, three small images."""
import os
import signal
import sys

import numpy as np
import pytest

from icd.commands import train as train_command
from icd.config import load_config
from icd.data.classes import write_classes
from icd.data.superpixels import make_superpixels
from icd.data.synthetic import make_synthetic_voc
from icd.data.voc import write_image
from icd.tasks import train

from helpers import REORDERED, REPO, SIX, THREE, icd_flags


# symbols/ (the release's graph, our test reference) is not installed: the tests read it from the
# checkout, whatever folder pytest was started from
sys.path.insert(0, REPO)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test, whatever the runner was started with (a job
    started in the background by a non-interactive shell inherits SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """8 train / 4 val images of ~48 px in VOC layout, with colour-feature superpixels; its
    6-class list (`classes`) lies outside the dataset folder, so the commands read it as VOC."""
    root = str(tmp_path_factory.mktemp("tiny_voc"))
    voc = os.path.join(root, "VOC")
    make_synthetic_voc(voc, num_train=8, num_val=4, size=48, seed=3)
    # read as VOC data (its names are VOC's): its class list is kept out of the dataset folder
    os.replace(os.path.join(voc, "classes.txt"), os.path.join(root, "classes.txt"))
    for split in ("train", "val"):
        make_superpixels(os.path.join(voc, "JPEGImages"),
                         os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt"),
                         os.path.join(root, "superpixels"))
    return {"root": root, "image_root": os.path.join(voc, "JPEGImages"),
            "annotation_root": os.path.join(voc, "Annotations"),
            "superpixel_root": os.path.join(root, "superpixels"),
            "gt_root": os.path.join(voc, "SegmentationClass"),
            "classes": os.path.join(root, "classes.txt"),
            "data_list": os.path.join(voc, "ImageSets", "Segmentation", "train.txt"),
            "val_list": os.path.join(voc, "ImageSets", "Segmentation", "val.txt")}


@pytest.fixture
def tiny_config(tiny_voc, tmp_path):
    """A training config on `tiny_voc`: width 1/16, 32 px crops, batch 4, 2 epochs, no workers."""
    def make(config_file=None, **overrides):
        options = dict(image_root=tiny_voc["image_root"],
                       annotation_root=tiny_voc["annotation_root"],
                       superpixel_root=tiny_voc["superpixel_root"],
                       data_list=tiny_voc["data_list"], pretrained="", width=0.0625,
                       image_size=32, batch_size=4, num_epoch=2, num_workers=0,
                       snapshot=str(tmp_path / "snapshot"), infer_size=64, infer_batch_size=2,
                       dropout=0.0, log_frequency=1)
        options.update(overrides)
        path = os.path.join(REPO, "experiments", config_file) if config_file else None
        return load_config(path, **options)
    return make


@pytest.fixture
def trained(tiny_config):
    """Checkpoints of epochs 0 and 1 of a tiny ICD run; inference at 64 px."""
    cfg = tiny_config(num_epoch=2)
    train(cfg)
    return cfg


@pytest.fixture(scope="session")
def class_lists(tmp_path_factory):
    """Class-list files: SIX, REORDERED and THREE."""
    folder = tmp_path_factory.mktemp("lists")
    files = {}
    for name, classes in (("six", SIX), ("reordered", REORDERED), ("three", THREE)):
        files[name] = str(folder / f"{name}.txt")
        write_classes(files[name], classes)
    return files


@pytest.fixture(scope="session")
def trained_snapshot(tiny_voc, class_lists, tmp_path_factory):
    """A snapshot holding the checkpoint of a 1-epoch ICD run on tiny_voc with SIX (resumed by the
    tests with --num-epoch 2, which may differ: it extends the run)."""
    snapshot = str(tmp_path_factory.mktemp("trained") / "snapshot")
    assert train_command.main(icd_flags(tiny_voc, snapshot, class_lists["six"])
                              + ["--num-epoch", "1"]) == 0
    return snapshot


@pytest.fixture
def small_images(tmp_path):
    rng = np.random.default_rng(2)
    names = ["a", "b", "c"]
    for name in names:
        write_image(str(tmp_path / "img" / f"{name}.jpg"),
                    (rng.random((40, 50, 3)) * 255).astype(np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{n}\n" for n in names))
    return tmp_path
