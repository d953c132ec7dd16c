"""Seeds (pseudo-masks) from CAM and ICD score maps: docs/release.md section 7.

The release's `_generate_seed` is split into pieces that the evaluation reuses:

- `resize_scores`: (|L|, h, w) feature-resolution scores -> (|L|, H, W) on the image;
- `foreground_score`, `background_score`: the per-class normalisations;
- `seed_from_scores`: THE seed rule (written once; `threshold` is 1e-5 in the release and T in the
  threshold study of Table 2);
- `crf_refine`: the dense CRF post-processing;
- `generate_seed`: the release's per-image function (resize, rule, CRF);
- `make_seeds`: all images of a list (`DataPaths`) with `SeedSettings`, multi-process,
  resumable, atomic; it reads the score folders' provenance (icd.provenance: complete, one
  inference run, the size they were made at) and records its own in the seed folder.

Seed values: class index + 1 on the foreground (the index in the dataset's class list,
`icd.data.classes`; VOC's by default), 0 on the background, 255 undefined.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .crf import SEEDS_CRF, dense_crf
from .data.classes import classes_of_data
from .data.dataset import DataPaths
from .data.voc import IGNORE_LABEL, NUM_CLASSES, VOC_CLASSES, check_exif_turn, read_image, \
    read_image_labels, read_list, write_mask
from .data.transforms import INFER_SIZE
from .devices import shard_names
from .io import require_finite
from .pool import map_images
from .scores import EPS, background_score, foreground_score
from .provenance import producing, read_record, require_outputs_apart, score_infer_size

SALIENCY_BG = 0.01        # release: saliency < 0.01 is background
SALIENCY_MIN_FG = 0.01    # release: < 1% non-background pixels -> fall back to the ICD background
# Dense CRF (release, section 7): C + 1 labels, the background and the C classes (VOC: 21);
# its kernels are icd.crf.SEEDS_CRF
CRF_SEED_PROB = 0.5
CRF_MIN_PROB = 0.1

# Seed folders under <results>/seeds (release layout for crf and sal; nocrf is ours, Table 3).
SEED_VARIANTS = ("crf", "sal", "nocrf")



def resize_scores(scores: np.ndarray, image_size: Tuple[int, int],
                  infer_size: int = INFER_SIZE) -> np.ndarray:
    """Map feature-resolution scores onto the image (release: cv2 bilinear to (S, S), crop).

    Args:
        scores: (K, h, w) scores of the image padded bottom/right to (S, S).
        image_size: (H, W) of the image, H, W <= S.
    Returns:
        (K, H, W) float32.
    """
    height, width = image_size
    if height > infer_size or width > infer_size:
        raise ValueError(f"image size {image_size} exceeds the inference size {infer_size}")
    k = scores.shape[0]
    hwk = np.ascontiguousarray(np.asarray(scores, np.float32).transpose(1, 2, 0))
    # cv2 handles up to 512 channels at once and drops the channel axis when K = 1.
    resized = cv2.resize(hwk, (infer_size, infer_size), interpolation=cv2.INTER_LINEAR)
    resized = resized.reshape(infer_size, infer_size, k)[:height, :width]
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def _stack_norm(x: np.ndarray) -> np.ndarray:
    """Release: norm(x) = (x - min) / max(max(x - min), 1e-5), min and max over the whole stack."""
    shifted = x - x.min()
    return shifted / max(float(shifted.max()), EPS)


def seed_from_scores(cam: np.ndarray, icd: np.ndarray, labels: Sequence[int],
                     saliency: Optional[np.ndarray] = None,
                     threshold: float = EPS) -> np.ndarray:
    """The seed rule of the release (section 7), before any CRF.

    Args:
        cam: (|L|, H, W) CAM scores on the image (after `resize_scores`).
        icd: (|L|, H, W) ICD scores on the image.
        labels: the image's sorted present classes L (class indices 0..C-1).
        saliency: optional (H, W) saliency in [0, 1]; replaces the ICD background (release `sal`).
        threshold: fg where fg_score > threshold, ICD bg where every class has bg_score >
            threshold. The release uses 1e-5; Table 2 uses T in (0, 0.1, 0.3, 0.5).
    Returns:
        (H, W) uint8: labels[class] + 1 on fg, 0 on bg, 255 undefined.
    """
    num = len(labels)
    if cam.shape != icd.shape or icd.ndim != 3 or icd.shape[0] != num or num == 0:
        raise ValueError(f"cam {cam.shape} and icd {icd.shape} must both be (|L|={num}, H, W)")
    fg_score = foreground_score(icd)
    proposal = fg_score > threshold
    # release: candidate = argmax over L of proposal, the first proposing class wins
    cls = np.argmax(proposal, axis=0)
    fg = proposal.any(axis=0)
    if num > 1:
        # release: comp = norm(max(cam, 0)) * fg_score, norm over the whole (|L|, H, W) stack
        comp = _stack_norm(np.maximum(cam, 0)) * fg_score
        conflict = proposal.sum(axis=0) > 1
        cls = np.where(conflict, np.argmax(comp, axis=0), cls)
    # release: bg = all classes have min(icd,0)/min(min_hw icd,-1e-5) > 1e-5
    bg = (background_score(icd) > threshold).all(axis=0)
    if saliency is not None:
        if saliency.shape != fg.shape:
            raise ValueError(f"saliency {saliency.shape} does not match the image {fg.shape}")
        icd_bg = bg
        bg = saliency < SALIENCY_BG
        # release: if less than 1% of pixels are not bg, bg &= the ICD background rule
        if (~bg).mean() < SALIENCY_MIN_FG:
            bg &= icd_bg
    undefined = ~(bg ^ fg)
    if num > 1:
        # release: multi-class tie rule, fg pixels whose comp does not separate the classes
        undefined |= fg & (comp.max(axis=0) - comp.min(axis=0) <= EPS)
    seed = np.zeros(fg.shape, np.uint8)
    seed[fg] = (np.asarray(labels, np.int64)[cls] + 1)[fg]
    seed[undefined] = IGNORE_LABEL
    return seed


def crf_refine(image_rgb: np.ndarray, seed: np.ndarray,
               num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dense CRF on a seed (release, section 7) over K = num_classes + 1 labels (VOC: 21).

    Unary: -log(max(p, 1e-5)) with p = 0.5 on the seed's label and 0.5/K on the other labels;
    undefined (255) pixels get 0.5/K on every label; every pixel's p is then divided by its sum
    over the K labels (our reading of "renormalised"). A per-pixel constant in the unary cancels
    in the mean-field normalisation, so any per-pixel renormalisation gives the same output.
    Pairwise kernels and iterations: `icd.crf.SEEDS_CRF` (Gaussian sxy 3 compat 3; bilateral
    sxy 80 srgb 13 compat 10 on the RGB image; 10 iterations). Argmax; 255 where the largest
    marginal is below 0.1.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        seed: (H, W) uint8 with values in 0..num_classes or 255.
        num_classes: C, the foreground classes of the dataset's list.
    Returns:
        (H, W) uint8 refined seed.
    """
    height, width = seed.shape
    if image_rgb.shape != (height, width, 3):
        raise ValueError(f"image {image_rgb.shape} does not match the seed {seed.shape}")
    num_labels = num_classes + 1
    prob = np.full((num_labels, height, width), CRF_SEED_PROB / num_labels, np.float32)
    labelled = seed < num_labels
    rows, cols = np.nonzero(labelled)
    prob[seed[labelled].astype(np.int64), rows, cols] = CRF_SEED_PROB
    prob /= prob.sum(axis=0, keepdims=True)
    marginals = dense_crf(image_rgb, prob, SEEDS_CRF)
    refined = marginals.argmax(axis=0).astype(np.uint8)
    refined[marginals.max(axis=0) < CRF_MIN_PROB] = IGNORE_LABEL
    return refined


def generate_seed(image_rgb: np.ndarray, cam: np.ndarray, icd: np.ndarray,
                  labels: Sequence[int], infer_size: int = INFER_SIZE,
                  saliency: Optional[np.ndarray] = None, use_crf: bool = True,
                  threshold: float = EPS, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The release's `_generate_seed` for one image.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image.
        cam, icd: (|L|, h, w) feature-resolution scores of the image padded to (S, S).
        labels: sorted present classes L.
        infer_size: S.
        saliency: optional (H, W) float in [0, 1]; when given, no CRF (release `seeds/sal`).
        use_crf: dense CRF after the rule (ignored with saliency, as in the release).
        threshold: see `seed_from_scores`.
        num_classes: C of the class list (the CRF's C + 1 labels).
    Returns:
        (H, W) uint8 seed.
    """
    size = image_rgb.shape[:2]
    seed = seed_from_scores(resize_scores(cam, size, infer_size),
                            resize_scores(icd, size, infer_size), labels, saliency, threshold)
    if use_crf and saliency is None:
        seed = crf_refine(image_rgb, seed, num_classes)
    return seed


# ---------------------------------------------------------------------------------------------
# Files

def read_saliency(path: str) -> np.ndarray:
    """(H, W) float32 saliency in [0, 1] from a grey PNG (release: PNG / 255)."""
    grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise FileNotFoundError(f"{path}: saliency map missing or unreadable")
    return grey.astype(np.float32) / 255.0


def load_scores(path: str, labels: Sequence[int]) -> np.ndarray:
    """A score file `<name>.npy`, checked to be (|L|, h, w) for the image's present classes L."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: score file not found")
    try:
        scores = np.load(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: unreadable score file ({e})") from None
    if scores.ndim != 3:
        raise ValueError(f"{path}: scores must be 3-D (|L|, h, w), got shape {scores.shape}")
    if scores.shape[0] != len(labels):
        raise ValueError(f"{path}: first dimension {scores.shape[0]} differs from the "
                         f"{len(labels)} present classes {list(labels)}")
    require_finite(scores, f"{path}: scores")   # a diverged model's: all-background seeds
    return scores.astype(np.float32, copy=False)


def load_image_scores(results_dir: str, annotation_root: str, name: str,
                      folders: Sequence[str], classes: Sequence[str] = VOC_CLASSES
                      ) -> Tuple[List[int], List[np.ndarray]]:
    """The image's present classes (indices into `classes`) and its (|L|, h, w) score maps
    from each results folder."""
    labels = read_image_labels(os.path.join(annotation_root, name + ".xml"), classes)
    paths = [os.path.join(results_dir, folder, name + ".npy") for folder in folders]
    scores = [load_scores(path, labels) for path in paths]
    for path, score in zip(paths[1:], scores[1:]):
        if score.shape != scores[0].shape:
            raise ValueError(f"{path}: shape {score.shape} differs from {paths[0]} "
                             f"{scores[0].shape}")
    return labels, scores


def default_seed_dir(results_dir: str, variant: str, icd_folder: str = "scores_icd") -> str:
    """`<results>/seeds/<variant>` for the final ICD scores; `<variant>_<suffix>` otherwise.

    E.g. icd_folder `scores_icd_bu` with no CRF -> `<results>/seeds/nocrf_icd_bu` (Table 3).
    """
    if variant not in SEED_VARIANTS:
        raise ValueError(f"unknown seed variant {variant!r}; expected one of {SEED_VARIANTS}")
    folder = variant
    if icd_folder != "scores_icd":
        suffix = icd_folder[len("scores_"):] if icd_folder.startswith("scores_") else icd_folder
        folder = f"{variant}_{suffix}"
    return os.path.join(results_dir, "seeds", folder)


@dataclass(frozen=True)
class SeedSettings:
    """How `make_seeds` makes seeds (docs/release.md section 7).

    crf: a dense CRF after the rule (`crf_refine`, icd.crf.SEEDS_CRF); ignored with saliency.
    saliency_root: folder of <name>.png saliency maps: the release's `sal` seeds, no CRF.
    infer_size: the side the score maps were made at (None: the size their provenance record
        names, INFER_SIZE without one; another value than the record's is an error).
    icd_folder, cam_folder: the score folders under the results folder.
    """
    crf: bool = True
    saliency_root: Optional[str] = None
    infer_size: Optional[int] = None
    icd_folder: str = "scores_icd"
    cam_folder: str = "scores_cam"

    @property
    def variant(self) -> str:
        """The seed folder's name for these settings (SEED_VARIANTS): sal, crf or nocrf."""
        return "sal" if self.saliency_root is not None else ("crf" if self.crf else "nocrf")


def _seed_one(name: str, results_dir: str, data: DataPaths, settings: SeedSettings,
              out_dir: str) -> str:
    """Worker: write `<out_dir>/<name>.png`. Returns the name."""
    labels, (cam, icd) = load_image_scores(results_dir, data.annotation_root, name,
                                           (settings.cam_folder, settings.icd_folder),
                                           data.classes)
    image_path = os.path.join(data.image_root, name + ".jpg")
    image = read_image(image_path)
    saliency = None
    if settings.saliency_root is not None:
        saliency_path = os.path.join(settings.saliency_root, name + ".png")
        saliency = read_saliency(saliency_path)
        check_exif_turn(image_path, image.shape, saliency_path, saliency.shape, "saliency map")
        if saliency.shape != image.shape[:2]:
            raise ValueError(f"{saliency_path}: saliency {saliency.shape} does not match the "
                             f"image {image.shape[:2]}")
    try:
        seed = generate_seed(image, cam, icd, labels, settings.infer_size, saliency,
                             use_crf=settings.crf, num_classes=len(data.classes))
    except ValueError as e:
        raise ValueError(f"{image_path}: {e}") from None
    write_mask(os.path.join(out_dir, name + ".png"), seed)
    return name


def make_seeds(results_dir: str, data: DataPaths, settings: SeedSettings = SeedSettings(),
               out_dir: Optional[str] = None, workers: int = 1, overwrite: bool = False,
               shard: Tuple[int, int] = (0, 1)) -> Dict[str, object]:
    """Seeds for every image of `data.data_list` as single-channel 8-bit label PNGs
    (`write_mask`): class index in `data.classes` + 1, 0 background, 255 undefined.

    Reads `<results_dir>/<cam_folder>/<name>.npy`, `<results_dir>/<icd_folder>/<name>.npy`,
    `<image_root>/<name>.jpg`, `<annotation_root>/<name>.xml` (and `<saliency_root>/<name>.png`).
    Writes `<out_dir>/<name>.png`; out_dir defaults to `default_seed_dir`: `seeds/sal` with
    saliency, else `seeds/crf`, or `seeds/nocrf` with crf=False. Existing seeds of the same
    settings are kept unless `overwrite` (resumable); each PNG is written atomically.

    The score folders must be complete and from one inference run (icd.provenance);
    `settings.infer_size` None takes the size they were made at (INFER_SIZE without a record), an
    explicit other value is an error. A seed folder of other settings is refused unless
    `overwrite`.

    Args:
        workers: processes; <= 1 runs in this process.
        shard: (I, N): only shard I of N of the list (icd.devices.shard_names); N machines
            running the N shards into one folder write what one machine writes.
    Returns:
        {"written": n, "skipped": m, "out_dir": out_dir}.
    """
    data = replace(data, classes=classes_of_data(data.classes, data.image_root,
                                                 data.annotation_root))
    folders = (settings.cam_folder, settings.icd_folder)
    out_dir = out_dir or default_seed_dir(results_dir, settings.variant, settings.icd_folder)
    require_outputs_apart({"--out": out_dir}, {
        "--results": results_dir,
        "--results/--cam-scores": os.path.join(results_dir, settings.cam_folder),
        "--results/--icd-scores": os.path.join(results_dir, settings.icd_folder),
        "--image-root": data.image_root, "--annotation-root": data.annotation_root,
        "--saliency-root": settings.saliency_root})
    names = shard_names(read_list(data.data_list), shard)
    settings = replace(settings, infer_size=score_infer_size(
        results_dir, folders, names, settings.infer_size, INFER_SIZE, data.classes))
    with producing([out_dir], "seeds", _seed_record(results_dir, data, settings), overwrite,
                   shard, names):
        todo = [n for n in names if not os.path.isfile(os.path.join(out_dir, n + ".png"))]
        job = functools.partial(_seed_one, results_dir=results_dir, data=data,
                                settings=settings, out_dir=out_dir)
        for _ in map_images(job, todo, workers, f"seeds -> {out_dir}"):
            pass
    return {"written": len(todo), "skipped": len(names) - len(todo), "out_dir": out_dir}


def _seed_record(results_dir: str, data: DataPaths, settings: SeedSettings) -> Dict[str, object]:
    """What a seed folder's provenance record names and compares (icd.provenance): the score
    folders' fingerprints, the settings, the roots and the class list."""
    scores = {folder: (read_record(os.path.join(results_dir, folder)) or {}).get("fingerprint")
              for folder in (settings.cam_folder, settings.icd_folder)}
    return dict(scores=scores, infer_size=settings.infer_size, crf=settings.crf,
                saliency_root=settings.saliency_root and os.path.abspath(settings.saliency_root),
                image_root=os.path.abspath(data.image_root),
                annotation_root=os.path.abspath(data.annotation_root),
                classes=list(data.classes))
