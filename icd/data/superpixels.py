"""Superpixels: Felzenszwalb regions greedily merged to at most 64, stored as id-encoded PNGs.

File format (release, section 1): one 3-channel PNG per image, read by OpenCV as BGR; the region
id of a pixel is ``B + 256*G + 65536*R``. Ids are 0..n-1 with n <= MAX_REGIONS (section 8).

Fixed id bound: the training crop pads with ``max id + 1`` and then relabels the ids present by a
random permutation of 0..k-1 (section 5); with at most MAX_REGIONS regions plus the pad id, every
id that reaches the model is < NUM_SUPERPIXEL_IDS = MAX_REGIONS + 1. The model's superpixel
operator one-hot encodes ids with this fixed bound.

Initial regions (release, section 11): Felzenszwalb's graph segmentation with sigma 0.8, c 75,
min size 75, computed as the original C++ code does (our C++ extension `_felzenszwalb`):
  1. each channel of the uint8 image as OpenCV decodes it (BGR), as float32, is smoothed along x
     then y by the taps m[i] = exp(-0.5 (i / sigma)^2), i = 0..ceil(4 sigma), divided by
     2 sum_{i>=1} m[i] + m[0]; the border pixel is repeated; all in float32;
  2. edges from each pixel in raster order to its right, down, down-right and up-right
     neighbours, weight = float32 Euclidean distance of the smoothed (B, G, R);
  3. edges sorted by weight with std::sort; an edge joins components a != b when its weight is
     <= the threshold of both, threshold(C) = c / |C| at first and w + c / |C| after a join;
  4. a second pass over the sorted edges joins a != b when either has fewer than min_size pixels;
  5. ids in raster order of first occurrence (the release's ids 1..n, ours 0..n-1).
Tie rule: equal-weight edges are visited in the order libstdc++'s std::sort (unstable) leaves
them, starting from raster order, as in the release. The order of ties cannot change the first
pass's partition (a component joined at weight w has threshold >= w); it can change the second's.

Merge (release, section 8), defined precisely so that it is reproducible:
  - initial regions are the Felzenszwalb ids 0..n-1 above (raster order of first occurrence);
  - region feature f_i = mean feature over its pixels, size s_i = pixel count, hw = image area;
  - sim(i, j) = cos(f_i, f_j) + 1 - (s_i + s_j) / hw for ANY pair i < j (no adjacency), with
    cos(a, b) = a.b / max(|a| |b|, 1e-12) (a zero feature has cosine 0 with everything);
  - while more than MAX_REGIONS regions remain, merge the most similar pair; ties go to the first
    maximum of the upper triangle in row-major order (smallest i, then smallest j);
  - the merged region keeps the smaller id i: f_i = (s_i f_i + s_j f_j) / (s_i + s_j),
    s_i = s_i + s_j, and j disappears;
  - final ids are the surviving ids renumbered 0..m-1 in increasing order (np.unique order).
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import scipy.sparse
from skimage.color import rgb2lab

from ..devices import shard_names
from ..constants import MAX_REGIONS
from ..io import atomic_path
from ..pool import map_images
from .voc import read_image, read_list

try:
    from . import _felzenszwalb
except ImportError as e:
    raise ImportError("icd.data._felzenszwalb, the compiled Felzenszwalb, is not built: run "
                      "`pip install -e .` (or `python setup.py build_ext --inplace`) in the "
                      "repository") from e


# release: Felzenszwalb with k 75, sigma 0.8, min size 75 (section 8)
FELZENSZWALB_SCALE = 75
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_MIN_SIZE = 75

_COSINE_EPS = 1e-12

# Above this many pixels an image is refused (or, with downscale, segmented on a smaller copy):
# Felzenszwalb keeps 4 edges of 12 bytes per pixel, the merge an (n, n) float64 matrix of the
# n initial regions (~1 per 1000-1500 pixels of a photo: 4 Mpx -> ~3500 regions, 100 MB).
FeatureFn = Callable[[np.ndarray], np.ndarray]
"""(H, W, 3) uint8 RGB image -> (H, W, D) float32 per-pixel features."""
MAX_PIXELS = 1 << 22   # 4,194,304: 2048x2048, VOC's and COCO's images are < 0.33 M


# ----------------------------------------------------------------------------------------------
# PNG id encoding
# ----------------------------------------------------------------------------------------------
def encode_ids(ids: np.ndarray) -> np.ndarray:
    """(H, W) non-negative int ids < 2**24 -> (H, W, 3) uint8 BGR with id = B + 256 G + 65536 R."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"superpixel ids must be (H, W), got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError(f"superpixel ids must lie in [0, 2**24), got {ids.min()}..{ids.max()}")
    ids = ids.astype(np.int64)
    # release: B is the low byte, R the high byte (section 1)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def decode_ids(bgr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> (H, W) int32 ids = B + 256 G + 65536 R (release, section 1)."""
    bgr = np.asarray(bgr)
    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"encoded superpixels must be (H, W, 3), got shape {bgr.shape}")
    bgr = bgr.astype(np.int32)
    return bgr[:, :, 0] + (bgr[:, :, 1] << 8) + (bgr[:, :, 2] << 16)


def write_superpixels(path: str, ids: np.ndarray) -> None:
    """Write (H, W) ids as an id-encoded PNG, atomically."""
    encoded = encode_ids(ids)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, encoded):
            raise ValueError(f"{path}: OpenCV could not write the superpixel PNG")


def read_superpixels(path: str, expected_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Read an id-encoded PNG as (H, W) int32 ids.

    `expected_shape` is the (H, W[, C]) shape of the image the map belongs to; a map of another
    size is an error (it would silently misalign the refinement).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: superpixel map not found")
    bgr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if bgr is None:
        raise ValueError(f"{path}: unreadable superpixel map (OpenCV could not decode it)")
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ValueError(f"{path}: superpixel map must be a 3-channel 8-bit PNG, "
                         f"got shape {bgr.shape} dtype {bgr.dtype}")
    ids = decode_ids(bgr)
    if expected_shape is not None and ids.shape != tuple(expected_shape[:2]):
        raise ValueError(f"{path}: superpixel map is {ids.shape[0]}x{ids.shape[1]} but its image "
                         f"is {expected_shape[0]}x{expected_shape[1]} (H x W)")
    return ids


# ----------------------------------------------------------------------------------------------
# Greedy merge (release, section 8)
# ----------------------------------------------------------------------------------------------
def region_means(labels: np.ndarray, features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean feature and size of each region.

    labels: (H, W) int ids 0..n-1; features: (H, W, D).
    Returns (n, D) float64 mean features and (n,) int64 sizes.
    """
    n = int(labels.max()) + 1
    flat = labels.reshape(-1)
    sizes = np.bincount(flat, minlength=n).astype(np.int64)
    membership = scipy.sparse.csr_matrix(
        (np.ones(flat.size, np.float32), (flat, np.arange(flat.size))), shape=(n, flat.size))
    sums = membership @ np.asarray(features, np.float32).reshape(flat.size, -1)
    return sums.astype(np.float64) / np.maximum(sizes, 1)[:, None], sizes


def _similarity(features: np.ndarray, norms: np.ndarray, sizes: np.ndarray, total: float,
                i: int) -> np.ndarray:
    """sim(i, k) for every region k: cos(f_i, f_k) + 1 - (s_i + s_k) / hw. Shape (n,)."""
    cosine = (features @ features[i]) / np.maximum(norms * norms[i], _COSINE_EPS)
    return cosine + 1 - (sizes + sizes[i]) / total


def _similarity_matrix(features: np.ndarray, norms: np.ndarray, sizes: np.ndarray,
                       total: float, alive: np.ndarray) -> np.ndarray:
    """(n, n) similarities on the strict upper triangle of alive pairs, -inf elsewhere."""
    cosine = (features @ features.T) / np.maximum(np.outer(norms, norms), _COSINE_EPS)
    sim = cosine + 1 - (sizes[:, None] + sizes[None, :]) / total
    valid = np.triu(np.outer(alive, alive), k=1)
    return np.where(valid, sim, -np.inf)


def greedy_merge(features: np.ndarray, sizes: np.ndarray, max_regions: int = MAX_REGIONS,
                 incremental: bool = True) -> np.ndarray:
    """Merge regions greedily until at most `max_regions` remain (module docstring's rule).

    features: (n, D) mean features; sizes: (n,) pixel counts (their sum is the image area).
    Returns (n,) int32: the final id 0..m-1 of every initial region.

    incremental=True keeps the (n, n) similarity matrix and, for every row k, its first maximum
    (best[k], partner[k]): the first maximum of the matrix in row-major order is the first maximum
    of the row maxima. A merge of j into i recomputes only row and column i (one (n, D) product)
    and the maxima of the rows whose best pair was with j, or with i and got worse: O(n) per merge
    and row, where an argmax over the whole matrix per merge made the merge O(n^3) (47 s for the
    2400 regions of a noisy 2000x1500 photo, ~1 h for 10^4). Memory stays O(n^2) (`MAX_PIXELS`
    bounds n). incremental=False recomputes the whole matrix per merge (the straightforward
    algorithm, kept as the baseline of tools/bench_superpixels.py).
    """
    features = np.array(features, np.float64)
    sizes = np.array(sizes, np.float64)
    n = len(sizes)
    total = float(sizes.sum())
    norms = np.sqrt(np.einsum("nd,nd->n", features, features))
    alive = np.ones(n, bool)
    parent = np.arange(n)  # initial region -> surviving id it was merged into
    sim = _similarity_matrix(features, norms, sizes, total, alive)
    partner = np.argmax(sim, axis=1)
    best = sim[np.arange(n), partner]
    for _ in range(n - max_regions):
        i = int(np.argmax(best))  # first maximum in row-major order, i < j
        j = int(partner[i])
        merged = sizes[i] + sizes[j]
        features[i] = (sizes[i] * features[i] + sizes[j] * features[j]) / merged
        sizes[i] = merged
        norms[i] = np.sqrt(features[i] @ features[i])
        alive[j] = False
        parent[parent == j] = i  # the merged region keeps the smaller id
        if incremental:
            sim[j, :] = -np.inf
            sim[:, j] = -np.inf
            row = np.where(alive, _similarity(features, norms, sizes, total, i), -np.inf)
            sim[:i, i] = row[:i]
            sim[i, i + 1:] = row[i + 1:]
            # rows k < i: their pair with i changed; it is their new best when at least as good
            # as the old one (on a tie: when the old partner is i itself or comes after i)
            take = alive[:i] & ((row[:i] > best[:i]) |
                                ((row[:i] == best[:i]) & (partner[:i] >= i)))
            best[:i][take], partner[:i][take] = row[:i][take], i
            stale = (partner == j) | (partner == i)
            stale[:i] &= ~take
            stale[i] = True
            stale = np.flatnonzero(stale & alive)
        else:
            sim = _similarity_matrix(features, norms, sizes, total, alive)
            stale = np.arange(n)
        partner[stale] = np.argmax(sim[stale], axis=1)
        best[stale] = sim[stale, partner[stale]]
        best[j] = -np.inf
    return np.unique(parent, return_inverse=True)[1].astype(np.int32)


def felzenszwalb(image_bgr: np.ndarray, sigma: float = FELZENSZWALB_SIGMA,
                 c: float = FELZENSZWALB_SCALE, min_size: int = FELZENSZWALB_MIN_SIZE
                 ) -> np.ndarray:
    """The release's Felzenszwalb segmentation (module docstring, steps 1-5).

    image_bgr: (H, W, 3) uint8 in OpenCV's channel order. Returns (H, W) int32 ids 1..n in
    raster order of first occurrence, exactly as the release's `segment(image, out, sigma, c,
    min_size)`.
    """
    image_bgr = np.asarray(image_bgr)
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"Felzenszwalb needs an (H, W, 3) uint8 image, got shape "
                         f"{image_bgr.shape} dtype {image_bgr.dtype}")
    ids = np.empty(image_bgr.shape[:2], np.int32)
    _felzenszwalb.segment(np.ascontiguousarray(image_bgr), ids, sigma, c, min_size)
    return ids


def initial_regions(image: np.ndarray) -> np.ndarray:
    """Felzenszwalb regions of an (H, W, 3) uint8 RGB image as (H, W) int32 ids 0..n-1.

    release: segmented as OpenCV decodes the image (BGR); ids in raster order of first occurrence.
    """
    return felzenszwalb(np.asarray(image)[:, :, ::-1]) - 1


def compute_superpixels(image: np.ndarray, features,
                        max_regions: int = MAX_REGIONS) -> np.ndarray:
    """Superpixels of one image: Felzenszwalb then the greedy merge.

    image: (H, W, 3) uint8 RGB; features: (H, W, D) per-pixel features of that image, or a
    feature source with `region_means(image, labels)` (icd.features.Conv5Features, which
    reduces them on its device).
    Returns (H, W) int32 ids 0..m-1, m <= max_regions.
    """
    pooled = hasattr(features, "region_means")
    if not pooled and features.shape[:2] != image.shape[:2]:
        raise ValueError(f"features are {features.shape[:2]} but the image is {image.shape[:2]}")
    labels = initial_regions(image)
    mean_features, sizes = features.region_means(image, labels) if pooled else \
        region_means(labels, features)
    return greedy_merge(mean_features, sizes, max_regions)[labels]


# ----------------------------------------------------------------------------------------------
# Folder driver
# ----------------------------------------------------------------------------------------------
def colour_position_features(image: np.ndarray) -> np.ndarray:
    """Network-free per-pixel features: centred Lab colour and centred position.

    image: (H, W, 3) uint8 RGB -> (H, W, 5) float32: L/100, a/128, b/128 minus their image
    means, then x/W - 0.5 and y/H - 0.5. Centring makes the cosine of the merge compare
    directions around the image's average instead of all features pointing the same way.
    """
    h, w = image.shape[:2]
    lab = rgb2lab(image).astype(np.float32) / np.array([100, 128, 128], np.float32)
    lab -= lab.reshape(-1, 3).mean(axis=0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.concatenate([lab, (x / w - 0.5)[..., None], (y / h - 0.5)[..., None]], axis=-1)


def colour_features() -> FeatureFn:
    """The default feature factory (picklable, zero-argument): colour/position features. The
    release's conv5_3 features of a checkpoint come from icd.features.make_feature_factory."""
    return colour_position_features


_worker_feature_fn: Optional[FeatureFn] = None


def _init_worker(factory: Callable[[], FeatureFn]) -> None:
    global _worker_feature_fn
    _worker_feature_fn = factory()


def _features(image: np.ndarray):
    """The worker's features of `image`: per pixel, or a source that reduces them per region on
    its device (`region_means`, icd.features)."""
    source = _worker_feature_fn
    return source if hasattr(source, "region_means") else source(image)


def _process(job: Tuple[str, str, int, bool]) -> str:
    image_path, out_path, max_pixels, downscale = job
    image = read_image(image_path)
    h, w = image.shape[:2]
    if not max_pixels or h * w <= max_pixels:
        ids = compute_superpixels(image, _features(image))
    elif downscale:
        # not the release: segment a copy with at most max_pixels pixels, map its ids back
        scale = math.sqrt(max_pixels / (h * w))
        size = (max(1, int(w * scale)), max(1, int(h * scale)))   # (W, H) for OpenCV
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        ids = compute_superpixels(small, _features(small))
        ids = ids[(np.arange(h) * size[1]) // h][:, (np.arange(w) * size[0]) // w]
    else:
        raise ValueError(f"{image_path}: {w}x{h} is {h * w} pixels, above the --max-pixels "
                         f"limit {max_pixels}; give --downscale to compute its superpixels on a "
                         f"copy of at most --max-pixels pixels (mapped back to {w}x{h}), or "
                         f"raise --max-pixels (memory and time grow ~ pixels^2 above it)")
    write_superpixels(out_path, ids)
    return out_path


def make_superpixels(image_root: str, data_list: str, out: str,
                     feature_factory: Optional[Callable[[], FeatureFn]] = None,
                     workers: int = 0, overwrite: bool = False,
                     shard: Tuple[int, int] = (0, 1), max_pixels: int = MAX_PIXELS,
                     downscale: bool = False, worker_env: Optional[Mapping[str, str]] = None
                     ) -> List[str]:
    """Write `<out>/<name>.png` for every `<image_root>/<name>.jpg` of the list.

    feature_factory: zero-argument picklable callable building the FeatureFn (default: colour
    features; see icd.features.make_feature_factory). It is called once in each worker process (or once in
    this process when workers=0) and must be picklable: workers are spawned, not forked. A
    network extractor is thus built per worker and each worker holds its own copy of the
    network: icd.features.superpixels_on_devices caps them per device. `worker_env`: the
    environment of the spawned workers (their thread counts).
    Images whose PNG already exists are skipped unless `overwrite`; writes are atomic, so an
    interrupted run resumes cleanly. Returns the paths written. `shard` (I, N): only shard I of N
    of the list (icd.devices.shard_names). An image of more than `max_pixels` pixels (0: no
    limit) is an error naming it, or with `downscale` is segmented on a copy scaled down to
    `max_pixels` pixels (INTER_AREA) whose ids are mapped back by nearest neighbour.
    """
    feature_factory = feature_factory or colour_features
    names = shard_names(read_list(data_list), shard)
    jobs = []
    for name in names:
        out_path = os.path.join(out, f"{name}.png")
        if overwrite or not os.path.isfile(out_path):
            jobs.append((os.path.join(image_root, f"{name}.jpg"), out_path, max_pixels,
                         downscale))
    os.makedirs(out, exist_ok=True)
    return list(map_images(_process, jobs, workers, "superpixels", initializer=_init_worker,
                           initargs=(feature_factory,), ordered=True, env=worker_env))
