"""Issue 21, items 5-7: the class list and the settings travel with checkpoints and results.

5. The class list (names, order) is in every run record and result provenance, and a stage
   whose list differs from what made its inputs is refused naming both lists; data with a
   classes.txt needs --classes.
6. A resume with other settings is refused naming each, unless --allow-changes, which starts a
   new run chained to the old one (previous_run).
7. icd-infer-seg keeps a provenance record, so --skip-existing with other settings is refused.
"""
import json
import os
import shutil

import mxnet as mx
import numpy as np
import pytest

from conftest import REPO
from icd.checkpoint import save_checkpoint
from icd.commands import evaluate as evaluate_command
from icd.commands import infer as infer_command
from icd.commands import infer_seg as infer_seg_command
from icd.commands import seeds as seeds_command
from icd.commands import train as train_command
from icd.commands import train_seg as train_seg_command
from icd.data.classes import VOC_CLASSES, write_classes
from icd.data.synthetic import DEFAULT_CLASSES, make_synthetic_voc
from icd.data.voc import read_image_labels, read_list
from icd.io import read_json
from icd.model import build_model
from icd.provenance import read_record
from icd.data.dataset import DataPaths
from icd.seeds import SeedSettings, make_seeds

SIX = DEFAULT_CLASSES                            # tiny_voc's names: aeroplane, bird, car, ...
REORDERED = (SIX[1], SIX[0]) + SIX[2:]           # the same six, two swapped
THREE = ("kettle", "traffic light", "zebra")
SEG_CONFIG = os.path.join(REPO, "experiments", "synthetic_deeplab.yaml")


def shown(classes):
    """How a message shows a class list (icd.data.classes.show_classes)."""
    more = ", ..." if len(classes) > 8 else ""
    return f"{len(classes)} classes [{', '.join(classes[:8])}{more}]"


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """Class-list files: SIX, REORDERED and THREE."""
    folder = tmp_path_factory.mktemp("lists")
    files = {}
    for name, classes in (("six", SIX), ("reordered", REORDERED), ("three", THREE)):
        files[name] = str(folder / f"{name}.txt")
        write_classes(files[name], classes)
    return files


def data_flags(voc):
    return ["--image-root", voc["image_root"], "--annotation-root", voc["annotation_root"],
            "--superpixel-root", voc["superpixel_root"], "--data-list", voc["data_list"]]


def icd_flags(voc, snapshot, classes):
    """A 1/16-width, 32 px, batch-4 ICD training of tiny_voc with the class list `classes`."""
    return data_flags(voc) + ["--classes", classes, "--pretrained", "", "--width", "0.0625",
                              "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
                              "--snapshot", snapshot, "--infer-size", "64",
                              "--infer-batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tiny_voc, lists, tmp_path_factory):
    """A snapshot holding the checkpoint of a 1-epoch ICD run on tiny_voc with SIX (resumed by the
    tests with --num-epoch 2, which may differ: it extends the run)."""
    snapshot = str(tmp_path_factory.mktemp("trained") / "snapshot")
    assert train_command.main(icd_flags(tiny_voc, snapshot, lists["six"])
                              + ["--num-epoch", "1"]) == 0
    return snapshot


def copy_of(trained, tmp_path):
    snapshot = str(tmp_path / "snapshot")
    shutil.copytree(trained, snapshot)
    return snapshot


def epochs(snapshot):
    return sorted(f for f in os.listdir(snapshot) if f.endswith(".params"))


@pytest.fixture(scope="module")
def scores(tiny_voc, tmp_path_factory):
    """A results folder of hand-made score maps (no provenance record, like the release's) for
    the tiny_voc train list: random (|L|, 8, 8) CAM and ICD scores of each image's classes."""
    results = str(tmp_path_factory.mktemp("scores") / "results")
    rng = np.random.default_rng(0)
    for name in read_list(tiny_voc["data_list"]):
        labels = read_image_labels(os.path.join(tiny_voc["annotation_root"], name + ".xml"), SIX)
        for folder in ("scores_cam", "scores_icd"):
            os.makedirs(os.path.join(results, folder), exist_ok=True)
            np.save(os.path.join(results, folder, name + ".npy"),
                    rng.normal(size=(len(labels), 8, 8)).astype(np.float32))
    return results


def seeds_of(tiny_voc, results, out, classes, capsys):
    """Seeds (no CRF) of the hand-made scores into `out`, made with the class list `classes`."""
    make_seeds(results, DataPaths(tiny_voc["image_root"], tiny_voc["annotation_root"],
                                  tiny_voc["data_list"], classes),
               SeedSettings(infer_size=64, crf=False), out_dir=out)
    capsys.readouterr()   # its progress bar
    return out


@pytest.fixture(scope="module")
def six_voc(tmp_path_factory):
    """A 6-class synthetic dataset as icd-synthetic writes it: with its classes.txt."""
    root = str(tmp_path_factory.mktemp("six_voc"))
    make_synthetic_voc(root, num_train=4, num_val=0, size=40, seed=5)
    return {"root": root, "image_root": os.path.join(root, "JPEGImages"),
            "annotation_root": os.path.join(root, "Annotations"),
            "superpixel_root": os.path.join(root, "superpixels"),
            "gt_root": os.path.join(root, "SegmentationClass"),
            "data_list": os.path.join(root, "ImageSets", "Segmentation", "train.txt"),
            "classes": os.path.join(root, "classes.txt")}


# ---------------------------------------------------------------------------------------------
# 5. The class list

def test_resume_with_the_classes_in_another_order_is_refused(trained, tiny_voc, lists,
                                                             tmp_path, capsys):
    snapshot = copy_of(trained, tmp_path)
    record = read_json(os.path.join(snapshot, "vgg16_icd-0000.json"))
    assert record["classes"] == list(SIX)
    flags = icd_flags(tiny_voc, snapshot, lists["reordered"])
    assert train_command.main(flags + ["--num-epoch", "2", "--begin-epoch", "1"]) == 1
    assert error_line(capsys) == (
        f"error: {os.path.join(snapshot, 'vgg16_icd-0000.json')}: the run was trained on "
        f"{shown(SIX)}, but --classes gives {shown(REORDERED)} (label 1 is 'aeroplane' / "
        f"'bird'); resume with the run's --classes")
    assert epochs(snapshot) == ["vgg16_icd-0000.params"]


def test_inference_checks_the_checkpoints_classes_and_records_them(trained, tiny_voc, lists,
                                                                   tmp_path, capsys):
    out = str(tmp_path / "results")
    flags = icd_flags(tiny_voc, trained, lists["reordered"]) + ["--epoch", "0", "--out", out]
    assert infer_command.main(flags) == 1
    assert error_line(capsys).startswith(
        f"error: {os.path.join(trained, 'vgg16_icd-0000.json')}: the checkpoint was trained on "
        f"{shown(SIX)}, but --classes gives {shown(REORDERED)} (label 1 is 'aeroplane' / 'bird')")
    assert not os.path.exists(out)
    flags = icd_flags(tiny_voc, trained, lists["six"]) + ["--epoch", "0", "--out", out]
    assert infer_command.main(flags) == 0
    record = read_record(os.path.join(out, "scores_icd"))
    assert record["state"] == "complete" and record["settings"]["classes"] == list(SIX)
    # seeds of these scores with another list (here: none, VOC's 20) are refused
    with pytest.raises(ValueError, match=f"{os.path.join(out, 'scores_cam')}: its infer run used "
                                         rf"6 classes \[aeroplane, .*, but the default list \(no "
                                         rf"--classes: PASCAL VOC's\) gives 20 classes"):
        make_seeds(out, DataPaths(tiny_voc["image_root"], tiny_voc["annotation_root"],
                                  tiny_voc["data_list"]), SeedSettings(crf=False))
    assert not os.path.exists(os.path.join(out, "seeds"))


def test_eval_with_three_names_on_six_class_data_is_refused(six_voc, lists, tmp_path, capsys):
    results = str(tmp_path / "results")
    shutil.copytree(six_voc["gt_root"], os.path.join(results, "seeds", "crf"))
    flags = ["--results", results, "--gt-root", six_voc["gt_root"], "--data-list",
             six_voc["data_list"], "--workers", "1"]
    assert evaluate_command.main(flags + ["--classes", lists["three"]]) == 1
    assert error_line(capsys) == (
        f"error: {six_voc['classes']}: the data's class list has {shown(SIX)}, but --classes "
        f"{lists['three']} gives {shown(THREE)} (label 1 is 'aeroplane' / 'kettle'); pass "
        f"--classes {six_voc['classes']}")
    assert evaluate_command.main(flags) == 1   # VOC's 20 are not this data's classes either
    assert error_line(capsys) == (
        f"error: --classes: not given, but the data has a class list, {six_voc['classes']} "
        f"({shown(SIX)}); pass --classes {six_voc['classes']} (without --classes the classes "
        f"are PASCAL VOC's 20)")
    assert not os.path.exists(os.path.join(results, "eval"))
    assert evaluate_command.main(flags + ["--classes", six_voc["classes"]]) == 0
    report = read_json(os.path.join(results, "eval", "eval.json"))
    assert report["classes"] == list(SIX)
    assert list(report["seeds"]["seeds/crf"]["iou"]) == ["background", *SIX]


def test_seeds_and_training_need_the_classes_of_data_with_a_class_list(six_voc, tmp_path,
                                                                       capsys):
    missing = (f"error: --classes: not given, but the data has a class list, "
               f"{six_voc['classes']} ({shown(SIX)})")
    assert seeds_command.main(["--results", str(tmp_path / "r"), "--image-root",
                               six_voc["image_root"], "--annotation-root",
                               six_voc["annotation_root"], "--data-list",
                               six_voc["data_list"]]) == 1
    assert error_line(capsys).startswith(missing)
    snapshot = str(tmp_path / "snapshot")
    assert train_command.main(data_flags(six_voc) + ["--snapshot", snapshot, "--width", "0.0625",
                                                     "--image-size", "32", "--batch-size", "4",
                                                     "--num-workers", "0"]) == 1
    assert error_line(capsys).startswith(missing)
    assert train_seg_command.main(["--config", SEG_CONFIG, "--image-root", six_voc["image_root"],
                                   "--data-list", six_voc["data_list"], "--seeds",
                                   six_voc["gt_root"], "--snapshot", snapshot,
                                   "--num-workers", "0"]) == 1
    assert error_line(capsys).startswith(missing)
    assert not os.path.exists(snapshot) and not os.path.exists(tmp_path / "r")


def test_seeds_made_without_classes_then_evaluated_with_them_are_refused(
        tiny_voc, scores, lists, tmp_path, capsys):
    seeds = seeds_of(tiny_voc, scores, str(tmp_path / "seeds_voc"), VOC_CLASSES, capsys)
    assert read_record(seeds)["settings"]["classes"] == list(VOC_CLASSES)
    flags = ["--results", scores, "--gt-root", tiny_voc["gt_root"], "--data-list",
             tiny_voc["data_list"], "--seeds", seeds, "--workers", "1",
             "--out", str(tmp_path / "eval")]
    assert evaluate_command.main(flags + ["--classes", lists["six"]]) == 1
    assert error_line(capsys) == (
        f"error: {seeds}: its seeds run used {shown(VOC_CLASSES)}, but --classes gives "
        f"{shown(SIX)} (label 2 is 'bicycle' / 'bird'); pass the --classes file of the data it "
        f"was made from")
    assert not os.path.exists(tmp_path / "eval")
    assert evaluate_command.main(flags) == 0


def test_train_seg_on_six_class_seeds_without_classes_is_refused(tiny_voc, scores, lists,
                                                                 tmp_path, capsys):
    seeds = seeds_of(tiny_voc, scores, str(tmp_path / "seeds_six"), SIX, capsys)
    snapshot = str(tmp_path / "snapshot")
    argv = ["--config", SEG_CONFIG, "--image-root", tiny_voc["image_root"], "--data-list",
            tiny_voc["data_list"], "--seeds", seeds, "--width", "0.0625", "--image-size", "32",
            "--batch-size", "4", "--num-epoch", "1", "--num-workers", "0",
            "--snapshot", snapshot]
    assert train_seg_command.main(argv) == 1
    assert error_line(capsys) == (
        f"error: {seeds}: its seeds run used {shown(SIX)}, but the default list (no --classes: "
        f"PASCAL VOC's) gives {shown(VOC_CLASSES)} (label 2 is 'bird' / 'bicycle'); pass the "
        f"--classes file of the data it was made from")
    assert not os.path.exists(snapshot)
    assert train_seg_command.main(argv + ["--classes", lists["reordered"]]) == 1
    assert "(label 1 is 'aeroplane' / 'bird')" in error_line(capsys)
    assert train_seg_command.main(argv + ["--classes", lists["six"]]) == 0
    assert read_json(os.path.join(snapshot, "vgg16_largefov-0000.json"))["classes"] == list(SIX)


# ---------------------------------------------------------------------------------------------
# 6. Resume with other settings

@pytest.mark.parametrize("flags, changed", [
    (["--learning-rate", "0.003"], "--learning-rate 0.001 in the run, 0.003 now"),
    (["--image-size", "40"], "--image-size 32 in the run, 40 now"),
    (["--batch-size", "2"], "global batch (--batch-size x workers) 4 in the run, 2 now"),
    (["--cpus", "2"], "devices (--gpus / --cpus, x workers) '1 CPU' in the run, '2 CPUs' now"),
    (["--seed", "1", "--dropout", "0"],
     "--dropout 0.5 in the run, 0.0 now; --seed 0 in the run, 1 now"),
])
def test_resume_with_other_settings_is_refused_naming_each(trained, tiny_voc, lists, tmp_path,
                                                           capsys, flags, changed):
    snapshot = copy_of(trained, tmp_path)
    resume = icd_flags(tiny_voc, snapshot, lists["six"]) + ["--num-epoch", "2",
                                                            "--begin-epoch", "1"]
    assert train_command.main(resume + flags) == 1
    record = read_json(os.path.join(snapshot, "vgg16_icd-0000.json"))
    assert error_line(capsys) == (
        f"error: {os.path.join(snapshot, 'vgg16_icd-0000.json')}: run {record['run']} was "
        f"trained with other settings ({changed}); resume with the run's settings for a "
        f"continuation bit for bit, or pass --allow-changes to start a new run from this "
        f"checkpoint (its records name this one as previous_run)")
    assert epochs(snapshot) == ["vgg16_icd-0000.params"]


def test_allow_changes_starts_a_new_run_chained_to_the_old_one(trained, tiny_voc, lists,
                                                                tmp_path):
    snapshot = copy_of(trained, tmp_path)
    flags = icd_flags(tiny_voc, snapshot, lists["six"])
    old = read_json(os.path.join(snapshot, "vgg16_icd-0000.json"))
    # settings that do not change the run: the same run continues
    same = str(tmp_path / "same")
    shutil.copytree(snapshot, same)
    assert train_command.main(icd_flags(tiny_voc, same, lists["six"]) + [
        "--num-epoch", "2", "--begin-epoch", "1", "--num-save", "3", "--log-frequency", "2",
        "--infer-size", "48"]) == 0
    assert read_json(os.path.join(same, "vgg16_icd-0001.json"))["run"] == old["run"]
    # other settings with --allow-changes: a new run whose records name the old one
    assert train_command.main(flags + ["--num-epoch", "2", "--begin-epoch", "1",
                                       "--learning-rate", "0.003", "--allow-changes"]) == 0
    new = read_json(os.path.join(snapshot, "vgg16_icd-0001.json"))
    assert new["run"] != old["run"] and new["previous_run"] == old["run"]
    assert new["config"]["learning_rate"] == 0.003 and old["previous_run"] is None
    log = read_json(os.path.join(snapshot, "vgg16_icd-log.json"))
    assert [(r["epoch"], r["run"]) for r in log] == [(0, old["run"]), (1, new["run"])]
    assert log[1]["lr"] == pytest.approx(0.003 * 0.5 ** 0.9)
    # the new run continues as itself (still chained) with its own settings
    assert train_command.main(flags + ["--num-epoch", "3", "--begin-epoch", "2",
                                       "--learning-rate", "0.003"]) == 0
    last = read_json(os.path.join(snapshot, "vgg16_icd-0002.json"))
    assert last["run"] == new["run"] and last["previous_run"] == old["run"]


# ---------------------------------------------------------------------------------------------
# 7. icd-infer-seg's provenance record

def deeplab_checkpoint(path, classes=None):
    """A random 1/16-width vgg16_largefov checkpoint (20 classes) at `path`; with `classes`, a
    run record beside it naming them, as icd-train-seg writes."""
    net = build_model("vgg16_largefov", num_classes=20, width=1 / 16)
    net.initialize(mx.init.Xavier(magnitude=2))
    save_checkpoint(net, path)
    if classes is not None:
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump({"run": "r", "epoch": 0, "classes": list(classes)}, f)
    return path


def test_infer_seg_keeps_a_record_and_refuses_other_settings(tiny_voc, tmp_path, capsys):
    params = deeplab_checkpoint(str(tmp_path / "a.params"))
    out = tmp_path / "seg"
    argv = ["--config", SEG_CONFIG, "--width", "0.0625", "--image-root", tiny_voc["image_root"],
            "--data-list", tiny_voc["val_list"], "--infer-size", "64", "--cpus", "1",
            "--params", params, "--out", str(out), "--no-crf", "--scales", "1"]
    assert infer_seg_command.main(argv) == 0
    record = read_record(str(out / "pred"))
    assert record == read_record(str(out / "overlay")) and record["state"] == "complete"
    settings = record["settings"]
    assert settings["checkpoint"]["path"] == params and settings["flip"] is False
    assert settings["scales"] == [1.0] and settings["crf"] is False
    assert settings["infer_size"] == 64 and settings["classes"] == list(VOC_CLASSES)
    before = {p: os.path.getmtime(out / "pred" / p) for p in os.listdir(out / "pred")}

    assert infer_seg_command.main(argv + ["--skip-existing", "--flip"]) == 1
    assert error_line(capsys).startswith(
        f"error: {out / 'pred'}: holds results of another infer-seg run (changed: flip False -> "
        f"True)")
    other = deeplab_checkpoint(str(tmp_path / "b.params"))
    assert infer_seg_command.main(argv + ["--skip-existing", "--params", other]) == 1
    assert "(changed: checkpoint {" in error_line(capsys)
    assert {p: os.path.getmtime(out / "pred" / p) for p in os.listdir(out / "pred")} == before
    # the same settings continue; --overwrite replaces the folders' results
    assert infer_seg_command.main(argv + ["--skip-existing"]) == 0
    assert infer_seg_command.main(argv + ["--skip-existing", "--flip", "--overwrite"]) == 0
    assert read_record(str(out / "pred"))["settings"]["flip"] is True

    # a checkpoint trained on another class list
    wrong = deeplab_checkpoint(str(tmp_path / "c.params"), REORDERED)
    assert infer_seg_command.main(argv + ["--params", wrong, "--out", str(tmp_path / "x")]) == 1
    assert error_line(capsys).startswith(
        f"error: {tmp_path / 'c.json'}: the checkpoint was trained on {shown(REORDERED)}, but "
        f"the default list (no --classes: PASCAL VOC's) gives {shown(VOC_CLASSES)} (label 1 is "
        f"'bird' / 'aeroplane')")
    assert not os.path.exists(tmp_path / "x")
