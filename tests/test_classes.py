"""Class lists as data: reading them, palettes, the config's num_cls, labels, CRF, evaluation,
the synthetic generator, train -> infer -> seeds -> eval on a 3- and a 25-class dataset; the
list travels with checkpoints and results (run records, provenance), and a stage whose list
differs from what made its inputs is refused naming both lists."""
import json
import os
import shutil

import mxnet as mx
import numpy as np
import pytest

from icd.commands import (evaluate as evaluate_command, infer as infer_command,
                          seeds as seeds_command, train as train_command,
                          train_seg as train_seg_command)
from icd.config import load_config
from icd.data.classes import (VOC_CLASSES, class_palette, read_classes, segmentation_classes,
                              voc_palette, write_classes)
from icd.data.dataset import DataPaths, train_loader
from icd.data.superpixels import make_superpixels
from icd.data.synthetic import make_synthetic_voc
from icd.data.voc import read_image_labels, read_list, read_mask, write_annotation, write_mask
from icd.evaluate import evaluate, evaluate_seeds
from icd.io import read_json
from icd.model import model_options
from icd.provenance import read_record
from icd.seeds import SeedSettings, crf_refine, make_seeds

from helpers import (REORDERED, SEG_CONFIG, SIX, THREE, copy_of, data_flags, epochs, error_line,
                     icd_flags, shown)


def class_file(tmp_path, text, name="classes.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Class-list files and palettes

def test_read_classes_default_and_file(tmp_path):
    assert read_classes(None) == read_classes("") == VOC_CLASSES and len(VOC_CLASSES) == 20
    path = class_file(tmp_path, "\ufeffkettle\n  traffic light \nzebra\n\n\n")  # BOM, spaces
    assert read_classes(path) == THREE
    assert segmentation_classes(THREE) == ("background",) + THREE
    write_classes(str(tmp_path / "again.txt"), THREE)
    assert read_classes(str(tmp_path / "again.txt")) == THREE


@pytest.mark.parametrize("text, problem", [
    ("cat\n\ndog\n", r"line 2: empty class name"),
    ("cat\ndog\ncat\n", r"line 3: duplicate class name 'cat' \(first on line 1\)"),
    ("Background\ncat\n", r"line 1: 'Background' must not be listed: the background is implicit"),
    ("\n\n", r"class list is empty"),
    ("".join(f"c{i}\n" for i in range(255)), r"255 classes, at most 254"),
])
def test_read_classes_errors_name_the_file_and_line(tmp_path, text, problem):
    path = class_file(tmp_path, text)
    with pytest.raises(ValueError, match=f"{path}: {problem}"):
        read_classes(path)
    with pytest.raises(FileNotFoundError, match="gone.txt: class-list file not found"):
        read_classes(str(tmp_path / "gone.txt"))


def test_palettes():
    np.testing.assert_array_equal(class_palette(VOC_CLASSES), voc_palette())
    for count in (3, 25, 80):
        names = [f"c{i}" for i in range(count)]
        palette = class_palette(names)
        np.testing.assert_array_equal(palette, class_palette(names))          # deterministic
        assert palette[0].tolist() == [0, 0, 0] and palette[255].tolist() == [224, 224, 192]
        colours = {tuple(c) for c in palette[:count + 1].tolist()}
        assert len(colours) == count + 1                                     # all distinct


# ---------------------------------------------------------------------------------------------
# Config, labels

def test_config_num_cls_follows_the_class_list(tmp_path):
    path = class_file(tmp_path, "kettle\ntraffic light\nzebra\n")
    cfg = load_config(classes=path)
    assert cfg.num_cls == 3 and cfg.class_names == THREE and model_options(cfg.model, cfg)["num_classes"] == 3
    assert load_config(classes=path, num_cls=3).num_cls == 3
    assert load_config().num_cls == 20 and load_config().class_names == VOC_CLASSES
    with pytest.raises(ValueError, match=f"--num-cls: 5 contradicts the 3 classes of {path}"):
        load_config(classes=path, num_cls=5)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"classes: {path}\nnum_cls: 80\n")
    with pytest.raises(ValueError, match="c.yaml: num_cls: 80 contradicts the 3 classes"):
        load_config(str(yaml))
    with pytest.raises(ValueError, match="--num-cls: 6 contradicts PASCAL VOC's 20 classes"):
        load_config(num_cls=6)
    bad = class_file(tmp_path, "a\na\n", "bad.txt")
    with pytest.raises(ValueError, match=f"{bad}: line 2: duplicate"):
        load_config(classes=bad)


def test_labels_follow_the_list_and_a_missing_class_is_named(tmp_path):
    xml = str(tmp_path / "x.xml")
    write_annotation(xml, "x", (8, 8), [dict(name="zebra", bndbox=(1, 1, 4, 4)),
                                        dict(name="traffic light", bndbox=(2, 2, 8, 8))])
    assert read_image_labels(xml, THREE) == [1, 2]
    with pytest.raises(ValueError, match=r"x.xml: unknown class name 'zebra': not in the class "
                                         r"list \(20 classes: aeroplane, .*--classes FILE"):
        read_image_labels(xml)


# ---------------------------------------------------------------------------------------------
# CRF and evaluation over C + 1 labels

def test_crf_keeps_labels_of_a_small_list():
    rng = np.random.default_rng(0)
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 200
    image += rng.integers(0, 10, image.shape, dtype=np.uint8)
    seed = np.zeros((16, 16), np.uint8)
    seed[:, 8:] = 3                                      # the last class of a 3-class list
    seed[6:10, 6:10] = 255
    refined = crf_refine(image, seed, num_classes=3)
    assert (refined[:, :7] == 0).all() and (refined[:, 9:] == 3).all()
    # with VOC's 21 labels the same seed gives the same labels (label 3 is a valid VOC label)
    np.testing.assert_array_equal(crf_refine(image, seed), refined)


def test_evaluation_counts_c_plus_one_classes(tmp_path):
    gt = np.array([[0, 1, 2, 3], [3, 3, 255, 0]], np.uint8)
    seed = np.array([[0, 1, 1, 3], [3, 255, 2, 4]], np.uint8)  # 4: outside a 3-class list
    for folder, mask in (("gt", gt), ("seeds", seed)):
        write_mask(str(tmp_path / folder / "a.png"), mask)
    with pytest.raises(ValueError, match=r"a.png: holds labels outside the class list of 3 "
                                         r"classes \(labels 0..3, 255 = ignore\): 4 \(1 pixels\)"):
        evaluate_seeds(str(tmp_path / "seeds"), str(tmp_path / "gt"), ["a"], classes=THREE)
    result = evaluate_seeds(str(tmp_path / "seeds"), str(tmp_path / "gt"), ["a"], classes=THREE,
                            ignore_unknown=True)
    assert result["unknown_labels"]["labels"] == {"4": {"images": 1, "pixels": 1}}
    assert list(result["iou"]) == ["background", *THREE]
    # confusion over labels 0..3 where both < 4: (0,0) (1,1) (2,1) (3,3) (3,3)
    expected = {"background": 1.0, "kettle": 1 / 2, "traffic light": 0.0, "zebra": 1.0}
    assert result["iou"] == pytest.approx(expected)
    assert result["miou"] == pytest.approx(np.mean(list(expected.values())))


# ---------------------------------------------------------------------------------------------
# The synthetic generator with any list

def test_synthetic_dataset_with_any_class_names(tmp_path):
    names = make_synthetic_voc(str(tmp_path), num_train=12, num_val=0, size=40, seed=2,
                               classes=THREE)
    assert read_classes(str(tmp_path / "classes.txt")) == THREE
    seen = set()
    for name in names["train"]:
        labels = read_image_labels(str(tmp_path / "Annotations" / f"{name}.xml"), THREE)
        mask = read_mask(str(tmp_path / "SegmentationClass" / f"{name}.png"))
        assert {int(v) - 1 for v in np.unique(mask)} - {-1, 254} == set(labels), name
        seen |= set(labels)
    assert seen == {0, 1, 2}
    with pytest.raises(ValueError, match="classes: name 2: duplicate class name 'a'"):
        make_synthetic_voc(str(tmp_path / "x"), num_train=1, num_val=0, classes=["a", "a"])
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# End to end on a 3-class and a 25-class dataset

def make_dataset(root, classes, num_train=8):
    make_synthetic_voc(str(root), num_train=num_train, num_val=0, size=40, seed=5,
                       classes=classes)
    data_list = str(root / "ImageSets" / "Segmentation" / "train.txt")
    make_superpixels(str(root / "JPEGImages"), data_list, str(root / "superpixels"))
    return ["--image-root", str(root / "JPEGImages"), "--annotation-root",
            str(root / "Annotations"), "--superpixel-root", str(root / "superpixels"),
            "--data-list", data_list]


def test_a_class_missing_from_the_list_is_named(tmp_path, capsys):
    flags = make_dataset(tmp_path / "data", THREE, num_train=4)
    flags += ["--snapshot", str(tmp_path / "s"), "--pretrained", "", "--width", "0.0625",
              "--image-size", "32", "--batch-size", "4", "--num-workers", "0"]
    assert train_command.main(flags) == 1   # the data's classes.txt: --classes is needed
    assert "error: --classes: not given, but the data has a class list" in capsys.readouterr().err
    os.remove(tmp_path / "data" / "classes.txt")   # without it: VOC's 20, which lack kettles
    assert train_command.main(flags) == 1
    err = capsys.readouterr().err
    assert "Annotations/train_00000.xml: unknown class name" in err and "not in the class list" in err
    image_root, annotation_root, superpixel_root, data_list = flags[1:8:2]
    with pytest.raises(ValueError, match="unknown class name '(kettle|traffic light|zebra)'"):
        train_loader(image_root, superpixel_root, annotation_root, data_list, batch_size=4,
                     num_workers=0)
    assert train_loader(image_root, superpixel_root, annotation_root, data_list, batch_size=4,
                        num_workers=0, classes=THREE)._dataset.labels.shape == (4, 3)


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [3, 25])
def test_train_infer_seeds_eval_on_any_class_list(tmp_path, num_classes):
    classes = THREE if num_classes == 3 else tuple(f"class {i:02d}" for i in range(num_classes))
    root = tmp_path / "data"
    flags = make_dataset(root, classes)
    class_list = str(root / "classes.txt")
    snapshot = str(tmp_path / "snapshot")
    common = flags + ["--classes", class_list, "--snapshot", snapshot, "--pretrained", "",
                      "--width", "0.0625", "--image-size", "32", "--batch-size", "4",
                      "--num-epoch", "1", "--num-workers", "0", "--infer-size", "48",
                      "--infer-batch-size", "4"]
    assert train_command.main(common) == 0
    params = mx.nd.load(os.path.join(snapshot, "vgg16_icd-0000.params"))
    assert params["arg:fc8_weight"].shape[0] == num_classes
    assert infer_command.main(common + ["--epoch", "0"]) == 0
    results = os.path.join(snapshot, "results")
    data_list = flags[-1]
    data = DataPaths(str(root / "JPEGImages"), str(root / "Annotations"), data_list, classes)
    make_seeds(results, data)
    for name in read_list(data_list):
        labels = read_image_labels(str(root / "Annotations" / f"{name}.xml"), classes)
        seed = read_mask(os.path.join(results, "seeds", "crf", f"{name}.png"))
        assert set(np.unique(seed)) <= {0, 255} | {c + 1 for c in labels}, name
    report = evaluate(results, str(root / "SegmentationClass"),
                      DataPaths(None, str(root / "Annotations"), data_list, classes))
    with open(os.path.join(results, "eval", "eval.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert written["classes"] == list(classes)
    assert list(written["seeds"]["seeds/crf"]["iou"]) == ["background", *classes]
    assert list(written["pixel_ap"]["icd"]["ap"]) == list(classes)
    assert 0 <= report["seeds"]["seeds/crf"]["miou"] <= 1
    present = {c for n in read_list(data_list)
               for c in read_image_labels(str(root / "Annotations" / f"{n}.xml"), classes)}
    assert {c for c, v in written["pixel_ap"]["icd"]["ap"].items() if v is not None} == \
        {classes[c] for c in present}


def test_library_functions_refuse_to_read_a_dataset_with_its_own_list_as_voc(tmp_path):
    """Forgetting `classes` is an error where the data has its own list, never silently VOC
    (icd.data.classes.classes_of_data): the loaders, the seeds' and the evaluation's entry
    points; with the list given, or on data without one, they run."""
    root = tmp_path / "mine"
    names = make_synthetic_voc(str(root), num_train=4, num_val=0, size=40, seed=1)["train"]
    gt_root = str(root / "SegmentationClass")
    with pytest.raises(ValueError, match=r"classes: not given, but the data has a class list, "
                                         r".*mine/classes.txt \(6 classes"):
        evaluate_seeds(gt_root, gt_root, names)
    own = read_classes(str(root / "classes.txt"))
    result = evaluate_seeds(gt_root, gt_root, names, classes=own)   # the masks against themselves
    assert list(result["iou"])[1:] == list(own)
    assert result["iou"]["background"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="classes: not given"):
        train_loader(str(root / "JPEGImages"), str(tmp_path), str(root / "Annotations"),
                     str(root / "ImageSets" / "Segmentation" / "train.txt"), batch_size=2)
    os.remove(root / "classes.txt")   # now it reads as VOC data
    assert list(evaluate_seeds(gt_root, gt_root, names)["iou"])[1:] == list(VOC_CLASSES)


# ---------------------------------------------------------------------------------------------
# The class list travels with checkpoints and results

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


def seeds_with_classes(tiny_voc, results, out, classes, capsys):
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


def test_resume_with_the_classes_in_another_order_is_refused(trained_snapshot, tiny_voc,
                                                             class_lists, tmp_path, capsys):
    snapshot = copy_of(trained_snapshot, tmp_path)
    record = read_json(os.path.join(snapshot, "vgg16_icd-0000.json"))
    assert record["classes"] == list(SIX)
    flags = icd_flags(tiny_voc, snapshot, class_lists["reordered"])
    assert train_command.main(flags + ["--num-epoch", "2", "--begin-epoch", "1"]) == 1
    assert error_line(capsys) == (
        f"error: {os.path.join(snapshot, 'vgg16_icd-0000.json')}: the run was trained on "
        f"{shown(SIX)}, but --classes gives {shown(REORDERED)} (label 1 is 'aeroplane' / "
        f"'bird'); resume with the run's --classes")
    assert epochs(snapshot) == ["vgg16_icd-0000.params"]


def test_inference_checks_the_checkpoints_classes_and_records_them(trained_snapshot, tiny_voc,
                                                                   class_lists, tmp_path, capsys):
    out = str(tmp_path / "results")
    flags = icd_flags(tiny_voc, trained_snapshot, class_lists["reordered"]) + [
        "--epoch", "0", "--out", out]
    assert infer_command.main(flags) == 1
    assert error_line(capsys).startswith(
        f"error: {os.path.join(trained_snapshot, 'vgg16_icd-0000.json')}: the checkpoint was "
        f"trained on {shown(SIX)}, but --classes gives {shown(REORDERED)} (label 1 is "
        f"'aeroplane' / 'bird')")
    assert not os.path.exists(out)
    flags = icd_flags(tiny_voc, trained_snapshot, class_lists["six"]) + [
        "--epoch", "0", "--out", out]
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


def test_eval_with_three_names_on_six_class_data_is_refused(six_voc, class_lists, tmp_path, capsys):
    results = str(tmp_path / "results")
    shutil.copytree(six_voc["gt_root"], os.path.join(results, "seeds", "crf"))
    flags = ["--results", results, "--gt-root", six_voc["gt_root"], "--data-list",
             six_voc["data_list"], "--workers", "1"]
    assert evaluate_command.main(flags + ["--classes", class_lists["three"]]) == 1
    assert error_line(capsys) == (
        f"error: {six_voc['classes']}: the data's class list has {shown(SIX)}, but --classes "
        f"{class_lists['three']} gives {shown(THREE)} (label 1 is 'aeroplane' / 'kettle'); pass "
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
        tiny_voc, scores, class_lists, tmp_path, capsys):
    seeds = seeds_with_classes(tiny_voc, scores, str(tmp_path / "seeds_voc"), VOC_CLASSES, capsys)
    assert read_record(seeds)["settings"]["classes"] == list(VOC_CLASSES)
    flags = ["--results", scores, "--gt-root", tiny_voc["gt_root"], "--data-list",
             tiny_voc["data_list"], "--seeds", seeds, "--workers", "1",
             "--out", str(tmp_path / "eval")]
    assert evaluate_command.main(flags + ["--classes", class_lists["six"]]) == 1
    assert error_line(capsys) == (
        f"error: {seeds}: its seeds run used {shown(VOC_CLASSES)}, but --classes gives "
        f"{shown(SIX)} (label 2 is 'bicycle' / 'bird'); pass the --classes file of the data it "
        f"was made from")
    assert not os.path.exists(tmp_path / "eval")
    assert evaluate_command.main(flags) == 0


def test_train_seg_on_six_class_seeds_without_classes_is_refused(tiny_voc, scores, class_lists,
                                                                 tmp_path, capsys):
    seeds = seeds_with_classes(tiny_voc, scores, str(tmp_path / "seeds_six"), SIX, capsys)
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
    assert train_seg_command.main(argv + ["--classes", class_lists["reordered"]]) == 1
    assert "(label 1 is 'aeroplane' / 'bird')" in error_line(capsys)
    assert train_seg_command.main(argv + ["--classes", class_lists["six"]]) == 0
    assert read_json(os.path.join(snapshot, "vgg16_largefov-0000.json"))["classes"] == list(SIX)
