"""A small synthetic dataset in exact VOC layout: a miniature of the problem ICD solves.

Every object has a body and a small discriminative part (a "marker", ~10-15% of the object's
area). The marker's colour and shape tell the class; the body (blob shape family, striped
texture, colour distribution) is drawn from the same distribution for every class. A classifier
therefore only needs the marker (CAM covers the part), while the integral object must come from
separating the body from the background, which is a different kind of texture: real photographs
shipped with scikit-image (brick, grass, gravel, ...) randomly cropped, scaled and tinted.

About 70% of the images hold one class (one or two instances), the rest two or three classes;
objects may overlap a little (never over another object's marker) and the mask shows the top one.
Masks follow VOC: class id = index in the dataset's class list + 1 (any names; `classes.txt`
beside the data lists them), background 0, a 255 band of about 2 px at object borders.
Generation is deterministic: image i of a split draws only from
``np.random.default_rng([seed, split, i])``, so the same seed gives byte-identical files.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import skimage.data
from scipy import ndimage

from ..io import atomic_path
from .classes import check_classes, write_classes
from .voc import IGNORE_LABEL, write_annotation, write_image, write_mask

DEFAULT_CLASSES = ("aeroplane", "bird", "car", "cat", "dog", "person")
SPLITS = ("train", "val")

# Marker designs: the k-th chosen class gets shape k % 6 and colour (k + k // 6) % 6, so the
# first six classes differ in both, and up to 36 classes get distinct (shape, colour) pairs.
MARKER_SHAPES = ("disc", "triangle", "square", "cross", "ring", "diamond")
MARKER_COLOURS = ((225, 30, 30), (30, 70, 235), (30, 195, 45),
                  (245, 220, 20), (225, 40, 225), (20, 215, 225))
MARKER_AREA = (0.10, 0.15)  # fraction of the object's area
OBJECT_AREA = {"single": (0.20, 0.40), "several": (0.07, 0.14)}  # fraction of the image's area
SINGLE_CLASS_FRACTION = 0.7
BACKGROUND_TEXTURES = ("brick", "grass", "gravel", "moon", "coins", "page", "coffee", "rocket",
                       "immunohistochemistry", "hubble_deep_field")


@functools.lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    """A scikit-image sample as (H, W, 3) float32 RGB in 0..1 (grey images repeated)."""
    image = getattr(skimage.data, name)()
    image = np.asarray(image, np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _random_colour(rng: np.random.Generator, saturation: Tuple[float, float],
                   value: Tuple[float, float]) -> np.ndarray:
    """(3,) float32 RGB in 0..1 from a random hue and the given saturation/value ranges."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*saturation) * 255,
                      rng.uniform(*value) * 255]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32: a random crop of a real texture, rescaled, flipped and tinted."""
    texture = _texture(BACKGROUND_TEXTURES[rng.integers(len(BACKGROUND_TEXTURES))])
    th, tw = texture.shape[:2]
    zoom = rng.uniform(1.0, 3.5)  # texture pixels per image pixel
    ch, cw = min(th, int(h * zoom)), min(tw, int(w * zoom))
    top, left = rng.integers(0, th - ch + 1), rng.integers(0, tw - cw + 1)
    patch = cv2.resize(texture[top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    grey = patch.mean(axis=2, keepdims=True)
    patch = grey + rng.uniform(0, 0.6) * (patch - grey)  # partly desaturated
    contrast = rng.uniform(0.6, 1.2)
    patch = patch.mean() + contrast * (patch - patch.mean())
    tint = _random_colour(rng, (0.0, 0.5), (0.6, 1.0))
    return np.clip(patch * tint * rng.uniform(0.8, 1.2), 0, 1)


def _body_mask(rng: np.random.Generator, h: int, w: int, area: float) -> np.ndarray:
    """(h, w) bool blob of about `area` pixels: a rotated ellipse with a wavy outline."""
    aspect = rng.uniform(0.55, 1.0)
    ry = np.sqrt(area / (np.pi * aspect))
    rx = ry * aspect
    reach = int(np.ceil(ry * 1.3))
    cy = rng.uniform(reach, max(reach, h - reach))
    cx = rng.uniform(reach, max(reach, w - reach))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k in (2, 3, 4):
        radius += rng.uniform(0, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return (u / ry) ** 2 + (v / rx) ** 2 <= radius ** 2


def _body_texture(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32 body appearance, the same distribution for every class.

    A saturated base colour with periodic stripes and shading towards the outline: smooth and
    periodic, unlike the photographic backgrounds.
    """
    h, w = mask.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = _random_colour(rng, (0.3, 0.6), (0.55, 0.9))
    angle, period = rng.uniform(0, np.pi), rng.uniform(5, 10)
    stripes = 1 + rng.uniform(0.15, 0.3) * np.sin(
        2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    depth = ndimage.distance_transform_edt(mask)
    shade = 0.75 + 0.25 * np.minimum(depth / max(depth.max(), 1), 1) ** 0.5
    return np.clip(base * (stripes * shade)[..., None], 0, 1)


def _marker_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bool mask of a unit-radius marker in rotated coordinates (u, v)."""
    if shape == "disc":
        return u ** 2 + v ** 2 <= 1
    if shape == "triangle":
        return (v <= 0.5) & (np.sqrt(3) * u - v <= 1) & (-np.sqrt(3) * u - v <= 1)
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "cross":
        return ((np.abs(u) <= 1) & (np.abs(v) <= 0.35)) | ((np.abs(v) <= 1) & (np.abs(u) <= 0.35))
    if shape == "ring":
        return (u ** 2 + v ** 2 <= 1) & (u ** 2 + v ** 2 >= 0.3)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1
    raise ValueError(f"unknown marker shape {shape!r}")


def _marker_mask(rng: np.random.Generator, body: np.ndarray, shape: str) -> np.ndarray:
    """(h, w) bool marker of `shape` inside `body`, covering MARKER_AREA of the object."""
    h, w = body.shape
    target = rng.uniform(*MARKER_AREA) * body.sum()
    depth = ndimage.distance_transform_edt(body)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(-0.2, 0.2)  # a small tilt keeps square and diamond apart
    radius = np.sqrt(target / np.pi)
    inside = np.argwhere(depth >= 1.2 * radius)
    cy, cx = (inside[rng.integers(len(inside))] if len(inside)
              else np.unravel_index(np.argmax(depth), depth.shape))
    for _ in range(2):  # rescale the radius so that the drawn area meets the target
        u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / radius
        v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / radius
        marker = _marker_shape(shape, u, v) & body
        radius *= np.sqrt(target / max(marker.sum(), 1))
    return marker


def _place_objects(rng: np.random.Generator, h: int, w: int, classes: Sequence[int]
                   ) -> List[Tuple[int, np.ndarray, np.ndarray]]:
    """(class position, body mask, marker mask) per placed object, bottom to top.

    A new object may cover at most 15% of an earlier body and none of an earlier marker;
    an object that finds no such place in 100 tries is left out.
    """
    single = len(classes) == 1
    placed: List[Tuple[int, np.ndarray, np.ndarray]] = []
    for k in classes:
        for _ in range(100):
            area = rng.uniform(*OBJECT_AREA["single" if single else "several"])
            body = _body_mask(rng, h, w, area * h * w)
            covers_marker = any((body & ndimage.binary_dilation(m, iterations=2)).any()
                                for _, _, m in placed)
            overlap = max([(body & b).sum() / b.sum() for _, b, _ in placed], default=0)
            if not covers_marker and overlap <= 0.15:
                placed.append((k, body, _marker_mask(rng, body, MARKER_SHAPES[k % 6])))
                break
    return placed


def synthesize(rng: np.random.Generator, size: int, num_classes: int
               ) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, Tuple[int, int, int, int]]]]:
    """One image: (H, W, 3) uint8 RGB, (H, W) uint8 mask of class positions + 1 (255 border),
    and the objects as (class position, VOC bndbox xmin, ymin, xmax, ymax 1-based)."""
    h, w = (int(round(size * rng.uniform(0.85, 1.15))) for _ in range(2))
    if rng.random() < SINGLE_CLASS_FRACTION:
        classes = [int(rng.integers(num_classes))] * (1 if rng.random() < 0.8 else 2)
    else:
        classes = list(rng.choice(num_classes, size=min(num_classes, rng.choice([2, 2, 3])),
                                  replace=False))
    image = _background(rng, h, w)
    labels = np.zeros((h, w), np.uint8)
    objects = []
    for k, body, marker in _place_objects(rng, h, w, classes):
        image[body] = _body_texture(rng, body)[body]
        colour = np.array(MARKER_COLOURS[(k + k // 6) % 6], np.float32) / 255
        image[marker] = colour * rng.uniform(0.9, 1.05)
        labels[body] = k + 1  # the mask shows the top object
        ys, xs = np.nonzero(body)
        objects.append((int(k), (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)))
    image = cv2.GaussianBlur(image, (0, 0), 0.6) + rng.normal(0, 0.012, image.shape)
    image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    # VOC: pixels at object borders are "ignore"; a 3x3 max != min marks a band of ~2 px
    border = ndimage.grey_dilation(labels, size=3) != ndimage.grey_erosion(labels, size=3)
    labels[border] = IGNORE_LABEL
    return image, labels, objects


def make_synthetic_voc(out: str, num_train: int = 200, num_val: int = 50, size: int = 112,
                       seed: int = 0, classes: Sequence[str] = DEFAULT_CLASSES
                       ) -> Dict[str, List[str]]:
    """Write the dataset under `out` in VOC layout; returns the image names per split.

    JPEGImages/<name>.jpg, Annotations/<name>.xml, SegmentationClass/<name>.png (single-channel
    8-bit label PNGs, see `write_mask`: class k of `classes` is k + 1), classes.txt (the class
    list, for `--classes`) and, last, ImageSets/Segmentation/{train,val}.txt. Every file is
    written atomically. `classes` may be any distinct names.
    """
    classes = check_classes(classes, "classes", "name")
    names: Dict[str, List[str]] = {}
    for split_id, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        names[split] = [f"{split}_{i:05d}" for i in range(count)]
        for i, name in enumerate(names[split]):
            image, mask, objects = synthesize(np.random.default_rng([seed, split_id, i]),
                                              size, len(classes))
            write_image(os.path.join(out, "JPEGImages", f"{name}.jpg"), image)
            write_mask(os.path.join(out, "SegmentationClass", f"{name}.png"), mask)
            write_annotation(os.path.join(out, "Annotations", f"{name}.xml"), name, image.shape,
                             [dict(name=classes[k], bndbox=box) for k, box in objects])
    write_classes(os.path.join(out, "classes.txt"), classes)
    for split in SPLITS:  # list files last: a list never names a missing file
        with atomic_path(os.path.join(out, "ImageSets", "Segmentation", f"{split}.txt")) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(f"{name}\n" for name in names[split]))
    return names
