"""COCO instances -> VOC layout: hand-made polygons and RLEs give exact label maps and XMLs."""
import os
import re

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from icd.commands.coco_to_voc import main
from icd.data.classes import read_classes
from icd.data.coco import coco_to_voc, voc_box
from icd.data.voc import read_image, read_image_labels, read_list, read_mask
from icd.io import read_json, write_json

U = 255
A, B, EMPTY = "COCO_train2014_000000000001", "COCO_train2014_000000000002", \
    "COCO_train2014_000000000003"


def rect(x0, y0, x1, y1):
    """A polygon whose pycocotools raster is rows y0..y1-1, columns x0..x1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def column_rle(height, width, rows, cols):
    """Uncompressed (crowd-style) RLE of a box: column-major run lengths."""
    m = np.zeros((height, width), np.uint8)
    m[rows, cols] = 1
    flat = m.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": [height, width]}


def compressed_rle(height, width, rows, cols):
    m = np.zeros((height, width), np.uint8, order="F")
    m[rows, cols] = 1
    rle = coco_mask.encode(np.asfortranarray(m))
    return {"counts": rle["counts"].decode("ascii"), "size": [height, width]}


def make_coco(root):
    """Two annotated images (8x10, 6x6) and one without instances; categories 1 cat,
    3 traffic light, 7 dog (ids not contiguous, listed out of order)."""
    images = [(A, 8, 10), (B, 6, 6), (EMPTY, 5, 5)]
    os.makedirs(root / "train2014")
    for i, (name, h, w) in enumerate(images):
        cv2.imwrite(str(root / "train2014" / f"{name}.jpg"), np.full((h, w, 3), 40 * i, np.uint8))
    annotations = [
        # A: a cat and a dog overlapping (rows 3-4, columns 3-4), a crowd of traffic lights
        dict(id=1, image_id=1, category_id=1, iscrowd=0, bbox=[1, 1, 4, 4],
             segmentation=rect(1, 1, 5, 5)),
        dict(id=2, image_id=1, category_id=7, iscrowd=0, bbox=[3, 3, 5, 4],
             segmentation=rect(3, 3, 8, 7)),
        dict(id=3, image_id=1, category_id=3, iscrowd=1, bbox=[9, 0, 1, 8],
             segmentation=column_rle(8, 10, slice(0, 8), 9)),
        # B: two cats overlapping (same class: cat), a cat crowd partly over the second cat
        dict(id=4, image_id=2, category_id=1, iscrowd=0, bbox=[0, 0, 3, 3],
             segmentation=rect(0, 0, 3, 3)),
        dict(id=5, image_id=2, category_id=1, iscrowd=0, bbox=[2.5, 2, 2.5, 3],
             segmentation=compressed_rle(6, 6, slice(2, 5), slice(2, 5))),
        dict(id=6, image_id=2, category_id=1, iscrowd=1, bbox=[0, 4, 6, 2],
             segmentation=column_rle(6, 6, slice(4, 6), slice(0, 6))),
    ]
    instances = dict(
        images=[dict(id=i + 1, file_name=f"{n}.jpg", height=h, width=w)
                for i, (n, h, w) in enumerate(images)],
        annotations=annotations,
        categories=[dict(id=7, name="dog"), dict(id=1, name="cat"),
                    dict(id=3, name="traffic light")])
    os.makedirs(root / "annotations")
    write_json(str(root / "annotations" / "instances_train2014.json"), instances)


def expected_masks():
    a = np.zeros((8, 10), np.uint8)
    a[1:5, 1:5] = 1          # cat
    a[3:7, 3:8] = 3          # dog
    a[3:5, 3:5] = U          # cat and dog overlap: ambiguous
    a[:, 9] = U              # crowd only
    b = np.zeros((6, 6), np.uint8)
    b[0:3, 0:3] = 1
    b[2:5, 2:5] = 1          # the same class overlapping stays the class
    b[4:6, :] = U            # crowd only ...
    b[4, 2:5] = 1            # ... except where a (non-crowd) cat covers it
    return {A: a, B: b}


def test_converts_to_the_expected_xml_masks_lists_and_classes(tmp_path):
    make_coco(tmp_path / "coco")
    out = tmp_path / "voc"
    summary = coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(out))
    assert (summary["split"], summary["written"], summary["kept"],
            summary["without_instances"]) == ("train", 2, 0, 1)
    classes = read_classes(str(out / "classes.txt"))
    assert classes == ("cat", "traffic light", "dog")   # category-id order
    assert read_list(str(out / "ImageSets/Segmentation/train.txt")) == [A, B]
    assert not (out / "JPEGImages" / f"{EMPTY}.jpg").exists()
    for name, mask in expected_masks().items():
        path = str(out / "SegmentationClass" / f"{name}.png")
        np.testing.assert_array_equal(cv2.imread(path, 0), mask)   # single-channel index PNG
        np.testing.assert_array_equal(read_mask(path), mask)
        jpeg = out / "JPEGImages" / f"{name}.jpg"
        assert jpeg.is_symlink() and os.path.isabs(os.readlink(jpeg))
        assert read_image(str(jpeg)).shape[:2] == mask.shape
    # crowd classes count as present; objects carry COCO's boxes as VOC 1-based inclusive boxes
    assert read_image_labels(str(out / "Annotations" / f"{A}.xml"), classes) == [0, 1, 2]
    assert read_image_labels(str(out / "Annotations" / f"{B}.xml"), classes) == [0]
    xml = (out / "Annotations" / f"{B}.xml").read_text()
    assert xml.count("<object>") == 3 and "<xmin>3</xmin>" in xml and "<xmax>5</xmax>" in xml


def test_box_conversion():
    assert voc_box([0, 0, 3, 3], 6, 6) == (1, 1, 3, 3)
    assert voc_box([2.5, 2, 2.5, 3], 6, 6) == (3, 3, 5, 5)
    assert voc_box([-1, 4.2, 20, 0.1], 6, 8) == (1, 5, 8, 5)     # clipped, at least one pixel


def test_resumable_copy_overwrite_and_a_second_split(tmp_path):
    make_coco(tmp_path / "coco")
    out = str(tmp_path / "voc")
    coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", out, images="copy")
    png = os.path.join(out, "SegmentationClass", f"{A}.png")
    assert not os.path.islink(os.path.join(out, "JPEGImages", f"{A}.jpg"))
    cv2.imwrite(png, np.zeros((8, 10), np.uint8))          # kept: not rewritten
    again = coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", out)
    assert (again["written"], again["kept"]) == (0, 2) and read_mask(png).max() == 0
    coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", out, overwrite=True)
    np.testing.assert_array_equal(read_mask(png), expected_masks()[A])
    # a split named by flag, with the image folder given
    coco_to_voc(str(tmp_path / "coco"), str(tmp_path / "coco/annotations/instances_train2014.json"),
                out, split="minival", image_dir=str(tmp_path / "coco/train2014"))
    assert read_list(os.path.join(out, "ImageSets/Segmentation/minival.txt")) == [A, B]


def test_command_line_with_workers_and_its_errors(tmp_path, capsys):
    make_coco(tmp_path / "coco")
    out = str(tmp_path / "voc")
    assert main(["--coco-root", str(tmp_path / "coco"), "--annotations",
                 "instances_train2014.json", "--out", out, "--workers", "2"]) == 0
    assert "2 written, 0 kept, 1 without instances" in capsys.readouterr().out
    for name, mask in expected_masks().items():
        np.testing.assert_array_equal(read_mask(os.path.join(out, "SegmentationClass",
                                                             f"{name}.png")), mask)
    assert main(["--coco-root", str(tmp_path / "coco"), "--annotations", "mine.json",
                 "--out", out]) == 1
    assert "mine.json: cannot tell the split" in capsys.readouterr().err
    bad = tmp_path / "instances_val2014.json"
    bad.write_text('{"images": []}')
    assert main(["--coco-root", str(tmp_path / "coco"), "--annotations", str(bad),
                 "--image-dir", str(tmp_path / "coco/train2014"), "--out", out]) == 1
    assert f"{bad}: not a COCO instances file (no 'annotations' list)" in capsys.readouterr().err


def test_a_wrong_image_size_is_named(tmp_path):
    make_coco(tmp_path / "coco")
    cv2.imwrite(str(tmp_path / "coco/train2014" / f"{B}.jpg"), np.zeros((7, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=f"{B}.jpg: image is 6x7, the annotations say 6x6"):
        coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(tmp_path / "voc"))


def coco_with(root, images, annotations=None):
    """A COCO folder whose instances list `images` (id, file_name, h, w), each with one cat box
    unless `annotations` is given; the image files are written under train2014/."""
    for image_id, file_name, h, w in images:
        path = os.path.normpath(os.path.join(str(root / "train2014"), file_name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, np.full((h, w, 3), 10 * image_id, np.uint8))
    if annotations is None:
        annotations = [dict(id=100 + i, image_id=i, category_id=1, iscrowd=0, bbox=[0, 0, 2, 2],
                            segmentation=rect(0, 0, 2, 2)) for i, _, _, _ in images]
    os.makedirs(root / "annotations", exist_ok=True)
    write_json(str(root / "annotations" / "instances_train2014.json"), dict(
        images=[dict(id=i, file_name=f, height=h, width=w) for i, f, h, w in images],
        annotations=annotations, categories=[dict(id=1, name="cat")]))


def test_names_are_unique_safe_ids_with_a_mapping(tmp_path):
    """The same base name in two folders, a space, names equal but for case: one image each,
    names every stage can list, and a mapping file back to the COCO images."""
    coco_with(tmp_path / "coco", [(1, "a/x.jpg", 4, 5), (2, "b/x.jpg", 6, 5),
                                  (3, "my photo.jpg", 4, 4), (4, "Y.jpg", 4, 4), (5, "y.jpg", 5, 4),
                                  (6, ".hidden.jpg", 4, 4)])
    out = tmp_path / "voc"
    summary = coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(out))
    names = read_list(summary["list"])
    assert names == ["x_1", "x_2", "my_photo", "Y_4", "y_5", "image_6"]
    mapping = read_json(summary["mapping"])["images"]
    assert {n: (m["id"], m["file_name"]) for n, m in mapping.items()} == {
        "x_1": (1, "a/x.jpg"), "x_2": (2, "b/x.jpg"), "my_photo": (3, "my photo.jpg"),
        "Y_4": (4, "Y.jpg"), "y_5": (5, "y.jpg"), "image_6": (6, ".hidden.jpg")}
    assert read_image(str(out / "JPEGImages" / "x_2.jpg")).shape[:2] == (6, 5)   # not a/x.jpg
    assert read_mask(str(out / "SegmentationClass" / "x_1.png")).shape == (4, 5)


def test_a_file_name_outside_the_image_folder_is_refused(tmp_path):
    (tmp_path / "secret.jpg").write_bytes(b"")
    coco_with(tmp_path / "coco", [(1, "ok.jpg", 4, 4)])
    path = tmp_path / "coco" / "annotations" / "instances_train2014.json"
    instances = read_json(str(path))
    for bad in ("../../secret.jpg", str(tmp_path / "secret.jpg")):
        instances["images"][0]["file_name"] = bad
        write_json(str(path), instances)
        with pytest.raises(ValueError, match=rf"{path}: image 1: file_name '{bad}' is outside "
                                             rf"the image folder"):
            coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(tmp_path / "voc"))
    assert not (tmp_path / "voc" / "JPEGImages").exists()


@pytest.mark.parametrize("field, value, message", [
    ("bbox", None, r"annotation 7: 'bbox' must be \[x, y, width, height\]"),
    ("bbox", [0, 0, "2", 2], r"annotation 7: 'bbox' must be"),
    ("bbox", [0, 0, -1, 2], r"annotation 7: 'bbox' must be"),
    ("segmentation", None, r"annotation 7: 'segmentation' must be a polygon list or an RLE"),
    ("image_id", 99, r"annotation 7: 'image_id' 99 is not the id of an image"),
    ("category_id", "1", r"annotation 7: has category '1', not in the categories"),
    ("iscrowd", 2, r"annotation 7: 'iscrowd' must be 0 or 1"),
])
def test_a_missing_or_ill_typed_field_names_the_annotation(tmp_path, field, value, message):
    ann = dict(id=7, image_id=1, category_id=1, iscrowd=0, bbox=[0, 0, 2, 2],
               segmentation=rect(0, 0, 2, 2))
    if value is None:
        del ann[field]
    else:
        ann[field] = value
    coco_with(tmp_path / "coco", [(1, "ok.jpg", 4, 4)], [ann])
    path = tmp_path / "coco" / "annotations" / "instances_train2014.json"
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(tmp_path / "voc"))


def test_a_missing_image_field_names_the_image(tmp_path, capsys):
    coco_with(tmp_path / "coco", [(1, "ok.jpg", 4, 4)])
    path = tmp_path / "coco" / "annotations" / "instances_train2014.json"
    instances = read_json(str(path))
    del instances["images"][0]["height"]
    write_json(str(path), instances)
    assert main(["--coco-root", str(tmp_path / "coco"), "--annotations",
                 "instances_train2014.json", "--out", str(tmp_path / "voc")]) == 1
    assert f"error: {path}: image 1: 'height' must be a positive integer, got None" in \
        capsys.readouterr().err


def test_a_name_another_split_holds_for_another_image_is_refused(tmp_path):
    """Two splits converted into one folder: a name of the second that the first already holds
    for another image would keep (resume) the first's files; refused, naming the mapping."""
    coco_with(tmp_path / "coco", [(1, "x.jpg", 4, 4)])
    out = tmp_path / "voc"
    coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(out))
    other = tmp_path / "other"
    coco_with(other, [(1, "x.jpg", 6, 6)])
    with pytest.raises(ValueError, match=rf"{out / 'coco_images_train.json'}: 'x' is already "
                                         rf"image .*coco/train2014/x.jpg of split train"):
        coco_to_voc(str(other), "instances_train2014.json", str(out), split="val")
    assert not (out / "ImageSets" / "Segmentation" / "val.txt").exists()
    # the same images under another split name are fine (e.g. a minival list)
    coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(out), split="minival")
    assert read_list(str(out / "ImageSets" / "Segmentation" / "minival.txt")) == ["x"]


def test_dotted_names_are_ids_every_stage_reads_back(tmp_path):
    """Issue 30: `photo.jpg` and `photo.v2.jpg` became `photo` and `photo.v2`, which the list
    reader then cut to one name listed twice; a name ending in an image extension is no id."""
    coco_with(tmp_path / "coco", [(1, "photo.jpg", 4, 5), (2, "photo.v2.jpg", 6, 5),
                                  (3, "scan.png.jpg", 4, 4)])
    out = tmp_path / "voc"
    summary = coco_to_voc(str(tmp_path / "coco"), "instances_train2014.json", str(out))
    assert read_list(summary["list"]) == ["photo", "photo.v2", "image_3"]
    for name, shape in (("photo", (4, 5)), ("photo.v2", (6, 5)), ("image_3", (4, 4))):
        assert read_image(str(out / "JPEGImages" / f"{name}.jpg")).shape[:2] == shape
        assert read_mask(str(out / "SegmentationClass" / f"{name}.png")).shape == shape
        assert read_image_labels(str(out / "Annotations" / f"{name}.xml"), ["cat"]) == [0]


@pytest.mark.parametrize("name, problem", [
    ("bi\ncycle", r"holds the control or invisible character U\+000A"),
    ("cat\t", r"has blanks at its start or end"),
    (" cat", r"has blanks at its start or end"),
    ("ca\u200bt", r"holds the control or invisible character U\+200B"),
])
def test_a_class_name_that_would_not_read_back_names_the_category(tmp_path, capsys, name,
                                                                  problem):
    coco_with(tmp_path / "coco", [(1, "x.jpg", 4, 5)])
    path = tmp_path / "coco" / "annotations" / "instances_train2014.json"
    instances = read_json(str(path))
    instances["categories"] = [dict(id=1, name="dog"), dict(id=4, name=name)]
    write_json(str(path), instances)
    out = tmp_path / "voc"
    assert main(["--coco-root", str(tmp_path / "coco"), "--annotations",
                 "instances_train2014.json", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"^error: {path}: category 4: name {re.escape(repr(name))} {problem}; it "
                     rf"would not read back from classes\.txt as written", err), err
    assert not out.exists()


def test_odd_polygons_and_instances_outside_the_image_are_left_out_and_counted(tmp_path, capsys,
                                                                               caplog):
    cat = dict(category_id=1, iscrowd=0)
    coco_with(tmp_path / "coco", [(1, "a.jpg", 8, 10), (2, "b.jpg", 6, 6)], annotations=[
        dict(cat, id=11, image_id=1, bbox=[1, 1, 4, 4], segmentation=rect(1, 1, 5, 5)),
        dict(cat, id=12, image_id=1, bbox=[5, 5, 3, 3],
             segmentation=[[5, 5, 8, 5, 8, 8, 5]]),                  # 7 numbers: y missing
        dict(cat, id=13, image_id=1, bbox=[10, 2, 4, 4],
             segmentation=rect(10, 2, 14, 6)),                       # right of the 10 columns
        dict(cat, id=21, image_id=2, bbox=[-5, 0, 5, 3],
             segmentation=rect(-5, 0, 0, 3)),                        # left of column 0
    ])
    out = tmp_path / "voc"
    with caplog.at_level("WARNING", logger="icd.data.coco"):
        assert main(["--coco-root", str(tmp_path / "coco"), "--annotations",
                     "instances_train2014.json", "--out", str(out), "--workers", "1"]) == 0
    path = tmp_path / "coco" / "annotations" / "instances_train2014.json"
    assert (f"{path}: annotation 12: polygon 1 has 7 coordinates, an odd number (x, y pairs); "
            f"the instance is left out") in caplog.text
    assert (f"{path}: annotation 13: box [10, 2, 4, 4] lies wholly outside its 10x8 image 1; "
            f"the instance is left out") in caplog.text
    assert "annotation 21: box [-5, 0, 5, 3] lies wholly outside its 6x6 image 2" in caplog.text
    assert ("1 written, 0 kept, 1 without instances left out, 3 instances left out (1 with a "
            "polygon of an odd number of coordinates, 2 wholly outside their image)"
            ) in capsys.readouterr().out
    expected = np.zeros((8, 10), np.uint8)
    expected[1:5, 1:5] = 1
    np.testing.assert_array_equal(read_mask(str(out / "SegmentationClass" / "a.png")), expected)
    assert (out / "Annotations" / "a.xml").read_text().count("<object>") == 1
    assert read_list(str(out / "ImageSets" / "Segmentation" / "train.txt")) == ["a"]
