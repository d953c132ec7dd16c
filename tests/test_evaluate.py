"""Evaluation: seed mIoU, threshold study, pixel AP against hand-computed values; reports, tool."""
import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from icd.commands import evaluate as evaluate_command
from icd.data.dataset import DataPaths
from icd.data.voc import VOC_CLASSES, read_mask, voc_palette, write_mask
from icd.evaluate import EvalSettings, evaluate, evaluate_seeds, pixel_ap, threshold_study
from icd.metrics import average_precision, class_iou, confusion_matrix, mean_iou
from icd.provenance import producing
from icd.seeds import SeedSettings, make_seeds

from helpers import S, build_results


# ---------------------------------------------------------------------------------------------
# Seed mIoU


def test_confusion_and_iou_by_hand():
    gt = np.array([[0, 1, 1], [255, 2, 0]], np.uint8)
    seed = np.array([[0, 1, 2], [1, 255, 0]], np.uint8)
    # kept pixels (both < 3): (0,0) 0/0, (0,1) 1/1, (0,2) 1/2, (1,2) 0/0
    conf = confusion_matrix(gt, seed, num_classes=3)
    np.testing.assert_array_equal(conf, [[2, 0, 0], [0, 1, 1], [0, 0, 0]])
    # IoU: 2/(2+2-2), 1/(2+1-1), 0/(0+1-0)
    np.testing.assert_allclose(class_iou(conf), [1.0, 0.5, 0.0])
    assert mean_iou(conf) == pytest.approx(0.5)
    # the release's 21 classes: the 18 absent classes count as 0 in the mean
    assert mean_iou(confusion_matrix(gt, seed, 21)) == pytest.approx(1.5 / 21)


def test_iou_epsilon_is_the_release_one():
    conf = np.zeros((2, 2), np.int64)
    conf[0, 0] = 1
    assert class_iou(conf)[0] == 1 / (1 + 1e-10) and class_iou(conf)[1] == 0


# ---------------------------------------------------------------------------------------------
# AP

def naive_ap(pos, neg):
    """Σ (R_k − R_{k−1}) P_k over every distinct score, straight from the definition."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    ap, last_recall = 0.0, 0.0
    for t in np.unique(np.concatenate([pos, neg]))[::-1]:
        tp, fp = (pos >= t).sum(), (neg >= t).sum()
        recall = tp / pos.size
        ap += (recall - last_recall) * tp / (tp + fp)
        last_recall = recall
    return ap


def test_ap_by_hand_with_a_tie():
    # ranking: 0.9 P | 0.7 N | {0.5 P, 0.5 N} one threshold | 0.1 N
    # (R, P): (1/2, 1) then (1, 2/4): AP = 0.5 * 1 + 0.5 * 0.5
    pos = np.array([0.5, 0.9], np.float32)
    neg = np.array([0.1, 0.5, 0.7], np.float32)
    assert average_precision(pos, neg) == pytest.approx(0.75)
    assert np.isnan(average_precision(np.zeros(0, np.float32), neg))


@pytest.mark.parametrize("seed", range(5))
def test_ap_matches_sklearn_and_the_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    scores = rng.integers(0, 12, n).astype(np.float32) / 4     # many ties
    truth = rng.random(n) < 0.3
    truth[0] = True
    ap = average_precision(scores[truth].copy(), scores[~truth].copy())
    assert ap == pytest.approx(naive_ap(scores[truth], scores[~truth]), abs=1e-12)
    metrics = pytest.importorskip("sklearn.metrics")          # test reference only
    assert ap == pytest.approx(metrics.average_precision_score(truth, scores), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Studies on a hand-made 8×8 image (infer size 8: the resize is the identity)

def _one_image(root, cam_row, icd_row, gt_row, cls=2):
    for folder in ("results/scores_cam", "results/scores_icd", "ann", "gt"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for folder, values in (("scores_cam", cam_row), ("scores_icd", icd_row)):
        scores = np.tile(np.asarray(values, np.float32), (8, 1))[None]
        np.save(os.path.join(root, "results", folder, "x.npy"), scores)
    write_mask(os.path.join(root, "gt", "x.png"), np.tile(np.asarray(gt_row, np.uint8), (8, 1)))
    with open(os.path.join(root, "ann", "x.xml"), "w") as f:
        f.write(f"<annotation><object><name>{VOC_CLASSES[cls]}</name>"
                "<difficult>0</difficult></object></annotation>")
    return {k: os.path.join(root, k) for k in ("results", "ann", "gt")}


def test_threshold_study_by_hand(tmp_path):
    icd = [-1, -0.7, -0.4, -0.1, 0.1, 0.4, 0.7, 1.0]
    cam = [v - 0.5 for v in icd]            # fg only on the last two columns
    gt = [0, 0, 0, 0, 3, 3, 3, 3]
    p = _one_image(str(tmp_path), cam, icd, gt)
    study = threshold_study(p["results"], p["gt"], p["ann"], ["x"], thresholds=(0, 0.3, 0.5),
                            infer_size=8)
    # ICD: T=0 perfect; T=0.3 keeps |icd| > 0.3 (6 of 8 columns), T=0.5 keeps 4 columns,
    # and every kept pixel is right: IoU 1 for background and class 3, 0 for the other 19.
    assert [study["icd"][t]["recall"] for t in ("0.0", "0.3", "0.5")] == [1.0, 0.75, 0.5]
    for t in ("0.0", "0.3", "0.5"):
        assert study["icd"][t]["miou"] == pytest.approx(2 / 21)
    # CAM at T=0: bg on columns 0..5, fg on 6, 7: IoU bg 4/6, class 2/4
    assert study["cam"]["0.0"]["recall"] == 1.0
    assert study["cam"]["0.0"]["miou"] == pytest.approx((4 / 6 + 2 / 4) / 21)


def test_pixel_ap_by_hand(tmp_path):
    # scores by column; gt 255 on column 0 is not ranked
    icd = [5, 0.9, 0.2, 0.5, 0.5, 0.7, 0.1, 0.6]
    gt = [255, 3, 3, 0, 3, 0, 0, 3]
    p = _one_image(str(tmp_path), icd, icd, gt)
    ap = pixel_ap(p["results"], p["gt"], p["ann"], ["x"], infer_size=8)
    # ranking: 0.9 P | 0.7 N | 0.6 P | {0.5 P, 0.5 N} | 0.2 P | 0.1 N (each ×8 rows: same AP)
    expected = naive_ap([0.9, 0.2, 0.5, 0.6], [0.5, 0.7, 0.1])
    assert expected == pytest.approx(0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 3 / 5 + 0.25 * 4 / 6)
    assert ap["icd"]["ap"]["bird"] == pytest.approx(expected)
    assert ap["icd"]["map"] == pytest.approx(expected)      # the only class with images
    assert ap["cam"]["ap"]["aeroplane"] is None


# ---------------------------------------------------------------------------------------------
# The whole evaluation on the tiny results folder of helpers.build_results

@pytest.fixture
def seeded(tmp_path):
    paths = build_results(str(tmp_path))
    for crf in (False, True):
        make_seeds(paths["results"],
                   DataPaths(paths["images"], paths["annotations"], paths["list"]),
                   SeedSettings(infer_size=S, crf=crf))
    return paths


def test_evaluate_seeds_perfect_and_mismatched(seeded, tmp_path):
    names = ["img_a", "img_b", "img_c"]
    result = evaluate_seeds(seeded["gt"], seeded["gt"], names)
    # gt is its own seed: IoU 1 for background, aeroplane, dog, person
    assert result["miou"] == pytest.approx(4 / 21)
    assert result["iou"]["person"] == pytest.approx(1.0) and result["iou"]["cat"] == 0
    os.makedirs(tmp_path / "bad")
    write_mask(str(tmp_path / "bad" / "img_a.png"), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="img_a.png: shape"):
        evaluate_seeds(str(tmp_path / "bad"), seeded["gt"], names)
    with pytest.raises(FileNotFoundError, match="img_b.png"):
        evaluate_seeds(str(tmp_path / "bad"), seeded["gt"], names[1:])


def test_palette_and_grey_ground_truth_give_the_same_miou(seeded, tmp_path):
    """VOC's SegmentationClass is palette PNGs, SegmentationClassAug grey ones: same labels, same
    mIoU; a colour (RGB) ground truth is an error naming the file."""
    names = ["img_a", "img_b", "img_c"]
    seeds = os.path.join(seeded["results"], "seeds", "nocrf")
    palette_root, colour_root = tmp_path / "palette", tmp_path / "colour"
    os.makedirs(palette_root)
    os.makedirs(colour_root)
    for name in names:
        gt = read_mask(os.path.join(seeded["gt"], name + ".png"))
        im = Image.fromarray(gt, mode="P")
        im.putpalette(voc_palette().reshape(-1).tolist())
        im.save(palette_root / f"{name}.png")
        cv2.imwrite(str(colour_root / f"{name}.png"), voc_palette()[gt][:, :, ::-1])
        with Image.open(os.path.join(seeded["gt"], name + ".png")) as grey:
            assert grey.mode == "L"
    grey_result = evaluate_seeds(seeds, seeded["gt"], names)
    assert 0 < grey_result["miou"] < 1
    assert evaluate_seeds(seeds, str(palette_root), names) == grey_result
    with pytest.raises(ValueError, match="img_a.png.*palette or single-channel"):
        evaluate_seeds(seeds, str(colour_root), names)


def test_evaluate_writes_reports(seeded):
    out = os.path.join(seeded["results"], "eval")
    report = evaluate(seeded["results"], seeded["gt"],
                      DataPaths(seeded["images"], seeded["annotations"], seeded["list"]),
                      EvalSettings(infer_size=S, num_overlays=2), workers=2)
    assert set(report["seeds"]) == {os.path.join("seeds", "crf"), os.path.join("seeds", "nocrf")}
    assert 0 < report["seeds"][os.path.join("seeds", "nocrf")]["miou"] <= 1
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f) == report
    for name in ("eval.md", "threshold_study.png", "class_ap.png", "seed_overlays.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert not [f for f in os.listdir(out) if f.startswith(".")]      # no temporary files
    text = open(os.path.join(out, "eval.md")).read()
    for title in ("Table 1", "Table 2", "Table 3", "Fig. 5", "| 0.5 |", "Ours (ICD)"):
        assert title in text


def test_eval_seeds_tool(seeded, tmp_path, capsys):
    out = str(tmp_path / "report")
    assert evaluate_command.main([
        "--results", seeded["results"], "--gt-root", seeded["gt"], "--data-list", seeded["list"],
        "--seeds", "seeds/nocrf", "--annotation-root", seeded["annotations"],
        "--infer-size", str(S), "--workers", "1", "--out", out]) == 0
    stdout = capsys.readouterr().out
    assert "seeds/nocrf" in stdout and "Table 2" in stdout
    with open(os.path.join(out, "eval.json")) as f:
        report = json.load(f)
    assert list(report["seeds"]) == ["seeds/nocrf"]
    assert set(report["threshold_study"]["icd"]) == {"0.0", "0.1", "0.3", "0.5"}
    assert report["pixel_ap"]["icd"]["map"] > 0.5


# ---------------------------------------------------------------------------------------------
# Labels outside the class list (255 is the ignore label, anything else above C is no label)

def _with_label(src, dst, name, value, where=(slice(0, 2), slice(0, 3))):
    """A copy of the label folder `src` in `dst` where `name` holds `value` on `where`."""
    shutil.copytree(src, dst)
    mask = read_mask(os.path.join(dst, name + ".png"))
    mask[where] = value
    write_mask(os.path.join(dst, name + ".png"), mask)
    return str(dst)


def test_labels_outside_the_class_list_are_refused_or_left_out_and_counted(seeded, tmp_path):
    names = ["img_a", "img_b", "img_c"]
    seeds = os.path.join(seeded["results"], "seeds", "nocrf")
    gt_30 = _with_label(seeded["gt"], tmp_path / "gt_30", "img_b", 30)            # VOC: 0..20
    gt_255 = _with_label(seeded["gt"], tmp_path / "gt_255", "img_b", 255)
    seeds_50 = _with_label(seeds, tmp_path / "seeds_50", "img_c", 50)
    with pytest.raises(ValueError, match=re.escape(
            f"{os.path.join(gt_30, 'img_b.png')}: holds labels outside the class list of 20 "
            f"classes (labels 0..20, 255 = ignore): 30 (6 pixels)")):
        evaluate_seeds(seeds, gt_30, names)
    with pytest.raises(ValueError, match=re.escape(
            f"{os.path.join(seeds_50, 'img_c.png')}: holds labels outside the class list of 20 "
            f"classes (labels 0..20, 255 = ignore): 50 (6 pixels)")):
        evaluate_seeds(seeds_50, seeded["gt"], names)
    # ignored: left out exactly like the ignore label, and counted
    ignored = evaluate_seeds(seeds, gt_30, names, ignore_unknown=True)
    assert ignored["miou"] == evaluate_seeds(seeds, gt_255, names)["miou"]
    assert ignored["miou"] != evaluate_seeds(seeds, seeded["gt"], names)["miou"]
    assert ignored["unknown_labels"] == {"ground truth": {"30": {"images": 1, "pixels": 6}},
                                         "labels": {}}
    assert evaluate_seeds(seeds_50, seeded["gt"], names, ignore_unknown=True)["unknown_labels"] \
        == {"ground truth": {}, "labels": {"50": {"images": 1, "pixels": 6}}}
    assert evaluate_seeds(seeds, gt_255, names)["unknown_labels"] == {"ground truth": {},
                                                                      "labels": {}}


def test_pixel_ap_refuses_a_ground_truth_label_outside_the_list(tmp_path):
    """gt 40 on a column: counted as a negative of every class it would lower the AP; refused,
    or left out like 255."""
    icd = [5, 0.9, 0.2, 0.5, 0.5, 0.7, 0.1, 0.6]
    p = _one_image(str(tmp_path / "ignore"), icd, icd, [255, 3, 3, 0, 3, 0, 0, 3])
    expected = pixel_ap(p["results"], p["gt"], p["ann"], ["x"], infer_size=8)
    p = _one_image(str(tmp_path / "unknown"), icd, icd, [40, 3, 3, 0, 3, 0, 0, 3])
    with pytest.raises(ValueError, match=re.escape(
            f"{os.path.join(p['gt'], 'x.png')}: holds labels outside the class list of 20 classes "
            f"(labels 0..20, 255 = ignore): 40 (8 pixels)")):
        pixel_ap(p["results"], p["gt"], p["ann"], ["x"], infer_size=8)
    with pytest.raises(ValueError, match="x.png: holds labels outside"):
        threshold_study(p["results"], p["gt"], p["ann"], ["x"], infer_size=8)
    assert pixel_ap(p["results"], p["gt"], p["ann"], ["x"], infer_size=8,
                    ignore_unknown=True) == expected


def test_eval_tool_refuses_or_reports_labels_outside_the_list(seeded, tmp_path, capsys):
    gt = _with_label(seeded["gt"], tmp_path / "gt_30", "img_a", 30)
    out = str(tmp_path / "report")
    flags = ["--results", seeded["results"], "--gt-root", gt, "--data-list", seeded["list"],
             "--seeds", "seeds/nocrf", "--workers", "1", "--out", out]
    assert evaluate_command.main(flags) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {os.path.join(gt, 'img_a.png')}: holds labels outside the "
                          f"class list of 20 classes (labels 0..20, 255 = ignore): 30 (6 pixels)")
    assert not os.path.exists(os.path.join(out, "eval.json"))
    assert evaluate_command.main(flags + ["--ignore-unknown-labels"]) == 0
    report = json.load(open(os.path.join(out, "eval.json")))
    assert report["seeds"]["seeds/nocrf"]["unknown_labels"]["ground truth"] == {
        "30": {"images": 1, "pixels": 6}}
    assert "- ground truth: label 30: 6 pixels in 1 image" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Nothing to evaluate

def test_eval_with_nothing_to_evaluate_is_an_error_naming_the_folder(seeded, tmp_path, capsys):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    flags = ["--gt-root", seeded["gt"], "--data-list", seeded["list"], "--workers", "1"]
    assert evaluate_command.main(["--results", empty] + flags) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {empty}: nothing to evaluate: no seed folder in {os.path.join(empty, 'seeds')} "
        f"(or given as --seeds), and no annotation root (--annotation-root), which the threshold "
        f"study and pixel AP of its score maps need")
    assert os.listdir(empty) == []                                   # no empty report
    # a results folder whose inference failed: its record says why there is nothing
    failed = str(tmp_path / "failed")
    with pytest.raises(RuntimeError):
        with producing([os.path.join(failed, "scores_icd")], "infer", {"model": "x"}):
            shutil.copy(os.path.join(seeded["results"], "scores_icd", "img_a.npy"),
                        os.path.join(failed, "scores_icd"))
            raise RuntimeError("img_b: superpixels not found")
    assert evaluate_command.main(["--results", failed] + flags) == 1
    assert capsys.readouterr().err.strip().startswith(
        f"error: {os.path.join(failed, 'scores_icd')}: the infer run that writes it is failed "
        f"(RuntimeError: img_b: superpixels not found)")
    assert not os.path.exists(os.path.join(failed, "eval"))
