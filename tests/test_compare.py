"""icd-compare makes the checks icd-eval makes: the data's class list, complete provenance made
with that list, each folder once, no label outside the list; its --out never replaces an input;
the claim follows the order of A and B."""
import contextlib
import json
import os
import shutil

import numpy as np
import pytest

from icd.commands import compare as compare_command
from icd.data.classes import write_classes
from icd.data.synthetic import make_synthetic_voc
from icd.data.voc import read_list, read_mask, write_mask
from icd.evaluate import evaluate_seeds
from icd.io import write_json
from icd.provenance import producing, record_path

from helpers import REORDERED, SIX, error_line


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 6-class synthetic dataset with its classes.txt, and two folders of label maps without a
    record: `good` (10% of the pixels random) and `poor` (60%)."""
    root = tmp_path_factory.mktemp("compare")
    make_synthetic_voc(str(root / "data"), num_train=8, num_val=0, size=32, seed=5)
    paths = {"gt_root": str(root / "data" / "SegmentationClass"),
             "data_list": str(root / "data" / "ImageSets" / "Segmentation" / "train.txt"),
             "classes": str(root / "data" / "classes.txt"), "swapped": str(root / "swapped.txt")}
    write_classes(paths["swapped"], REORDERED)
    rng = np.random.default_rng(0)
    for side, noise in (("good", 0.1), ("poor", 0.6)):
        paths[side] = str(root / side)
        os.makedirs(paths[side])
        for name in read_list(paths["data_list"]):
            gt = read_mask(os.path.join(paths["gt_root"], name + ".png"))
            noisy = np.where(rng.random(gt.shape) < noise, rng.integers(0, 7, gt.shape), gt)
            write_mask(os.path.join(paths[side], name + ".png"), noisy.astype(np.uint8))
    return paths


def flags(data, *extra):
    return ["--gt-root", data["gt_root"], "--data-list", data["data_list"], "--workers", "1",
            "--resamples", "50", *extra]


def test_the_data_class_list_is_needed_and_checked(data, tmp_path, capsys):
    assert compare_command.main([data["good"], data["poor"]] + flags(data)) == 1
    assert error_line(capsys, alone=False).startswith(
        f"error: --classes: not given, but the data has a class list, {data['classes']} (6 "
        f"classes [aeroplane, bird, car, cat, dog, person]); pass --classes {data['classes']}")
    # two class names swapped: every label of one class would be scored as the other's
    assert compare_command.main([data["good"], data["poor"]] +
                                flags(data, "--classes", data["swapped"])) == 1
    assert "(label 1 is 'aeroplane' / 'bird'); pass --classes" in error_line(capsys, alone=False)
    out = str(tmp_path / "c.json")
    assert compare_command.main([data["good"], data["poor"]] +
                                flags(data, "--classes", data["classes"], "--out", out)) == 0
    result = json.load(open(out))
    names = read_list(data["data_list"])
    assert result["classes"] == list(SIX)
    for key, side in (("value", "good"), ("reference", "poor")):   # over the 7 labels
        assert result[key] == pytest.approx(evaluate_seeds(data[side], data["gt_root"], names,
                                                           classes=SIX)["miou"])
    assert result["verdict"] == "PASS"
    assert "mIoU over all 7 labels" in capsys.readouterr().out


def test_the_claim_follows_the_order_of_a_and_b(data, tmp_path):
    results = {}
    for order in ("good-poor", "poor-good"):
        out = str(tmp_path / f"{order}.json")
        a, b = order.split("-")
        assert compare_command.main([data[a], data[b]] + flags(
            data, "--classes", data["classes"], "--out", out)) == 0
        results[order] = json.load(open(out))
    forward, backward = results["good-poor"], results["poor-good"]
    assert forward["value"] > forward["reference"] and forward["verdict"] == "PASS"
    assert (backward["value"], backward["reference"]) == (forward["reference"], forward["value"])
    assert backward["verdict"] == "FAIL"
    assert (backward["low"], backward["high"]) == pytest.approx((-forward["high"],
                                                                 -forward["low"]))


@pytest.mark.parametrize("state", ["running", "failed", "reordered"])
def test_seeds_of_an_unfinished_run_or_another_class_order_are_refused(data, tmp_path, capsys,
                                                                       state):
    seeds = str(tmp_path / "seeds")
    settings = {"classes": list(REORDERED if state == "reordered" else SIX)}
    with contextlib.suppress(RuntimeError):
        with producing([seeds], "seeds", settings):
            for name in os.listdir(data["good"]):
                shutil.copy(os.path.join(data["good"], name), seeds)
            if state == "failed":
                raise RuntimeError("killed")
    if state == "running":   # a killed run's record
        record = json.load(open(record_path(seeds)))
        write_json(record_path(seeds), dict(record, state="running"))
    assert compare_command.main([seeds, data["poor"]] +
                                flags(data, "--classes", data["classes"])) == 1
    line = error_line(capsys, alone=False)
    if state == "reordered":
        assert line.startswith(f"error: {seeds}: its seeds run used 6 classes [bird, aeroplane, "
                               f"car, cat, dog, person], but --classes gives 6 classes "
                               f"[aeroplane, bird, car, cat, dog, person] (label 1 is 'bird' / "
                               f"'aeroplane')")
    else:
        assert line.startswith(f"error: {seeds}: the seeds run that writes it is {state}")
        assert "run make_seeds.py into it again" in line


@pytest.mark.parametrize("sides", [["{good},{good}", "{poor}"], ["{good}", "{good}"],
                                   ["{good},{other}", "{poor}"]])
def test_one_folder_given_twice_is_refused(data, tmp_path, capsys, sides):
    other = os.path.join(data["good"], "..", os.path.basename(data["good"]))   # another spelling
    argv = [s.format(good=data["good"], poor=data["poor"], other=other) for s in sides]
    assert compare_command.main(argv + flags(data, "--classes", data["classes"])) == 1
    assert "given twice" in error_line(capsys, alone=False)


def test_labels_outside_the_class_list_are_refused_unless_ignored(data, tmp_path, capsys):
    names = read_list(data["data_list"])
    gt = str(tmp_path / "gt")
    shutil.copytree(data["gt_root"], gt)
    shutil.copy(data["classes"], str(tmp_path / "classes.txt"))   # beside the copy: same data
    mask = read_mask(os.path.join(gt, names[2] + ".png"))
    mask[:2, :3], mask[5, 5] = 7, 40
    write_mask(os.path.join(gt, names[2] + ".png"), mask)
    poor = str(tmp_path / "poor")
    shutil.copytree(data["poor"], poor)
    mask = read_mask(os.path.join(poor, names[4] + ".png"))
    mask[:2, :2] = 50
    write_mask(os.path.join(poor, names[4] + ".png"), mask)
    argv = [data["good"], poor, "--gt-root", gt, "--data-list", data["data_list"],
            "--classes", data["classes"], "--workers", "1", "--resamples", "50"]
    assert compare_command.main(argv) == 1
    assert error_line(capsys, alone=False) == (
        f"error: {os.path.join(gt, names[2] + '.png')}: holds labels outside the class list of "
        f"6 classes (labels 0..6, 255 = ignore): 7 (6 pixels), 40 (1 pixels); fix the file or "
        f"give the class list it was made with (icd-eval and icd-compare leave such pixels out "
        f"with --ignore-unknown-labels)")
    out = str(tmp_path / "c.json")
    assert compare_command.main(argv + ["--ignore-unknown-labels", "--out", out]) == 0
    result = json.load(open(out))
    assert result["unknown_labels"] == {
        "ground truth": {"7": {"images": 1, "pixels": 6}, "40": {"images": 1, "pixels": 1}},
        data["good"]: {}, poor: {"50": {"images": 1, "pixels": 4}}}
    assert "- ground truth: label 7: 6 pixels in 1 image, label 40: 1 pixels in 1 image" in \
        capsys.readouterr().out
    # left out like 255
    for path in (os.path.join(gt, names[2] + ".png"), os.path.join(poor, names[4] + ".png")):
        mask = read_mask(path)
        write_mask(path, np.where(mask > 6, 255, mask).astype(np.uint8))
    assert compare_command.main(argv + ["--out", str(tmp_path / "d.json")]) == 0
    reference = json.load(open(tmp_path / "d.json"))
    for key in ("value", "reference", "low", "high"):
        assert result[key] == reference[key]


@pytest.mark.parametrize("target, named", [("data_list", "--data-list"),
                                           ("gt_root", "--gt-root"),
                                           ("classes", "--classes"), ("good", "folder A")])
def test_out_is_never_one_of_the_inputs(data, capsys, target, named):
    before = open(data["data_list"], "rb").read()
    assert compare_command.main([data["good"], data["poor"]] + flags(
        data, "--classes", data["classes"], "--out", data[target])) == 1
    assert error_line(capsys, alone=False) == (
        f"error: --out {data[target]}: the same path as {named} ({data[target]}); icd-compare "
        f"never writes over its inputs: choose another file")
    assert open(data["data_list"], "rb").read() == before


def test_out_is_never_a_file_of_a_compared_folder(data, capsys):
    label = os.path.join(data["poor"], read_list(data["data_list"])[0] + ".png")
    before = open(label, "rb").read()
    assert compare_command.main([data["good"], data["poor"]] + flags(
        data, "--classes", data["classes"], "--out", label)) == 1
    assert error_line(capsys, alone=False) == (
        f"error: --out {label}: inside the label folder of B ({data['poor']}), whose files are "
        f"compared; icd-compare never writes over its inputs: choose another file")
    assert open(label, "rb").read() == before


def test_out_a_folder_is_an_error_naming_it(data, tmp_path, capsys):
    folder = str(tmp_path / "reports")
    os.makedirs(folder)
    assert compare_command.main([data["good"], data["poor"]] + flags(
        data, "--classes", data["classes"], "--out", folder)) == 1
    assert error_line(capsys, alone=False) == (
        f"error: --out {folder}: is a folder; give the JSON file to write, e.g. --out "
        f"{os.path.join(folder, 'compare.json')}")
    assert os.listdir(folder) == []
