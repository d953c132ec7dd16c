"""Joint image/superpixel transforms, the Gluon datasets and loaders (release, section 5)."""
import os
import shutil

import numpy as np
import pytest
from scipy import ndimage

from icd.constants import NUM_SUPERPIXEL_IDS
from icd.data import transforms as T
from icd.data.classes import read_classes
from icd.data.dataset import InferDataset, infer_loader, train_loader
from icd.data.superpixels import make_superpixels, write_superpixels
from icd.data.synthetic import make_synthetic_voc
from icd.data.voc import read_image


BLOCK = 12
# id -> colour with B = 0 and R, G on a 35-step grid: far from each other and from the grey pad
PALETTE = np.array([(20 + 35 * (i % 7), 20 + 35 * (i // 7), 0) for i in range(49)], np.uint8)


def id_coded_pair(h=60, w=84):
    """Superpixels in BLOCK x BLOCK blocks and an image whose colour tells the block's id."""
    y, x = np.mgrid[0:h, 0:w]
    ids = (y // BLOCK) * (w // BLOCK) + x // BLOCK
    return PALETTE[ids], ids.astype(np.int32)


def decode_colours(image):
    """Original id of every pixel by the nearest palette colour; -1 for the pad grey."""
    colours = np.concatenate([PALETTE, [[T.PAD_VALUE] * 3]]).astype(np.int32)
    distance = np.abs(image.astype(np.int32)[:, :, None, :] - colours).sum(-1)
    decoded = distance.argmin(-1)
    return np.where(decoded == len(PALETTE), -1, decoded)


@pytest.mark.parametrize("size", [48, 100])
def test_train_transform_keeps_image_and_superpixels_aligned(size):
    image, ids = id_coded_pair()
    scales_seen = set()
    for seed in range(16):
        rng = np.random.default_rng(seed)
        out_image, out_ids = T.train_transform(image, ids, size, rng)
        assert out_image.shape == (size, size, 3) and out_image.dtype == np.uint8
        assert out_ids.shape == (size, size) and out_ids.dtype == np.int32
        # relabelled ids are a permutation: exactly 0..k-1 for k distinct ids
        assert np.unique(out_ids).tolist() == list(range(out_ids.max() + 1))
        assert out_ids.max() < NUM_SUPERPIXEL_IDS
        # away from block edges (5x5 uniform in the superpixels, not at the crop's border;
        # cv2's nearest and bilinear grids differ by under a pixel) the colour names the id
        uniform = ndimage.maximum_filter(out_ids, 5) == ndimage.minimum_filter(out_ids, 5)
        uniform[[0, 1, -2, -1]] = uniform[:, [0, 1, -2, -1]] = False
        original = decode_colours(out_image)[uniform]
        new = out_ids[uniform]
        pairs = set(zip(original.tolist(), new.tolist()))
        assert len({o for o, _ in pairs}) == len(pairs) == len({n for _, n in pairs})
        scale = np.random.default_rng(seed).choice(T.SCALES)
        scales_seen.add(float(scale))
        if size == 100 and scale == 1.0:
            assert -1 in original  # the pad shows up and keeps its own id
    assert len(scales_seen) > 2


def test_train_transform_is_seeded():
    image, ids = id_coded_pair()
    a = T.train_transform(image, ids, 48, np.random.default_rng(5))
    b = T.train_transform(image, ids, 48, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_pad_values_and_mirror():
    image = np.full((5, 7, 3), 9, np.uint8)
    ids = np.arange(35, dtype=np.int32).reshape(5, 7) % 10
    padded, padded_ids = T.pad_to(image, ids, 10)
    assert padded.shape == (10, 10, 3) and padded_ids.shape == (10, 10)
    assert (padded[:5, :7] == 9).all() and (padded[5:] == 127).all() and (padded[:, 7:] == 127).all()
    np.testing.assert_array_equal(padded_ids[:5, :7], ids)
    assert (padded_ids[5:] == 10).all() and (padded_ids[:, 7:] == 10).all()  # max id + 1
    flipped, flipped_ids = T.mirror(image, ids)
    np.testing.assert_array_equal(flipped_ids[:, 0], ids[:, -1])


def test_rescale_sizes_and_relabel_permutation():
    image, ids = id_coded_pair(61, 83)
    out, out_ids = T.rescale(image, ids, 0.75)
    assert out.shape[:2] == out_ids.shape == (int(61 * 0.75 + 0.5), int(83 * 0.75 + 0.5))
    assert set(np.unique(out_ids)) <= set(np.unique(ids))  # nearest: no new ids
    sparse = np.array([[3, 7], [9, 3]], np.int32)
    relabelled = T.relabel(sparse, np.random.default_rng(0))
    assert sorted(np.unique(relabelled).tolist()) == [0, 1, 2]
    assert relabelled[0, 0] == relabelled[1, 1] and len({*relabelled.ravel().tolist()}) == 3
    with pytest.raises(ValueError):
        T.relabel(np.arange(NUM_SUPERPIXEL_IDS + 1).reshape(1, -1), np.random.default_rng(0))


def test_infer_transform_top_left_and_centre():
    image, ids = id_coded_pair(20, 30)
    out, out_ids = T.infer_transform(image, ids, 64)
    np.testing.assert_array_equal(out[:20, :30], image)  # small image stays at the top-left
    assert (out[20:] == 127).all() and (out_ids[:, 30:] == ids.max() + 1).all()
    image, ids = id_coded_pair(80, 70)
    out, out_ids = T.infer_transform(image, ids, 64)
    np.testing.assert_array_equal(out, image[8:72, 3:67])
    np.testing.assert_array_equal(out_ids, ids[8:72, 3:67])


# ------------------------------------------------------------------------------------------
# datasets and loaders on a tiny synthetic set
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_synthetic_voc(str(root), num_train=10, num_val=2, size=64, seed=1)
    make_superpixels(str(root / "JPEGImages"), str(root / "ImageSets/Segmentation/train.txt"),
                     str(root / "Superpixels"))
    return root


def voc_classes(root):
    """The synthetic set's own class list (its classes.txt): the loaders require it."""
    return read_classes(str(root / "classes.txt"))


def voc_args(root, data_list="ImageSets/Segmentation/train.txt"):
    return (str(root / "JPEGImages"), str(root / "Superpixels"), str(root / "Annotations"),
            str(root / data_list))


def collect(loader, epochs):
    return [[[x.asnumpy() for x in batch] for batch in loader] for _ in range(epochs)]


def test_train_loader_batches_and_seeding(small_voc):
    serial = train_loader(*voc_args(small_voc), image_size=48, batch_size=4, num_workers=0,
                          seed=3, classes=voc_classes(small_voc))
    assert len(serial) == 2  # 10 images, batch 4: the last partial batch is dropped
    epochs = collect(serial, 2)
    data, superpixels, labels = epochs[0][0]
    assert data.shape == (4, 3, 48, 48) and data.dtype == np.uint8   # cast on the device
    assert superpixels.shape == (4, 48, 48) and superpixels.dtype == np.uint8
    assert labels.shape == (4, 6) and labels.dtype == np.float32   # the set's own 6 classes
    assert 0 <= data.min() and data.max() <= 255 and data.max() > 1
    assert superpixels.min() >= 0 and superpixels.max() < NUM_SUPERPIXEL_IDS
    assert (superpixels == np.round(superpixels)).all()
    assert set(np.unique(labels)) <= {0, 1} and (labels.sum(1) >= 1).all()
    assert not np.array_equal(epochs[0][0][0], epochs[1][0][0])  # reshuffled and re-augmented

    parallel = train_loader(*voc_args(small_voc), image_size=48, batch_size=4, num_workers=2,
                            seed=3, classes=voc_classes(small_voc))
    for serial_epoch, parallel_epoch in zip(epochs, collect(parallel, 2)):
        for a, b in zip(serial_epoch, parallel_epoch):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    serial.set_epoch(1)  # resuming at epoch 1 reproduces it
    for a, b in zip(epochs[1], collect(serial, 1)[0]):
        np.testing.assert_array_equal(a[0], b[0])


def test_infer_loader_pads_list_with_its_head(small_voc):
    dataset = InferDataset(*voc_args(small_voc), image_size=80, batch_size=4)
    assert len(dataset) == 12 and dataset.order == list(range(10)) + [0, 1]
    batches = list(infer_loader(*voc_args(small_voc), image_size=80, batch_size=4,
                                classes=voc_classes(small_voc)))
    assert len(batches) == 3
    data, superpixels, labels, index, hw = (x.asnumpy() for x in batches[2])
    assert data.shape == (4, 3, 80, 80) and superpixels.shape == (4, 80, 80)
    assert index.tolist() == [8, 9, 0, 1]
    for k in range(4):
        h, w = hw[k]
        assert (data[k, :, h:] == 127).all() and (data[k, :, :, w:] == 127).all()
        assert (superpixels[k, h:] == superpixels[k, :h, :w].max() + 1).all()
    tiny = InferDataset(*voc_args(small_voc, "ImageSets/Segmentation/val.txt"), batch_size=4)
    assert tiny.order == [0, 1, 0, 1]  # shorter than a batch: the head repeats cyclically


def test_dataset_bad_input(small_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(small_voc, root)
    name = "train_00000"
    os.remove(root / "Superpixels" / f"{name}.png")
    loader = train_loader(*voc_args(root), image_size=48, batch_size=10, num_workers=0, classes=voc_classes(root))
    with pytest.raises(FileNotFoundError, match=f"{name}.png.*not found"):
        next(iter(loader))
    write_superpixels(str(root / "Superpixels" / f"{name}.png"), np.zeros((5, 5), int))
    with pytest.raises(ValueError, match=f"{name}.png.*5x5 but its image"):
        next(iter(loader))
    image_shape = read_image(str(root / "JPEGImages" / f"{name}.jpg")).shape
    write_superpixels(str(root / "Superpixels" / f"{name}.png"),
                      np.full(image_shape[:2], 64))
    with pytest.raises(ValueError, match=f"{name}.png.*id 64"):
        InferDataset(*voc_args(root))[0]
    (root / "JPEGImages" / f"{name}.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{name}.jpg.*unreadable"):
        next(iter(loader))
    os.remove(root / "JPEGImages" / f"{name}.jpg")
    with pytest.raises(FileNotFoundError, match=f"{name}.jpg.*not found"):
        next(iter(loader))
    os.remove(root / "Annotations" / f"{name}.xml")
    with pytest.raises(FileNotFoundError, match=f"{name}.xml.*not found"):
        train_loader(*voc_args(root), num_workers=0, classes=voc_classes(root))
    (root / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        train_loader(*voc_args(root, "empty.txt"), num_workers=0, classes=voc_classes(root))
    with pytest.raises(ValueError, match="train.txt.*cannot fill one batch"):
        train_loader(*voc_args(small_voc), batch_size=32, num_workers=0,
                     classes=voc_classes(small_voc))
