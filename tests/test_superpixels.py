"""Superpixel PNG encoding, the greedy merge against a straightforward reference, the driver."""
import math
import os

import numpy as np
import pytest

from icd.data import superpixels as sp
from icd.data.features import colour_position_features
from icd.data.voc import write_image


def reference_merge(features, sizes, max_regions):
    """Straightforward greedy merge: recompute every pair's similarity in Python each iteration.

    Rule of icd.data.superpixels: sim = cos + 1 - (s_i + s_j) / hw over all pairs; first maximum
    over (i < j) in row-major order; the smaller id survives with the size-weighted mean feature;
    survivors renumbered in increasing order. Returns the final id of every initial region.
    """
    n = len(sizes)
    feats = {i: [float(x) for x in f] for i, f in enumerate(features)}
    size = {i: float(s) for i, s in enumerate(sizes)}
    total = float(np.sum(np.asarray(sizes, np.float64)))
    owner = list(range(n))
    while len(feats) > max_regions:
        ids = sorted(feats)
        best = None
        for a, i in enumerate(ids):
            for j in ids[a + 1:]:
                dot = sum(x * y for x, y in zip(feats[i], feats[j]))
                norm_i = math.sqrt(sum(x * x for x in feats[i]))
                norm_j = math.sqrt(sum(x * x for x in feats[j]))
                sim = dot / max(norm_i * norm_j, 1e-12) + 1 - (size[i] + size[j]) / total
                if best is None or sim > best[0]:
                    best = (sim, i, j)
        _, i, j = best
        merged = size[i] + size[j]
        feats[i] = [(size[i] * x + size[j] * y) / merged for x, y in zip(feats[i], feats[j])]
        size[i] = merged
        del feats[j], size[j]
        owner = [i if o == j else o for o in owner]
    rank = {r: k for k, r in enumerate(sorted(feats))}
    return np.array([rank[o] for o in owner])


def check_merge(features, sizes, max_regions):
    expected = reference_merge(features, sizes, max_regions)
    for incremental in (True, False):
        got = sp.greedy_merge(np.asarray(features), np.asarray(sizes), max_regions,
                              incremental=incremental)
        np.testing.assert_array_equal(got, expected)
    return expected


@pytest.mark.parametrize("seed", range(6))
def test_merge_matches_reference_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 36))
    features = rng.normal(size=(n, int(rng.integers(2, 9))))
    if seed % 2:
        features = np.maximum(features, 0)  # ReLU-like, some all-zero rows
    sizes = rng.integers(1, 500, n)
    max_regions = int(rng.integers(3, 12))
    result = check_merge(features, sizes, max_regions)
    assert np.unique(result).tolist() == list(range(max_regions))


def test_merge_ties_take_first_pair_and_keep_smaller_id():
    # equal features and sizes: every pair ties, so (0, 1) merges first into 0; the size term
    # then makes pairs of singletons the most similar: (2, 3) into 2, then (4, 5) into 4
    result = check_merge(np.ones((6, 3)), np.full(6, 10), 3)
    assert result.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("seed", range(4))
def test_merge_matches_reference_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n = 24
    # few distinct integer directions and sizes from a small set: many exact ties
    features = rng.integers(0, 3, size=(n, 3)).astype(float)
    sizes = rng.choice([4, 8, 16], size=n)
    check_merge(features, sizes, 5)


def test_merge_no_op_and_zero_features():
    features = np.zeros((5, 4))
    assert sp.greedy_merge(features, np.ones(5), 64).tolist() == [0, 1, 2, 3, 4]
    check_merge(features, np.arange(1, 6), 2)


def test_png_id_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1 << 24, size=(7, 9))
    ids[0, :4] = [0, 255, 256, 65537]
    encoded = sp.encode_ids(ids)
    assert encoded.dtype == np.uint8 and encoded.shape == (7, 9, 3)
    assert encoded[0, 3].tolist() == [1, 0, 1]  # B, G, R of 65537 = 1 + 65536
    np.testing.assert_array_equal(sp.decode_ids(encoded), ids)
    path = str(tmp_path / "a.png")
    sp.write_superpixels(path, ids)
    np.testing.assert_array_equal(sp.read_superpixels(path, expected_shape=(7, 9, 3)), ids)
    assert os.listdir(tmp_path) == ["a.png"]  # no temporary left behind
    with pytest.raises(ValueError):
        sp.encode_ids(np.array([[1 << 24]]))


def test_read_superpixels_bad_input(tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        sp.read_superpixels(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png.*unreadable"):
        sp.read_superpixels(str(broken))
    path = str(tmp_path / "small.png")
    sp.write_superpixels(path, np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="small.png.*4x5.*6x5"):
        sp.read_superpixels(path, expected_shape=(6, 5, 3))


def test_compute_superpixels_bounds():
    rng = np.random.default_rng(1)
    image = (rng.random((60, 80, 3)) * 255).astype(np.uint8)  # noise: many initial regions
    features = colour_position_features(image)
    assert features.shape == (60, 80, 5) and features.dtype == np.float32
    ids = sp.compute_superpixels(image, features, max_regions=8)
    assert ids.shape == (60, 80) and ids.dtype == np.int32
    assert np.unique(ids).tolist() == list(range(ids.max() + 1)) and ids.max() < 8
    with pytest.raises(ValueError):
        sp.compute_superpixels(image, features[:10])


@pytest.fixture
def small_images(tmp_path):
    rng = np.random.default_rng(2)
    names = ["a", "b", "c"]
    for name in names:
        write_image(str(tmp_path / "img" / f"{name}.jpg"),
                    (rng.random((40, 50, 3)) * 255).astype(np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{n}\n" for n in names))
    return tmp_path


def test_make_superpixels_resumes_and_workers_agree(small_images):
    root = small_images
    args = (str(root / "img"), str(root / "list.txt"))
    written = sp.make_superpixels(*args, str(root / "sp0"))
    assert len(written) == 3
    first = {p: sp.read_superpixels(p, (40, 50)) for p in written}
    assert all(ids.max() < sp.MAX_REGIONS for ids in first.values())
    assert sp.make_superpixels(*args, str(root / "sp0")) == []  # existing PNGs are skipped
    assert len(sp.make_superpixels(*args, str(root / "sp0"), overwrite=True)) == 3
    parallel = sp.make_superpixels(*args, str(root / "sp2"), workers=2)
    for p in parallel:
        np.testing.assert_array_equal(sp.read_superpixels(p), first[p.replace("sp2", "sp0")])
    assert not [f for f in os.listdir(root / "sp2") if f.startswith(".")]


def test_make_superpixels_bad_input(small_images):
    root = small_images
    (root / "list.txt").write_text("a\nnope\n")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        sp.make_superpixels(str(root / "img"), str(root / "list.txt"), str(root / "sp"))
    assert not (root / "sp" / "nope.png").exists()
    (root / "img" / "bad.jpg").write_bytes(b"garbage")
    (root / "list.txt").write_text("bad\n")
    with pytest.raises(ValueError, match="bad.jpg.*unreadable"):
        sp.make_superpixels(str(root / "img"), str(root / "list.txt"), str(root / "sp"))
    (root / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        sp.make_superpixels(str(root / "img"), str(root / "empty.txt"), str(root / "sp"))
