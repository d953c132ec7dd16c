"""VOC list files, XML image labels (release difficult rule), images, annotations."""
import numpy as np
import pytest

from icd.data import voc


def write_xml(path, objects):
    """objects: (name, difficult) pairs; difficult None leaves the tag out."""
    body = "".join(
        f"<object><name>{name}</name>"
        + ("" if difficult is None else f"<difficult>{difficult}</difficult>")
        + "</object>" for name, difficult in objects)
    path.write_text(f"<annotation><filename>x.jpg</filename>{body}</annotation>")
    return str(path)


def test_labels_difficult_rule(tmp_path):
    # easy objects win; difficult ones are ignored when an easy one exists
    xml = write_xml(tmp_path / "a.xml", [("dog", 0), ("cat", 1), ("person", None), ("dog", 0)])
    assert voc.read_image_labels(xml) == [voc.VOC_CLASSES.index("dog"),
                                          voc.VOC_CLASSES.index("person")]
    # only difficult objects: take them, de-duplicated and sorted
    xml = write_xml(tmp_path / "b.xml", [("train", 1), ("aeroplane", 1), ("train", 1)])
    assert voc.read_image_labels(xml) == [0, voc.VOC_CLASSES.index("train")]
    labels = voc.multi_hot(voc.read_image_labels(xml))
    assert labels.dtype == np.float32 and labels.shape == (20,) and labels.sum() == 2


def test_labels_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.xml.*not found"):
        voc.read_image_labels(str(tmp_path / "gone.xml"))
    with pytest.raises(ValueError, match="unknown.xml.*unknown class name 'unicorn'"):
        voc.read_image_labels(write_xml(tmp_path / "unknown.xml", [("unicorn", 0)]))
    with pytest.raises(ValueError, match="empty.xml.*no objects"):
        voc.read_image_labels(write_xml(tmp_path / "empty.xml", []))
    (tmp_path / "broken.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="broken.xml"):
        voc.read_image_labels(str(tmp_path / "broken.xml"))


def test_read_list(tmp_path):
    path = tmp_path / "train_aug.txt"
    path.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n\nb\n")
    assert voc.read_list(str(path)) == ["2007_000032", "b"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        voc.read_list(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        voc.read_list(str(tmp_path / "nolist.txt"))


def test_image_round_trip_and_bad_images(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    voc.write_image(str(tmp_path / "red.png"), image)
    np.testing.assert_array_equal(voc.read_image(str(tmp_path / "red.png")), image)
    with pytest.raises(FileNotFoundError, match="none.jpg"):
        voc.read_image(str(tmp_path / "none.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="bad.jpg.*unreadable"):
        voc.read_image(str(tmp_path / "bad.jpg"))


def test_annotation_and_mask_round_trip(tmp_path):
    path = str(tmp_path / "x.xml")
    voc.write_annotation(path, "x", (10, 12, 3), [dict(name="sheep", bndbox=(1, 2, 5, 6)),
                                                 dict(name="bus", bndbox=(3, 3, 9, 9),
                                                      difficult=1)])
    assert voc.read_image_labels(path) == [voc.VOC_CLASSES.index("sheep")]
    mask = np.array([[0, 1, 255], [20, 3, 0]], np.uint8)
    voc.write_mask(str(tmp_path / "m.png"), mask)
    np.testing.assert_array_equal(voc.read_mask(str(tmp_path / "m.png")), mask)
    assert voc.voc_palette()[1].tolist() == [128, 0, 0]
