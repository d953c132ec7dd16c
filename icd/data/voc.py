"""PASCAL VOC helpers: list files, image-level labels from XML, palette masks.

Formats follow ORIGINAL_RELEASE.md section 1: 20 classes in VOC order, multi-hot float32 labels,
ground-truth masks as palette PNGs where 255 means "ignore".
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import List, Sequence

import numpy as np
from PIL import Image

from ..io import atomic_path

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
IGNORE_LABEL = 255


def voc_palette() -> np.ndarray:
    """The standard VOC colour map, (256, 3) uint8: bit-interleaved colours for ids 0..255."""
    palette = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def read_list(path: str) -> List[str]:
    """Image names of a list file (`train_aug.txt` style): the first token of each non-empty line.

    Lines like ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` give ``x``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data list not found")
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            token = line.split()
            if token:
                names.append(os.path.splitext(os.path.basename(token[0]))[0])
    if not names:
        raise ValueError(f"{path}: data list is empty")
    return names


def read_image_labels(xml_path: str, class_names: Sequence[str] = VOC_CLASSES) -> List[int]:
    """Sorted class indices of an annotation (release rule, section 1).

    Objects with ``difficult`` 0 count; if that leaves none, the difficult ones are taken instead.
    """
    if not os.path.isfile(xml_path):
        raise FileNotFoundError(f"{xml_path}: annotation not found")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: not a readable XML annotation ({e})") from None
    easy, difficult = set(), set()
    for obj in root.iter("object"):
        name_node = obj.find("name")
        if name_node is None or not (name_node.text or "").strip():
            raise ValueError(f"{xml_path}: an <object> has no <name>")
        name = name_node.text.strip()
        if name not in class_names:
            raise ValueError(f"{xml_path}: unknown class name {name!r}")
        diff_node = obj.find("difficult")
        is_difficult = diff_node is not None and (diff_node.text or "0").strip() not in ("", "0")
        (difficult if is_difficult else easy).add(class_names.index(name))
    labels = easy or difficult
    if not labels:
        raise ValueError(f"{xml_path}: annotation has no objects")
    return sorted(labels)


def multi_hot(labels: Sequence[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(num_classes,) float32 multi-hot vector of class indices."""
    y = np.zeros((num_classes,), np.float32)
    y[list(labels)] = 1
    return y


def read_mask(path: str) -> np.ndarray:
    """A palette (or grey) PNG mask as (H, W) uint8 class ids, 255 = ignore."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: mask not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"{path}: mask must be a palette or grey PNG, got mode {im.mode}")
            return np.array(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: unreadable mask ({e})") from None


def write_mask(path: str, mask: np.ndarray) -> None:
    """Write (H, W) uint8 class ids as a VOC palette PNG, atomically."""
    im = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
