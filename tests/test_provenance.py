"""Provenance records of result folders (icd.provenance): inference -> seeds -> evaluation
refuse inputs of a failed, running or mixed run and of other settings, take the inference size
of the scores, name images larger than it; icd-infer-seg keeps a record too."""
import dataclasses
import json
import logging
import os
import shutil

import mxnet as mx
import numpy as np
import pytest

from icd.checkpoint import save_checkpoint
from icd.commands import infer_seg as infer_seg_command
from icd.data.classes import VOC_CLASSES
from icd.data.dataset import DataPaths
from icd.data.voc import read_image, read_list, read_mask
from icd.evaluate import EvalSettings, evaluate
from icd.infer import infer
from icd.model import build_model
from icd.provenance import ProvenanceError, read_record, record_path
from icd.runs import checkpoint_path
from icd.seeds import SeedSettings, make_seeds

from helpers import REORDERED, SEG_CONFIG, error_line, shown


# ---------------------------------------------------------------------------------------------
# Inference -> seeds -> evaluation

def seeds_of(cfg, results, out_dir=None, **settings):
    return make_seeds(results, DataPaths(cfg.image_root, cfg.annotation_root, cfg.data_list),
                      SeedSettings(crf=False, **settings), out_dir=out_dir)


def test_failed_inference_leaves_folders_later_stages_refuse(trained, tmp_path):
    """Issue #11.2: inferring another epoch into a folder of scores, stopped by a missing
    superpixel, left a mix of two models that make_seeds turned into seeds with exit 0."""
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 0), results, [mx.cpu()])
    assert read_record(os.path.join(results, "scores_icd"))["state"] == "complete"
    with pytest.raises(ProvenanceError, match=r"scores_\w+: holds results of another infer run "
                                              r"\(changed: checkpoint .*epoch 0 -> 1.*--overwrite"):
        infer(trained, checkpoint_path(trained, 1), results, [mx.cpu()])
    superpixels = str(tmp_path / "superpixels")
    shutil.copytree(trained.superpixel_root, superpixels)
    names = read_list(trained.data_list)
    os.remove(os.path.join(superpixels, names[5] + ".png"))
    broken = dataclasses.replace(trained, superpixel_root=superpixels, overwrite=True)
    with pytest.raises(FileNotFoundError, match=names[5]):
        infer(broken, checkpoint_path(trained, 1), results, [mx.cpu()])
    record = read_record(os.path.join(results, "scores_cam"))
    assert record["state"] == "failed" and names[5] in record["error"]
    assert len(os.listdir(os.path.join(results, "scores_cam"))) < len(names)   # old ones cleared
    with pytest.raises(ProvenanceError, match=r"scores_cam: the infer run that writes it is "
                                              r"failed \(FileNotFoundError: .*run infer_scores.py"):
        seeds_of(trained, results)
    assert not os.path.exists(os.path.join(results, "seeds"))


def test_killed_inference_is_refused_and_a_rerun_completes(trained, tmp_path):
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 1), results, [mx.cpu()])
    for folder in ("scores_cam", "scores_icd"):       # what SIGKILL during a rerun leaves
        path = record_path(os.path.join(results, folder))
        with open(path) as f:
            record = json.load(f)
        record["state"] = "running"
        with open(path, "w") as f:
            json.dump(record, f)
    with pytest.raises(ProvenanceError, match="is running .*started .* by pid"):
        seeds_of(trained, results)
    infer(trained, checkpoint_path(trained, 1), results, [mx.cpu()])   # same settings: allowed
    assert seeds_of(trained, results)["written"] == 8


def test_seeds_take_the_inference_size_of_the_scores(trained, tmp_path):
    """Issue #11.3: the default --infer-size 513 on scores made at 129 silently changed 7% of the
    seed pixels. Now the size comes from the scores' record; a contradicting one is refused."""
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 1), results, [mx.cpu()])
    with pytest.raises(ProvenanceError, match=r"scores_cam: scores were made at inference size "
                                              r"64, not 513; .*--infer-size 64"):
        seeds_of(trained, results, infer_size=513)
    assert not os.path.exists(os.path.join(results, "seeds"))
    default = seeds_of(trained, results)
    explicit = seeds_of(trained, results, infer_size=64, out_dir=str(tmp_path / "explicit"))
    for name in read_list(trained.data_list):
        np.testing.assert_array_equal(read_mask(os.path.join(default["out_dir"], name + ".png")),
                                      read_mask(os.path.join(explicit["out_dir"], name + ".png")))
    record = read_record(default["out_dir"])
    assert record["state"] == "complete" and record["settings"]["infer_size"] == 64
    report = evaluate(results, trained.image_root.replace("JPEGImages", "SegmentationClass"),
                      DataPaths(None, trained.annotation_root, trained.data_list))
    assert set(report["seeds"]) == {"seeds/nocrf"} and "pixel_ap" in report
    with pytest.raises(ProvenanceError, match="made at inference size 64, not 65"):
        evaluate(results, trained.image_root.replace("JPEGImages", "SegmentationClass"),
                 DataPaths(None, trained.annotation_root, trained.data_list),
                 EvalSettings(infer_size=65))


def test_seed_folder_of_other_settings_is_refused_and_same_settings_resume(trained, tmp_path):
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 1), results, [mx.cpu()])
    out = str(tmp_path / "seeds")
    assert seeds_of(trained, results, out_dir=out)["written"] == 8
    assert seeds_of(trained, results, out_dir=out) == {"written": 0, "skipped": 8, "out_dir": out}
    with pytest.raises(ProvenanceError, match=r"seeds: holds results of another seeds run "
                                              r"\(changed: crf False -> True\)"):
        make_seeds(results, DataPaths(trained.image_root, trained.annotation_root,
                                      trained.data_list), out_dir=out)
    other = str(tmp_path / "results_epoch0")
    infer(trained, checkpoint_path(trained, 0), other, [mx.cpu()])
    shutil.rmtree(os.path.join(results, "scores_cam"))       # mix two inference runs
    shutil.copytree(os.path.join(other, "scores_cam"), os.path.join(results, "scores_cam"))
    shutil.copy(record_path(os.path.join(other, "scores_cam")), results)
    with pytest.raises(ProvenanceError, match="made by different inference runs"):
        seeds_of(trained, results, out_dir=str(tmp_path / "mixed"))


def test_images_larger_than_the_inference_size_are_named(trained, tmp_path, caplog):
    """Issue #11.3: a larger image is centre-cropped as in the release, with a warning naming it
    and the crop, and the seeds step names it instead of failing far from the cause."""
    small = dataclasses.replace(trained, infer_size=32)
    results = str(tmp_path / "results")
    names = read_list(trained.data_list)
    sizes = {n: read_image(os.path.join(trained.image_root, n + ".jpg")).shape[:2] for n in names}
    larger = sorted(n for n, (h, w) in sizes.items() if h > 32 or w > 32)
    assert larger
    with caplog.at_level(logging.WARNING, logger="icd.infer"):
        infer(small, checkpoint_path(trained, 1), results, [mx.cpu()])
    warned = sorted(r.getMessage().split(":")[0] for r in caplog.records
                    if "larger than the inference size 32" in r.getMessage())
    assert warned == larger
    h, w = sizes[larger[0]]
    cropped = read_record(os.path.join(results, "scores_icd"))["notes"]["cropped"]
    assert cropped[larger[0]] == {"size": [h, w], "window": [max(h - 32, 0) // 2,
                                                             max(w - 32, 0) // 2, 32]}
    with pytest.raises(ProvenanceError, match=rf"{len(larger)} images are larger than the "
                                              rf"inference size 32.*{larger[0]} {h}x{w}.*"
                                              rf"--infer-size {max(max(s) for s in sizes.values())}"):
        seeds_of(trained, results)


# ---------------------------------------------------------------------------------------------
# icd-infer-seg's provenance record

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
