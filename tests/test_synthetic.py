"""The synthetic VOC-layout dataset: determinism, layout, labels, and the tools end to end."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from icd.commands import superpixels as superpixels_command, synthetic as synthetic_command
from icd.constants import NUM_SUPERPIXEL_IDS
from icd.data.classes import read_classes
from icd.data.dataset import train_loader
from icd.data.synthetic import (DEFAULT_CLASSES, OBJECT_AREA, _place_objects, make_synthetic_voc,
                                synthesize)
from icd.data.voc import read_image, read_image_labels, read_list


def all_files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_same_seed_same_bytes(tmp_path):
    make_synthetic_voc(str(tmp_path / "a"), num_train=6, num_val=2, size=64, seed=7)
    make_synthetic_voc(str(tmp_path / "b"), num_train=6, num_val=2, size=64, seed=7)
    make_synthetic_voc(str(tmp_path / "c"), num_train=6, num_val=2, size=64, seed=8)
    a, b, c = (all_files(tmp_path / x) for x in "abc")
    assert len(a) == 3 * 8 + 2 + 1 and a == b   # image, xml, mask per image; lists; classes.txt
    assert a.keys() == c.keys() and a != c


def test_voc_layout_and_labels(tmp_path):
    classes = ["bird", "bus", "sheep"]
    names = make_synthetic_voc(str(tmp_path), num_train=30, num_val=4, size=80, seed=0,
                               classes=classes)
    assert read_classes(str(tmp_path / "classes.txt")) == tuple(classes)
    single = 0
    for split, count in (("train", 30), ("val", 4)):
        listed = read_list(str(tmp_path / "ImageSets" / "Segmentation" / f"{split}.txt"))
        assert listed == names[split] and len(listed) == count
        for name in listed:
            image = read_image(str(tmp_path / "JPEGImages" / f"{name}.jpg"))
            assert 0.85 * 80 - 1 <= image.shape[0] <= 1.15 * 80 + 1
            mask_path = str(tmp_path / "SegmentationClass" / f"{name}.png")
            with Image.open(mask_path) as mask_image:   # single-channel index PNG, as the release
                assert mask_image.mode == "L"
                mask = np.array(mask_image)
            np.testing.assert_array_equal(cv2.imread(mask_path, 0), mask)
            assert mask.shape == image.shape[:2]
            labels = read_image_labels(str(tmp_path / "Annotations" / f"{name}.xml"),
                                       read_classes(str(tmp_path / "classes.txt")))
            assert set(labels) <= {0, 1, 2}
            present = {int(v) - 1 for v in np.unique(mask)} - {-1, 254}
            assert present == set(labels), name
            assert (mask == 255).any() and (mask == 0).mean() > 0.3  # border band, background
            single += len(labels) == 1
    assert 0.5 <= single / 34 <= 0.9  # about 70% single-class images


@pytest.mark.parametrize("classes", [[2], [0, 4, 5]])
def test_objects_have_a_small_visible_discriminative_part(classes):
    for seed in range(5):
        placed = _place_objects(np.random.default_rng(seed), 112, 112, classes)
        assert [k for k, _, _ in placed] == classes  # 112 px leave room for every object
        for n, (k, body, marker) in enumerate(placed):
            assert not (marker & ~body).any()
            assert 0.07 <= marker.sum() / body.sum() <= 0.17
            for _, later_body, _ in placed[n + 1:]:
                assert not (later_body & marker).any()  # never hidden by a later object


def test_objects_cover_voc_like_shares_of_the_image():
    for seed in range(8):
        (_, alone, _), = _place_objects(np.random.default_rng(seed), 112, 112, [3])
        assert OBJECT_AREA["single"][0] - 0.05 <= alone.mean() <= OBJECT_AREA["single"][1] + 0.05
        for _, body, _ in _place_objects(np.random.default_rng(seed), 112, 112, [0, 4, 5]):
            assert OBJECT_AREA["several"][0] - 0.04 <= body.mean() <= \
                OBJECT_AREA["several"][1] + 0.04


def test_synthesize_boxes_and_mask():
    image, mask, objects = synthesize(np.random.default_rng(0), 112, 6)
    assert image.dtype == np.uint8 and mask.shape == image.shape[:2]
    for k, (xmin, ymin, xmax, ymax) in objects:
        assert 0 <= k < 6 and 1 <= xmin < xmax <= image.shape[1] and ymin < ymax
        assert (mask[ymin - 1:ymax, xmin - 1:xmax] == k + 1).any()


def test_duplicate_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match="classes: name 3: duplicate class name 'cat'"):
        make_synthetic_voc(str(tmp_path), num_train=1, num_val=1, classes=["cat", "dog", "cat"])
    assert not os.path.exists(tmp_path / "ImageSets")


def test_tools_end_to_end(tmp_path):
    root = tmp_path / "voc"
    assert synthetic_command.main(["--out", str(root), "--num-train", "8", "--num-val", "2",
                                   "--size", "64", "--seed", "3"]) == 0
    data_list = str(root / "ImageSets" / "Segmentation" / "train.txt")
    assert superpixels_command.main(["--image-root", str(root / "JPEGImages"), "--data-list",
                                     data_list, "--out", str(root / "Superpixels"),
                                     "--features", "colour", "--workers", "2"]) == 0
    assert len(os.listdir(root / "Superpixels")) == 8
    classes = read_classes(str(root / "classes.txt"))
    assert classes == DEFAULT_CLASSES
    loader = train_loader(str(root / "JPEGImages"), str(root / "Superpixels"),
                          str(root / "Annotations"), data_list, image_size=72, batch_size=4,
                          num_workers=0, classes=classes)
    data, superpixels, labels = (x.asnumpy() for x in next(iter(loader)))
    assert data.shape == (4, 3, 72, 72) and superpixels.shape == (4, 72, 72)
    assert labels.shape == (4, len(DEFAULT_CLASSES))
    assert data.dtype == superpixels.dtype == np.uint8 and labels.dtype == np.float32
    assert 0 <= data.min() and data.max() <= 255
    assert (data == 127).any()  # 64 px images are padded to the 72 crop
    assert 0 <= superpixels.min() and superpixels.max() < NUM_SUPERPIXEL_IDS
    assert ((labels == 0) | (labels == 1)).all() and (labels.sum(1) >= 1).all()
