"""Superpixel PNG encoding, Felzenszwalb and the greedy merge against straightforward
references, the driver."""
import math
import os

import cv2
import numpy as np
import pytest
import skimage.data
from skimage.segmentation import felzenszwalb

from icd.commands import superpixels
from icd.data import superpixels as sp
from icd.data.superpixels import colour_position_features
from icd.data.voc import read_image


F32 = np.float32


def reference_smooth(image, sigma):
    """Step 1 of docs/release.md section 11 in explicit float32 loops.

    Taps exp(-0.5 (i / sigma)^2), i = 0..ceil(4 sigma) (i / sigma and its square in float32, the
    exponential in double), normalised by 2 sum_{i>=1} m[i] + m[0]; along x then y, the border
    pixel repeated. Returns the three smoothed channels as (H, W) float32 arrays.
    """
    h, w, _ = image.shape
    sigma = F32(max(sigma, 0.01))
    length = int(math.ceil(float(sigma) * 4.0)) + 1
    taps = []
    for i in range(length):
        t = F32(i) / sigma
        taps.append(F32(math.exp(-0.5 * float(t * t))))
    total = F32(0)
    for i in range(1, length):
        total = total + taps[i]
    total = F32(2) * total + taps[0]
    taps = [tap / total for tap in taps]

    def smooth(line):
        n = len(line)
        out = []
        for x in range(n):
            acc = taps[0] * line[x]
            for i in range(1, length):
                acc = acc + taps[i] * (line[max(x - i, 0)] + line[min(x + i, n - 1)])
            out.append(acc)
        return out

    channels = []
    for k in range(3):
        rows = [smooth([F32(image[y, x, k]) for x in range(w)]) for y in range(h)]   # along x
        cols = [smooth([rows[y][x] for y in range(h)]) for x in range(w)]           # along y
        channels.append(np.array(cols, np.float32).T)
    return channels


def reference_edges(image, sigma):
    """Steps 1-2: (weight, a, b) to the right, down, down-right and up-right neighbour of every
    pixel in raster order, weight = float32 Euclidean distance of the smoothed channels."""
    h, w, _ = image.shape
    smoothed = reference_smooth(image, sigma)

    def weight(y0, x0, y1, x1):
        d = [smoothed[k][y0, x0] - smoothed[k][y1, x1] for k in range(3)]
        return np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])

    edges = []
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (1, 0), (1, 1), (-1, 1)):
                if 0 <= y + dy < h and x + dx < w:
                    edges.append((weight(y, x, y + dy, x + dx), y * w + x, (y + dy) * w + x + dx))
    return edges


def reference_felzenszwalb(image, sigma, c, min_size, reverse_ties=False):
    """Felzenszwalb as docs/release.md section 11 states it, in explicit float32 loops.

    image: (H, W, 3) uint8 (channels in the order given). Equal-weight edges keep raster order
    (a stable sort), or reversed raster order with reverse_ties. Returns ids 1..n numbered in
    raster order of first occurrence.
    """
    h, w, _ = image.shape
    edges = reference_edges(image, sigma)
    # 3. a stable sort by weight, then union-find with threshold c / |C|
    edges = sorted(edges[::-1] if reverse_ties else edges, key=lambda e: e[0])
    parent = list(range(h * w))
    size = [1] * (h * w)
    threshold = [F32(c)] * (h * w)

    def find(p):
        while parent[p] != p:
            p = parent[p]
        return p

    def join(a, b):
        parent[b] = a
        size[a] += size[b]

    for weight_ab, p, q in edges:
        a, b = find(p), find(q)
        if a != b and weight_ab <= threshold[a] and weight_ab <= threshold[b]:
            join(a, b)
            threshold[a] = weight_ab + F32(c) / F32(size[a])
    # 4. small components
    for _, p, q in edges:
        a, b = find(p), find(q)
        if a != b and (size[a] < min_size or size[b] < min_size):
            join(a, b)
    # 5. ids from 1 in raster order of first occurrence
    ids, out = {}, np.zeros((h, w), np.int32)
    for p in range(h * w):
        out[p // w, p % w] = ids.setdefault(find(p), len(ids) + 1)
    return out


def blocks_image(rng, h, w, block):
    """Flat blocks of a few colours: many exactly equal edge weights (ties)."""
    colours = rng.choice([0, 60, 200], size=(-(-h // block), -(-w // block), 3)).astype(np.uint8)
    return np.repeat(np.repeat(colours, block, 0), block, 1)[:h, :w]


def photo_crop(h, w):
    return cv2.resize(skimage.data.astronaut()[40:240, 140:340], (w, h),
                      interpolation=cv2.INTER_AREA)[:, :, ::-1].copy()


FELZENSZWALB_CASES = {  # name: (image, sigma, c, min_size)
    "noise": (lambda rng: rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), 0.8, 75, 4),
    "noise_release_settings": (lambda rng: rng.integers(0, 256, (24, 30, 3), dtype=np.uint8),
                               0.8, 75, 75),
    "blocks": (lambda rng: blocks_image(rng, 30, 40, 10), 0.8, 75, 75),
    "blocks_small_c": (lambda rng: blocks_image(rng, 15, 17, 5), 0.5, 10, 1),
    "flat": (lambda rng: np.full((8, 10, 3), 77, np.uint8), 0.8, 75, 75),
    "photo": (lambda rng: photo_crop(24, 32), 0.8, 75, 20),
    "photo_large_sigma": (lambda rng: photo_crop(20, 18), 2.0, 50, 10),
}


@pytest.mark.parametrize("case", sorted(FELZENSZWALB_CASES))
def test_felzenszwalb_matches_reference(case):
    make, sigma, c, min_size = FELZENSZWALB_CASES[case]
    image = make(np.random.default_rng(7))
    expected = reference_felzenszwalb(image, sigma, c, min_size)
    # the case is valid only if the order of equal-weight edges does not matter here (first-pass
    # ties never do; the second pass has none that compete), so any tie order must agree
    np.testing.assert_array_equal(
        reference_felzenszwalb(image, sigma, c, min_size, reverse_ties=True), expected)
    np.testing.assert_array_equal(sp.felzenszwalb(image, sigma, c, min_size), expected)


def test_second_pass_ties_can_change_the_partition():
    """Why the cases above avoid competing ties in the second pass: stripes A | B | A' of 50, 50
    and 100 pixels, unsmoothed (sigma 0.01: taps 1, 0), with equal-weight A-B and B-A' edges.
    In raster order B (50 < min_size) joins A and the 100-pixel parts stay apart; in reverse
    order B joins A' and then A joins them. Ours follows std::sort's order: one of the two."""
    image = np.zeros((5, 40, 3), np.uint8)
    image[:, 10:20] = 200
    stable = reference_felzenszwalb(image, 0.01, 1, 75)
    reverse = reference_felzenszwalb(image, 0.01, 1, 75, reverse_ties=True)
    assert stable.max() == 2 and reverse.max() == 1
    ours = sp.felzenszwalb(image, 0.01, 1, 75)
    assert np.array_equal(ours, stable) or np.array_equal(ours, reverse)


def first_occurrence_ids(labels):
    """Labels renumbered 1..n in raster order of first occurrence: equal iff same partition."""
    _, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(1, len(first) + 1)
    return rank[inverse].reshape(labels.shape)


def test_felzenszwalb_graph_agrees_with_scikit_image_on_the_same_smoothing():
    """Independent check of steps 2-4: scikit-image's graph algorithm, given our smoothed image
    (its own smoothing off), makes the same partition; on the raw image it does not."""
    image = photo_crop(60, 80)
    smoothed = np.stack(reference_smooth(image, sp.FELZENSZWALB_SIGMA), axis=-1)
    ours = sp.felzenszwalb(image)
    theirs = felzenszwalb(smoothed.astype(np.float64) / 255, scale=sp.FELZENSZWALB_SCALE,
                          sigma=0, min_size=sp.FELZENSZWALB_MIN_SIZE)
    np.testing.assert_array_equal(first_occurrence_ids(theirs), ours)
    plain = felzenszwalb(image, scale=sp.FELZENSZWALB_SCALE, sigma=sp.FELZENSZWALB_SIGMA,
                         min_size=sp.FELZENSZWALB_MIN_SIZE)
    assert not np.array_equal(first_occurrence_ids(plain), ours)


def test_felzenszwalb_cases_have_ties_and_regions():
    """The fixtures exercise what they claim: equal weights, several regions of min_size."""
    rng = np.random.default_rng(7)
    for case in ("blocks", "blocks_small_c", "flat"):
        weights = [e[0] for e in reference_edges(FELZENSZWALB_CASES[case][0](rng),
                                                 FELZENSZWALB_CASES[case][1])]
        assert len(set(weights)) < 0.75 * len(weights), case
    for case in ("noise", "noise_release_settings", "blocks", "blocks_small_c", "photo",
                 "photo_large_sigma"):
        make, sigma, c, min_size = FELZENSZWALB_CASES[case]
        ids = sp.felzenszwalb(make(np.random.default_rng(7)), sigma, c, min_size)
        assert ids.min() == 1 and ids.max() > 2, case
        assert np.bincount(ids.ravel())[1:].min() >= min_size, case


def test_initial_regions_segment_the_opencv_channel_order():
    rgb = photo_crop(30, 40)[:, :, ::-1]
    ids = sp.initial_regions(rgb)
    assert ids.dtype == np.int32 and ids.min() == 0
    np.testing.assert_array_equal(ids + 1, reference_felzenszwalb(
        np.ascontiguousarray(rgb[:, :, ::-1]), sp.FELZENSZWALB_SIGMA, sp.FELZENSZWALB_SCALE,
        sp.FELZENSZWALB_MIN_SIZE))


def test_felzenszwalb_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        sp.felzenszwalb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        sp.felzenszwalb(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="1 and"):
        sp.felzenszwalb(np.zeros((0, 4, 3), np.uint8))


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


@pytest.mark.parametrize("seed", range(3))
def test_merge_with_row_maxima_equals_the_whole_matrix_per_merge(seed):
    """Hundreds of regions, half of them with exact ties: keeping each row's first maximum gives
    the merges that an argmax over the whole recomputed matrix gives (the rule's definition)."""
    rng = np.random.default_rng(200 + seed)
    n = 300
    features = rng.normal(size=(n, 6)) if seed == 0 else \
        rng.integers(0, 3, size=(n, 4)).astype(float)   # few directions: many ties
    sizes = rng.integers(1, 2000, n) if seed < 2 else rng.choice([5, 10], n)
    fast = sp.greedy_merge(features, sizes, incremental=True)
    np.testing.assert_array_equal(fast, sp.greedy_merge(features, sizes, incremental=False))
    assert np.unique(fast).tolist() == list(range(sp.MAX_REGIONS))


def test_an_image_above_max_pixels_is_refused_by_name_or_downscaled(small_images, capsys):
    """Felzenszwalb's graph and the merge's matrix grow with pixels: an image above --max-pixels
    is an error naming it and the flag that resizes it; --downscale segments a smaller copy and
    writes a map of the image's own size."""
    root = small_images
    (root / "list.txt").write_text("a\n")
    flags = ["--image-root", str(root / "img"), "--data-list", str(root / "list.txt"),
             "--features", "colour"]
    assert superpixels.main(flags + ["--out", str(root / "sp"), "--max-pixels", "1999"]) == 1
    err = capsys.readouterr().err
    assert (f"error: {root / 'img' / 'a.jpg'}: 50x40 is 2000 pixels, above the --max-pixels "
            f"limit 1999; give --downscale") in err, err
    assert not (root / "sp" / "a.png").exists()
    assert superpixels.main(flags + ["--out", str(root / "sp"), "--max-pixels", "500",
                                     "--downscale"]) == 0
    ids = sp.read_superpixels(str(root / "sp" / "a.png"), (40, 50))
    # a 25x20 copy, mapped back by nearest neighbour: every 2x2 block holds one id
    np.testing.assert_array_equal(ids, np.repeat(np.repeat(ids[::2, ::2], 2, 0), 2, 1))
    assert 1 < ids.max() + 1 <= sp.MAX_REGIONS
    # at the default limit the same image is the release's computation
    assert superpixels.main(flags + ["--out", str(root / "full")]) == 0
    expected = sp.compute_superpixels(read_image(str(root / "img" / "a.jpg")),
                                      colour_position_features(
                                          read_image(str(root / "img" / "a.jpg"))))
    np.testing.assert_array_equal(sp.read_superpixels(str(root / "full" / "a.png")), expected)
