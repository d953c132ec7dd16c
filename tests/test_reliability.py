"""Reliability: truncated images, larger-than-inference images, the provenance of result folders
(inference -> seeds -> evaluation), all-or-nothing stages and their error messages."""
import dataclasses
import json
import logging
import os
import shutil

import cv2
import mxnet as mx
import numpy as np
import pytest

from icd.data.voc import read_image, read_list, read_mask
from icd.data.dataset import DataPaths
from icd.evaluate import EvalSettings, evaluate
from icd.infer import infer
from icd.provenance import ProvenanceError, read_record, record_path
from icd.seeds import SeedSettings, make_seeds
from icd.runs import checkpoint_path
from icd.tasks import train


def encoded_image(path, **params):
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if params.get("progressive") else []
    assert cv2.imwrite(str(path), image, flags)
    return path.read_bytes()


@pytest.mark.parametrize("name,progressive", [("a.jpg", False), ("b.jpg", True), ("c.png", False)])
def test_truncated_image_is_an_error_naming_the_file(tmp_path, name, progressive):
    path = tmp_path / name
    encoded = encoded_image(path, progressive=progressive)
    assert read_image(str(path)).shape == (40, 56, 3)
    path.write_bytes(encoded + b"\0" * 16)           # trailing padding is not truncation
    assert read_image(str(path)).shape == (40, 56, 3)
    path.write_bytes(encoded[: len(encoded) * 3 // 4])
    with pytest.raises(ValueError, match=rf"{name}: unreadable image, truncated (JPEG|PNG)"):
        read_image(str(path))


# ---------------------------------------------------------------------------------------------
# Provenance: inference -> seeds -> evaluation

@pytest.fixture
def trained(tiny_config):
    """Checkpoints of epochs 0 and 1 of a tiny ICD run; inference at 64 px."""
    cfg = tiny_config(num_epoch=2)
    train(cfg)
    return cfg


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
