"""VOC list files (ids are whole lines), XML image labels (release difficult rule), images
(truncated files named), annotations, label PNGs."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from icd.commands import superpixels
from icd.data import voc
from icd.data.segmentation import SegmentationDataset
from icd.data.superpixels import read_superpixels
from icd.data.voc import read_image, write_image, write_mask


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
    assert voc.voc_palette()[1].tolist() == [128, 0, 0]


def test_masks_are_single_channel_index_pngs(tmp_path):
    """release: cv2.imwrite of an (h, w) uint8 array; cv2.imread(p, 0) and PIL read the labels."""
    mask = np.array([[0, 1, 255], [20, 13, 0]], np.uint8)
    path = str(tmp_path / "m.png")
    voc.write_mask(path, mask)
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint8 and raw.shape == (2, 3)   # one channel, 8 bits
    np.testing.assert_array_equal(cv2.imread(path, 0), mask)   # class 13, not a grey level
    with Image.open(path) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.array(im), mask)
    np.testing.assert_array_equal(voc.read_mask(path), mask)
    voc.write_mask(path, mask.astype(np.int64))              # any integer ids 0..255
    np.testing.assert_array_equal(cv2.imread(path, 0), mask)
    assert os.listdir(tmp_path) == ["m.png"]                 # no temporary left behind


def test_write_mask_rejects_what_is_not_a_label_map(tmp_path):
    path = str(tmp_path / "m.png")
    for bad, message in ((np.zeros((2, 3, 3), np.uint8), r"\(H, W\)"),
                         (np.array([[0, 256]]), "0..255"), (np.array([[-1, 0]]), "0..255"),
                         (np.array([[0.5, 1.0]]), "integers")):
        with pytest.raises(ValueError, match=message):
            voc.write_mask(path, bad)
    assert not os.listdir(tmp_path)


def test_read_mask_takes_palette_and_grey_pngs_and_rejects_colour(tmp_path):
    mask = np.array([[0, 1, 255], [20, 13, 0]], np.uint8)
    palette = Image.fromarray(mask, mode="P")
    palette.putpalette(voc.voc_palette().reshape(-1).tolist())
    palette.save(tmp_path / "palette.png")                   # VOC SegmentationClass
    Image.fromarray(mask, mode="L").save(tmp_path / "grey.png")   # SegmentationClassAug
    for name in ("palette.png", "grey.png"):
        np.testing.assert_array_equal(voc.read_mask(str(tmp_path / name)), mask)
    # a palette PNG read as grey gives grey levels of its colours: why we never write them
    assert cv2.imread(str(tmp_path / "palette.png"), 0)[1, 1] != 13
    colour = str(tmp_path / "colour.png")
    cv2.imwrite(colour, voc.voc_palette()[mask][:, :, ::-1])
    with pytest.raises(ValueError, match="colour.png.*palette or single-channel.*RGB"):
        voc.read_mask(colour)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        voc.read_mask(str(tmp_path / "nope.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png.*unreadable"):
        voc.read_mask(str(tmp_path / "broken.png"))


def test_a_list_is_a_set_of_ids_checked_whole(tmp_path):
    """An id is the whole line (a dot is part of it) or the release's image-mask pair; anything a
    stage could not round-trip is one error naming the list file and its line, before any image
    is read."""
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffa\r\n\n/JPEGImages/b.v2.jpg /SegmentationClassAug/b.v2.png\n"
                     "train_00003.flipped\n shot.v2 \nd_é-1\n".encode("utf-8"))
    assert voc.read_list(str(good)) == ["a", "b.v2", "train_00003.flipped", "shot.v2", "d_é-1"]
    not_one = r"is not one image id: an id is the whole line and holds no blanks"
    cases = {
        b"a\n\xff\xfeb\n": r"line 2: not UTF-8 text \(byte 0xff at column 1\)",
        b"a\n# the train split\nb\n": r"line 2: '# the train split' looks like a comment",
        b"a\nmy image.jpg\n": rf"line 2: 'my image.jpg' {not_one}",
        b"a\nmy pic\n": rf"line 2: 'my pic' {not_one}",
        b"a\ntrain_00004 extra\n": rf"line 2: 'train_00004 extra' {not_one}",
        b"a\nc 3 7\n": rf"line 2: 'c 3 7' {not_one}",
        b"a\nb.jpg c.png\n": rf"line 2: 'b.jpg c.png' {not_one}",
        b"a\nx.jpg x.png x.png\n": rf"line 2: 'x.jpg x.png x.png' {not_one}",
        b"a\nx.png x.jpg\n": rf"line 2: 'x.png x.jpg' {not_one}",
        b"a\nb.jpg\n": r"line 2: image name 'b.jpg' ends in a file extension \(.jpg\): a list "
                        r"names image ids, the stages add the extension \(write 'b'\)",
        b"a\n/JPEGImages/b.jpg\n": r"line 2: image name '/JPEGImages/b.jpg' holds the path",
        b"a\nb\x07c\n": r"line 2: holds the control character U\+0007",
        b"a\rb\rc\n": r"line 1: holds the control character U\+000D; save the list with one",
        b"a\nb\\c\n": r"line 2: image name 'b\\\\c' holds the path separator",
        b"a\n..\n": r"line 2: image name '..' starts with '.'",
        b"a\n.b.abcdefgh.tmp.jpg\n": r"line 2: image name '.b.abcdefgh.tmp.jpg' starts with '.'",
        b"a\nzero\xe2\x80\x8bwidth\n": r"line 2: image name .* U\+200B",
        b"a\nb\nJPEGImages/a.jpg SegmentationClass/a.png\n":
            r"line 3: image 'a' is listed again \(first on line 1\)",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.txt"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"^{path}: {message}"):
            voc.read_list(str(path))


def test_an_exif_turned_image_and_its_unturned_mask_are_named(tmp_path):
    """cv2.imread (the release's reader) applies the EXIF orientation, a mask is not turned: the
    mismatch names the image and its orientation."""
    path = str(tmp_path / "x.jpg")
    exif = Image.Exif()
    exif[voc.EXIF_ORIENTATION] = 6   # turned by 90 degrees
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path, exif=exif.tobytes())
    image = voc.read_image(path)
    assert image.shape == (40, 30, 3) and voc.exif_orientation(path) == 6
    with pytest.raises(ValueError, match=rf"^{path}: its EXIF orientation 6 makes OpenCV .* "
                                         rf"read it turned, as 30x40 \(W x H\), but its label map "
                                         rf"m.png is 40x30"):
        voc.check_exif_turn(path, image.shape, "m.png", (30, 40), "label map")
    voc.check_exif_turn(path, image.shape, "m.png", (40, 30), "label map")   # as read: fine
    # where an image and its label map are read together (DeepLab's training data)
    voc.write_mask(str(tmp_path / "x.png"), np.zeros((30, 40), np.uint8))
    (tmp_path / "list.txt").write_text("x\n")
    dataset = SegmentationDataset(str(tmp_path), str(tmp_path), str(tmp_path / "list.txt"))
    with pytest.raises(ValueError, match=rf"^{path}: its EXIF orientation 6 .* label map "
                                         rf"{tmp_path / 'x.png'} is 40x30"):
        dataset.load(0)
    plain = str(tmp_path / "y.jpg")
    cv2.imwrite(plain, np.zeros((30, 40, 3), np.uint8))
    voc.check_exif_turn(plain, (30, 40, 3), "m.png", (20, 40), "label map")  # the caller's check


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
# List ids are whole lines: every stage reads and writes `<id>.jpg`, `<id>.png` with the whole id

def two_images(root):
    """`train_00003.jpg` and `train_00003.flipped.jpg`: different images of different sizes."""
    rng = np.random.default_rng(0)
    plain = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    flipped = np.ascontiguousarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    write_image(os.path.join(root, "train_00003.jpg"), plain)
    write_image(os.path.join(root, "train_00003.flipped.jpg"), flipped)
    write_image(os.path.join(root, "shot.v2.jpg"), flipped[:16])
    return plain, flipped


def test_a_dotted_id_reads_and_writes_its_own_files(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    two_images(str(images))
    data_list = tmp_path / "list.txt"
    data_list.write_text("train_00003.flipped\nshot.v2\n")
    out = tmp_path / "superpixels"
    assert superpixels.main(["--image-root", str(images), "--data-list", str(data_list),
                             "--out", str(out), "--features", "colour"]) == 0
    assert sorted(os.listdir(out)) == ["shot.v2.png", "train_00003.flipped.png"]
    assert read_superpixels(str(out / "train_00003.flipped.png")).shape == (20, 28)
    assert read_superpixels(str(out / "shot.v2.png")).shape == (16, 28)
    # a reader of images and masks (DeepLab's training data) takes the same whole ids
    masks = tmp_path / "masks"
    write_mask(str(masks / "train_00003.flipped.png"), np.ones((20, 28), np.uint8))
    write_mask(str(masks / "shot.v2.png"), np.ones((16, 28), np.uint8))
    dataset = SegmentationDataset(str(images), str(masks), str(data_list))
    assert dataset.names == ["train_00003.flipped", "shot.v2"]
    image, label = dataset.load(0)[:2]
    np.testing.assert_array_equal(image, read_image(str(images / "train_00003.flipped.jpg")))


def test_a_line_of_two_words_is_an_error_naming_the_line(tmp_path, capsys):
    """`train_00004 extra` does not read `train_00004.jpg`, even where a file
    `train_00004 extra.jpg` exists: the stages cannot name files with blanks."""
    images = tmp_path / "images"
    images.mkdir()
    plain, _ = two_images(str(images))
    write_image(str(images / "train_00004.jpg"), plain)
    write_image(str(images / "train_00004 extra.jpg"), plain)
    data_list = tmp_path / "list.txt"
    data_list.write_text("train_00003\ntrain_00004 extra\n")
    out = tmp_path / "superpixels"
    assert superpixels.main(["--image-root", str(images), "--data-list", str(data_list),
                             "--out", str(out), "--features", "colour"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data_list}: line 2: 'train_00004 extra' is not one image id: an id "
                   f"is the whole line and holds no blanks (the stages name files <id>.jpg, "
                   f"<id>.png), and the one line of two words is the release's pair "
                   f"'JPEGImages/<id>.jpg SegmentationClass/<id>.png'"]
    assert not out.exists()
