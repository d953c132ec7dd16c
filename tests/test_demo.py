"""The demo runner (icd.demo): claim checking, mIoU over present classes, step skipping, and one
reduced end-to-end run (slow)."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from icd import demo
from icd.evaluate import class_iou, confusion_matrix, mean_iou


# ---------------------------------------------------------------------------------------------
# Pure logic

def test_present_miou_equals_the_mean_over_classes_with_ground_truth():
    rng = np.random.default_rng(0)
    gt = rng.choice([0, 3, 8, 255], size=(40, 50))           # background, 2 classes, ignore
    seed = rng.choice([0, 3, 8, 12, 255], size=(40, 50))     # 12: a class absent from the gt
    confusion = confusion_matrix(gt, seed)
    iou = class_iou(confusion)
    assert demo.present_miou(mean_iou(confusion), 3) == pytest.approx(iou[[0, 3, 8]].mean())
    with pytest.raises(ValueError):
        demo.present_miou(0.5, 0)


def test_present_classes_reads_the_ground_truth(tmp_path):
    for name, values in (("a", [0, 3, 255]), ("b", [0, 8])):
        Image.fromarray(np.array([values], np.uint8)).save(tmp_path / f"{name}.png")
    assert demo.present_classes(str(tmp_path), ["a", "b"]) == [0, 3, 8]


def good_tables():
    return {"map": {"cam_baseline": 0.40, "cam_head": 0.45, "icd": 0.60},
            "thresholds": {"0.0": {"cam_baseline": 0.3, "cam_head": 0.35, "icd": 0.5},
                           "0.5": {"cam_baseline": 0.6, "cam_head": 0.62, "icd": 0.7}},
            "table3": [("bottom-up (S)", 0.40), ("+ superpixel refinement (S')", 0.45),
                       ("+ top-down (S'')", 0.50), ("+ CRF", 0.55)]}


def test_claims_pass_on_numbers_that_show_them():
    claims = demo.check_claims(good_tables())
    assert len(claims) == 7 and all(c["passed"] for c in claims)
    assert "mAP ICD 60.0 vs CAM 40.0" in claims[0]["numbers"]
    assert "T=0.5: ICD 70.0 vs CAM 60.0" in claims[2]["numbers"]
    assert claims[-1]["numbers"] == "mIoU 50.0 -> 55.0"


def test_a_claim_fails_at_one_threshold_or_one_component():
    tables = good_tables()
    tables["thresholds"]["0.5"]["icd"] = 0.6          # tie with the CAM baseline: not higher
    tables["table3"][2] = ("+ top-down (S'')", 0.44)  # top-down hurts
    passed = [c["passed"] for c in demo.check_claims(tables)]
    assert passed == [True, True, False, False, True, False, True]


def test_missing_numbers_fail_instead_of_passing():
    claims = demo.check_claims({"map": {"icd": 0.5, "cam_baseline": None}})
    assert not claims[0]["passed"] and "n/a" in claims[0]["numbers"]
    assert not any(c["passed"] for c in claims)


def test_step_action():
    fp = {"settings": {"a": 1}, "inputs": {"data": "t0"}}
    assert demo.step_action(None, fp, False) == "run"
    assert demo.step_action({"status": "done", "fingerprint": fp}, fp, False) == "skip"
    assert demo.step_action({"status": "running", "fingerprint": fp}, fp, False) == "resume"
    assert demo.step_action({"status": "done", "fingerprint": fp}, fp, True) == "rerun"
    changed = {"settings": {"a": 2}, "inputs": {"data": "t0"}}
    assert demo.step_action({"status": "done", "fingerprint": fp}, changed, False) == "rerun"
    upstream_rerun = {"settings": {"a": 1}, "inputs": {"data": "t1"}}
    assert demo.step_action({"status": "done", "fingerprint": fp}, upstream_rerun, False) == "rerun"


def test_infer_size_is_the_smallest_8k_plus_1_covering_every_image(tmp_path):
    Image.new("RGB", (120, 97)).save(tmp_path / "a.jpg")
    Image.new("RGB", (60, 129)).save(tmp_path / "b.jpg")
    assert demo.infer_size_for(str(tmp_path), ["a", "b"]) == 129
    assert demo.infer_size_for(str(tmp_path), ["a"]) == 121


def test_unknown_steps_are_rejected():
    with pytest.raises(ValueError, match="unknown steps"):
        demo.DemoSettings(steps=["data", "trian"])


def test_steps_are_skipped_resumed_and_rerun(tmp_path, monkeypatch):
    calls = []

    def fake(step):
        def run(settings):
            calls.append(step)
            os.makedirs(demo.step_folders(settings, step)[0], exist_ok=True)
            return {}
        return run

    monkeypatch.setattr(demo, "STEP_FUNCTIONS", {s: fake(s) for s in demo.STEPS})
    settings = demo.quick_settings(out=str(tmp_path / "out"), steps=["data", "superpixels"])
    demo.run(settings)
    assert calls == ["data", "superpixels"]
    summary = demo.run(settings)                                   # done: skipped
    assert calls == ["data", "superpixels"]
    assert {s["action"] for s in summary.values()} == {"skip"}
    demo.run(demo.quick_settings(out=settings.out, steps=["superpixels"], overwrite=True))
    assert calls[-1] == "superpixels"
    # other data settings: data reruns, and superpixels (which reads data) reruns after it
    summary = demo.run(demo.quick_settings(out=settings.out, steps=["data", "superpixels"],
                                           num_train=30))
    assert calls[-2:] == ["data", "superpixels"]
    assert [s["action"] for s in summary.values()] == ["rerun", "rerun"]
    # a step whose inputs were never made is an error naming them
    with pytest.raises(RuntimeError, match="'train_cam'"):
        demo.run(demo.quick_settings(out=settings.out, steps=["infer"]))
    # an interrupted step resumes with its partial outputs kept
    marker = demo.read_marker(settings, "superpixels")
    demo.write_marker(settings, "superpixels", dict(marker, status="running"))
    keep = os.path.join(settings.out, "superpixels", "partial.png")
    open(keep, "w").close()
    summary = demo.run(demo.quick_settings(out=settings.out, steps=["superpixels"],
                                           num_train=30))
    assert summary["superpixels"]["action"] == "resume" and os.path.exists(keep)


# ---------------------------------------------------------------------------------------------
# End to end

@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    settings = demo.quick_settings(out=str(tmp_path / "demo"), cpus=2)
    summary = demo.run(settings)
    assert list(summary) == list(demo.STEPS)
    report = open(summary["report"]["report"], encoding="utf-8").read()
    for heading in ("## What was run", "## Claims (train split", "Table 1. Pixel-level mAP",
                    "Table 2. Seeds by threshold", "Table 3. Components of ICD",
                    "mIoU (present)", "## Train split", "## Val split", "## Training"):
        assert heading in report, heading
    assert report.count("**PASS**") + report.count("**FAIL**") == 7
    figures = os.path.join(settings.out, "report", "figures")
    for name in ("threshold_study_train.png", "threshold_study_val.png", "class_ap_train.png",
                 "class_ap_val.png", "seed_overlays_train.png", "seed_overlays_val.png",
                 "training_curves.png"):
        assert os.path.getsize(os.path.join(figures, name)) > 0, name
    for which in ("pretrain", "cam", "icd"):
        assert glob.glob(os.path.join(figures, "train_demo", which, "*.jpg")), which
    assert glob.glob(os.path.join(figures, "infer_demo", "icd", "class_*.jpg"))
    for split, count in (("train", settings.num_train), ("val", settings.num_val)):
        icd = demo.results_dir(settings, "icd", split)
        cam = demo.results_dir(settings, "cam", split)
        for folder in ("scores_cam", "scores_icd", "scores_icd_bu", "scores_icd_bu_sp"):
            assert len(glob.glob(os.path.join(icd, folder, "*.npy"))) == count, folder
        assert len(glob.glob(os.path.join(cam, "scores_cam", "*.npy"))) == count
        for _, folder, _, _ in demo.TABLE3:
            assert len(glob.glob(os.path.join(icd, "seeds", folder, "*.png"))) == count, folder
        for _, folder, _ in demo.CAM_SEEDS:
            assert len(glob.glob(os.path.join(cam, "seeds", folder, "*.png"))) == count, folder
    with open(os.path.join(settings.out, "report", "report.json"), encoding="utf-8") as f:
        numbers = json.load(f)
    assert len(numbers["claims"]["train"]) == 7
    # a second run skips every finished step and only rewrites the report
    again = demo.run(settings)
    assert [again[s]["action"] for s in demo.STEPS[:-1]] == ["skip"] * (len(demo.STEPS) - 1)
