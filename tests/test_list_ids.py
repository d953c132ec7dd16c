"""List ids are whole lines (issue 30 item 2): every stage reads and writes `<id>.jpg`, `<id>.png`
with the whole id, never the image of a shorter name; a line that is not one id is one error
naming the list file and the line."""
import os

import numpy as np
import pytest

from icd.commands import superpixels
from icd.data.segmentation import SegmentationDataset
from icd.data.superpixels import read_superpixels
from icd.data.voc import read_image, write_image, write_mask


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
