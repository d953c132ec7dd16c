"""Seeds (docs/release.md section 7): the rule on hand-made maps, CRF, files, tools."""
import os

import cv2
import numpy as np
import pytest

from icd.commands import seeds as seeds_command
from icd.data.voc import read_mask, write_mask
from icd.seeds import crf_refine, default_seed_dir, generate_seed, resize_scores, seed_from_scores

from helpers import FEAT, H, NAMES, S, W, build_results, results_seeds


U = 255  # undefined


def row(*values):
    """A (1, 1, W) or (K, 1, W) float32 map from per-class rows."""
    return np.asarray(values, np.float32)[:, None, :]


# ---------------------------------------------------------------------------------------------
# The rule

def test_resize_scores_upsamples_to_infer_size_then_crops():
    scores = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    out = resize_scores(scores, (5, 6), infer_size=8)
    full = cv2.resize(scores[1], (8, 8), interpolation=cv2.INTER_LINEAR)
    assert out.shape == (2, 5, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], full[:5, :6])
    assert resize_scores(scores[:1], (3, 3), 8).shape == (1, 3, 3)   # K = 1 keeps its axis
    with pytest.raises(ValueError, match="exceeds"):
        resize_scores(scores, (9, 4), 8)


def test_single_class_threshold_zero_and_undefined_zero_pixels():
    icd = row([2, 1, 0, -1, -3])
    seed = seed_from_scores(np.zeros_like(icd), icd, [7])
    np.testing.assert_array_equal(seed[0], [8, 8, U, 0, 0])   # VOC index 7 -> seed 8


def test_threshold_replaces_1e5_in_fg_and_bg():
    # fg_score = [1, .5, 0, 0, 0], bg_score = [0, 0, 0, 1/3, 1]
    icd = row([2, 1, 0, -1, -3])
    seed = seed_from_scores(np.zeros_like(icd), icd, [7], threshold=0.5)
    np.testing.assert_array_equal(seed[0], [8, U, U, U, 0])


def test_multi_class_conflicts_ties_and_undefined():
    # pixel:  0   1   2   3   4   5   6   7   8
    icd = row([2, 2, -1, -1, 2, -1, 0, 2, 2],
              [2, -1, -1, 2, -1, 0, -1, 2, 1])
    cam = row([1, 3, 0, 0, 0, 0, 0, 2, 3],
              [3, 0, 0, 3, 0, 0, 0, 2, 3])
    seed = seed_from_scores(cam, icd, [0, 14])
    expected = [
        15,  # both propose, comp (1/3, 1): class 14
        1,   # class 0 alone
        0,   # every class negative: background
        15,  # class 14 alone
        U,   # class 0 alone, but its CAM is the stack minimum: comp range 0 (tie rule)
        U,   # neither fg nor bg (class 14 score exactly 0)
        U,   # neither
        U,   # both propose with equal comp (2/3, 2/3)
        1,   # both propose, comp (1, 1/2): class 0
    ]
    np.testing.assert_array_equal(seed[0], expected)


def test_single_proposals_need_a_separating_comp():
    icd = row([1, -1], [-1, 1])
    # constant CAM: norm(max(cam, 0)) = 0, so comp = 0 and every fg pixel is a tie -> undefined
    np.testing.assert_array_equal(seed_from_scores(np.ones_like(icd), icd, [3, 5])[0], [U, U])
    np.testing.assert_array_equal(seed_from_scores(row([1, 0], [0, 1]), icd, [3, 5])[0], [4, 6])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="L"):
        seed_from_scores(row([1, 2]), row([1, 2], [1, 2]), [0, 1])


def _saliency_case(salient):
    """1×200 single-class image: ICD fg on [0, 50) and at 150, bg elsewhere."""
    icd = np.full((1, 1, 200), -1, np.float32)
    icd[0, 0, :50] = 1
    icd[0, 0, 150] = 1
    sal = np.zeros((1, 200), np.float32)
    sal[0, salient] = 1.0
    return icd, sal


def test_saliency_replaces_icd_background():
    icd, sal = _saliency_case(slice(0, 100))
    seed = seed_from_scores(icd, icd, [4], saliency=sal)[0]
    assert (seed[:50] == 5).all()
    assert (seed[50:100] == U).all()       # salient, ICD bg: neither fg nor (saliency) bg
    assert (seed[100:] == 0).sum() == 99   # non-salient: bg
    assert seed[150] == U                  # ICD fg and saliency bg: both -> undefined


def test_saliency_falls_back_to_icd_background_below_one_percent():
    icd, sal = _saliency_case(slice(60, 61))   # 0.5% not background
    seed = seed_from_scores(icd, icd, [4], saliency=sal)[0]
    expected = seed_from_scores(icd, icd, [4])[0]
    expected[60] = U                           # salient and ICD bg: bg &= ICD bg leaves it off
    np.testing.assert_array_equal(seed, expected)
    assert seed[150] == 5                      # ICD fg no longer clashes with saliency bg
    icd, sal = _saliency_case(slice(60, 62))   # exactly 1%: no fall-back
    seed = seed_from_scores(icd, icd, [4], saliency=sal)[0]
    assert seed[150] == U and seed[60] == U


def test_saliency_seeds_skip_the_crf():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 12, 3), np.uint8)
    icd = rng.normal(size=(1, 12, 12)).astype(np.float32)
    sal = rng.random((12, 12)).astype(np.float32)
    with_crf = generate_seed(image, icd, icd, [2], 12, saliency=sal, use_crf=True)
    np.testing.assert_array_equal(with_crf, seed_from_scores(icd, icd, [2], saliency=sal))


# ---------------------------------------------------------------------------------------------
# CRF

def test_crf_cleans_an_isolated_wrong_pixel_in_a_uniform_region():
    image = np.full((24, 24, 3), 120, np.uint8)
    seed = np.full((24, 24), 3, np.uint8)
    seed[12, 12] = 9
    seed[:, :4] = U
    refined = crf_refine(image, seed)
    assert refined.dtype == np.uint8 and refined.shape == seed.shape
    assert (refined == 3).all()


def test_crf_marks_low_confidence_pixels_undefined():
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
    # no label anywhere: uniform 1/21 marginals < 0.1
    assert (crf_refine(image, np.full((16, 16), U, np.uint8)) == U).all()


def test_generate_seed_with_and_without_crf():
    rng = np.random.default_rng(1)
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, 10:] = 200
    icd = np.where(np.arange(20) < 10, -1.0, 1.0)[None, None, :].repeat(20, 1)
    icd = icd.astype(np.float32) + rng.normal(0, 1e-3, (1, 20, 20)).astype(np.float32)
    icd[0, 5, 3] = 1.0                                  # an isolated wrong fg pixel
    raw = generate_seed(image, icd, icd, [6], 20, use_crf=False)
    assert raw[5, 3] == 7 and (raw[:, 10:] == 7).all() and (raw[:, :10] == 7).sum() == 1
    refined = generate_seed(image, icd, icd, [6], 20, use_crf=True)
    np.testing.assert_array_equal(refined, crf_refine(image, raw))
    assert refined[5, 3] == 0 and set(np.unique(refined)) <= {0, 7, U}


# ---------------------------------------------------------------------------------------------
# Files: the tiny results folder of helpers.build_results

@pytest.fixture
def tiny(tmp_path):
    return build_results(str(tmp_path))


def test_make_seeds_variants_and_folders(tiny):
    out = results_seeds(tiny, crf=False)
    assert out == {"written": 3, "skipped": 0, "out_dir": default_seed_dir(tiny["results"], "nocrf")}
    assert out["out_dir"].endswith(os.path.join("seeds", "nocrf"))
    seed = read_mask(os.path.join(out["out_dir"], "img_b.png"))
    gt = read_mask(os.path.join(tiny["gt"], "img_b.png"))
    assert seed.shape == (H, W) and set(np.unique(seed)) <= {0, 1, 15, U}
    assert (seed == gt)[seed != U].mean() > 0.9
    crf = results_seeds(tiny, workers=2)                        # multi-process
    assert crf["out_dir"].endswith(os.path.join("seeds", "crf")) and crf["written"] == 3
    sal = results_seeds(tiny, saliency_root=tiny["saliency"])
    assert sal["out_dir"].endswith(os.path.join("seeds", "sal")) and sal["written"] == 3
    for variant in (out, crf, sal):   # release: single-channel 8-bit PNGs of the labels
        path = os.path.join(variant["out_dir"], "img_b.png")
        assert cv2.imread(path, cv2.IMREAD_UNCHANGED).shape == (H, W)
        np.testing.assert_array_equal(cv2.imread(path, 0), read_mask(path))
    assert default_seed_dir("R", "nocrf", "scores_icd_bu_sp") == os.path.join(
        "R", "seeds", "nocrf_icd_bu_sp")


def test_seed_files_hold_the_labels_the_release_writes(tiny):
    """Hand-made score files of img_b (classes 0 and 14) at the inference size S, so the resize
    is the identity: the columns repeat the 9 pixels of test_multi_class_conflicts_ties_and_
    undefined. `cv2.imread(seed, 0)`, as the release's compute_iou.py reads seeds, returns the
    seed the release writes with cv2.imwrite: 15, 1, 0, 15, U, U, U, U, 1 repeated."""
    icd = np.array([[2, 2, -1, -1, 2, -1, 0, 2, 2], [2, -1, -1, 2, -1, 0, -1, 2, 1]], np.float32)
    cam = np.array([[1, 3, 0, 0, 0, 0, 0, 2, 3], [3, 0, 0, 3, 0, 0, 0, 2, 3]], np.float32)
    columns = np.arange(S) % 9
    for folder, scores in (("scores_icd", icd), ("scores_cam", cam)):
        np.save(os.path.join(tiny["results"], folder, "img_b.npy"),
                np.repeat(scores[:, None, columns], S, axis=1))
    out = results_seeds(tiny, crf=False)["out_dir"]
    expected = np.array([15, 1, 0, 15, U, U, U, U, 1], np.uint8)[columns[:W]]
    np.testing.assert_array_equal(cv2.imread(os.path.join(out, "img_b.png"), 0),
                                  np.tile(expected, (H, 1)))


def test_make_seeds_workers_agree(tiny, tmp_path):
    one = results_seeds(tiny, crf=False, out_dir=str(tmp_path / "one"))
    two = results_seeds(tiny, crf=False, workers=2, out_dir=str(tmp_path / "two"))
    for name in NAMES:
        np.testing.assert_array_equal(read_mask(os.path.join(one["out_dir"], name + ".png")),
                                      read_mask(os.path.join(two["out_dir"], name + ".png")))


def test_make_seeds_is_resumable(tiny):
    out = results_seeds(tiny, crf=False)["out_dir"]
    path = os.path.join(out, "img_a.png")
    marker = np.full((H, W), 7, np.uint8)
    write_mask(path, marker)
    os.utime(path, (1_000_000, 1_000_000))
    assert results_seeds(tiny, crf=False) == {"written": 0, "skipped": 3, "out_dir": out}
    assert os.path.getmtime(path) == 1_000_000
    np.testing.assert_array_equal(read_mask(path), marker)
    assert results_seeds(tiny, crf=False, overwrite=True)["written"] == 3
    assert not (read_mask(path) == 7).all()


def test_make_seeds_failure_leaves_no_partial_png(tiny, monkeypatch):
    real_imwrite = cv2.imwrite

    def failing_imwrite(path, *args, **kwargs):
        written = real_imwrite(path, *args, **kwargs)   # the bytes reach the disk, then the
        if "img_b" in os.path.basename(path):            # writer fails
            raise OSError("disk full")
        return written

    monkeypatch.setattr(cv2, "imwrite", failing_imwrite)
    with pytest.raises(OSError, match="disk full"):
        results_seeds(tiny, crf=False)
    out = default_seed_dir(tiny["results"], "nocrf")
    assert sorted(os.listdir(out)) == ["img_a.png"]   # no img_b.png, no temporary file


@pytest.mark.parametrize("damage, error, message", [
    ("missing", FileNotFoundError, "score file not found"),
    ("classes", ValueError, "differs from the 2 present classes"),
    ("2d", ValueError, "must be 3-D"),
])
def test_make_seeds_names_a_bad_score_file(tiny, damage, error, message):
    path = os.path.join(tiny["results"], "scores_icd", "img_b.npy")
    if damage == "missing":
        os.remove(path)
    else:
        np.save(path, np.zeros((3, FEAT, FEAT) if damage == "classes" else (FEAT, FEAT),
                               np.float32))
    with pytest.raises(error, match=message) as info:
        results_seeds(tiny, crf=False)
    assert path in str(info.value)


def test_make_seeds_names_a_missing_image(tiny):
    os.remove(os.path.join(tiny["images"], "img_c.jpg"))
    with pytest.raises(FileNotFoundError, match="img_c"):
        results_seeds(tiny, crf=False)


def test_make_seeds_tool(tiny, capsys):
    flags = ["--results", tiny["results"], "--image-root", tiny["images"],
             "--annotation-root", tiny["annotations"], "--data-list", tiny["list"],
             "--infer-size", str(S), "--workers", "1", "--no-crf"]
    assert seeds_command.main(flags) == 0
    assert "3 written" in capsys.readouterr().out
    assert len(os.listdir(os.path.join(tiny["results"], "seeds", "nocrf"))) == 3
    assert seeds_command.main(flags + ["--icd-scores", "scores_cam"]) == 0
    assert len(os.listdir(os.path.join(tiny["results"], "seeds", "nocrf_cam"))) == 3


def test_make_seeds_worker_errors_reach_the_caller(tiny):
    path = os.path.join(tiny["results"], "scores_cam", "img_c.npy")
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="score file not found") as info:
        results_seeds(tiny, crf=False, workers=2)
    assert path in str(info.value)
