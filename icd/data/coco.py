"""MS COCO instance annotations converted to the VOC layout the rest of icd reads.

`coco_to_voc` writes, for one split (one `instances_<split><year>.json`), under `out`:

- `JPEGImages/<name>.jpg`: a symbolic link to the COCO image (absolute path; default) or a copy
  (`images="copy"`, for a dataset that must outlive or leave the COCO folder);
- `Annotations/<name>.xml`: one VOC `<object>` per instance (class name, box from COCO's bbox),
  crowd regions included: a crowd of people shows people, so the class is present in the
  image-level labels (`read_image_labels`);
- `SegmentationClass/<name>.png`: a single-channel index PNG (`write_mask`) by `semantic_mask`:
  0 background, class index + 1 in the order of `classes.txt`, 255 where the class is not
  certain (instances of different classes overlap, or only a crowd region covers the pixel);
- `ImageSets/Segmentation/<split>.txt` (written last: a list never names a missing file) and
  `classes.txt` (COCO's categories in id order: 80 names for COCO 2014).

Images without any instance (about 1% of COCO 2014) have no image-level label, so they are left
out (counted in the summary). Resumable: an image whose three files exist is kept unless
`overwrite`. `<name>` is the file name without extension (`COCO_train2014_000000000009`).
"""
from __future__ import annotations

import functools
import math
import os
import re
import shutil
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from ..io import atomic_path, read_json
from ..seeds import map_images
from .classes import IGNORE_LABEL, check_classes, read_classes, write_classes
from .voc import write_annotation, write_mask

IMAGE_MODES = ("symlink", "copy")
# instances_train2014.json -> split "train", images in <coco-root>/train2014
ANNOTATION_NAME = re.compile(r"^instances_(?P<folder>(?P<split>[a-z]+)\d{4})\.json$")

Record = Tuple[Dict[str, object], List[Dict[str, object]]]   # (COCO image, its instances)


def read_instances(path: str) -> Dict[str, list]:
    """A COCO instances file, checked for its `images`, `annotations` and `categories` lists."""
    instances = read_json(path)
    if not isinstance(instances, dict):
        raise ValueError(f"{path}: not a COCO instances file (expected a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances.get(key), list):
            raise ValueError(f"{path}: not a COCO instances file (no {key!r} list)")
    if not instances["categories"]:
        raise ValueError(f"{path}: no categories")
    return instances


def coco_classes(instances: Mapping[str, list], path: str = "instances") -> Tuple[str, ...]:
    """The category names in category-id order (COCO 2014: 80, `person` first)."""
    return check_classes([c["name"] for c in sorted(instances["categories"], key=lambda c: c["id"])],
                         path, "category (in id order)")


def instance_mask(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO segmentation: polygons [[x1, y1, ...], ...], uncompressed RLE
    {"counts": [...], "size": [H, W]} (crowd) or compressed RLE {"counts": "...", ...}."""
    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation, counts=segmentation["counts"].encode("ascii")) \
            if isinstance(segmentation["counts"], str) else segmentation
    return coco_mask.decode(rle).astype(bool)


def semantic_mask(instances: Sequence[Mapping[str, object]], class_of: Mapping[int, int],
                  height: int, width: int) -> np.ndarray:
    """(H, W) uint8 label map of an image's instances.

    A pixel is class c + 1 when every instance covering it is of class c and at least one of
    them is not a crowd region; 255 when instances of two or more classes cover it (ambiguous
    overlap) or only crowd regions do (a crowd's outline also holds background); 0 when none
    covers it. `class_of` maps COCO category ids to class indices.
    """
    label = np.zeros((height, width), np.int32)           # class index + 1 of the instances
    ambiguous = np.zeros((height, width), bool)
    certain = np.zeros((height, width), bool)             # covered by a non-crowd instance
    for ann in instances:
        mask = instance_mask(ann["segmentation"], height, width)
        value = class_of[ann["category_id"]] + 1
        ambiguous |= mask & (label != 0) & (label != value)
        label[mask] = value
        if not ann.get("iscrowd", 0):
            certain |= mask
    label[ambiguous | ((label != 0) & ~certain)] = IGNORE_LABEL
    return label.astype(np.uint8)


def voc_box(bbox: Sequence[float], height: int, width: int) -> Tuple[int, int, int, int]:
    """COCO's [x, y, w, h] (pixels from 0, continuous) as VOC's 1-based inclusive
    (xmin, ymin, xmax, ymax), clipped to the image: the pixels the box touches."""
    x, y, w, h = (float(v) for v in bbox)
    xmin = min(max(math.floor(x) + 1, 1), width)
    ymin = min(max(math.floor(y) + 1, 1), height)
    xmax = min(max(math.ceil(x + w), xmin), width)
    ymax = min(max(math.ceil(y + h), ymin), height)
    return xmin, ymin, xmax, ymax


def _outputs(out: str, name: str) -> Tuple[str, str, str]:
    return (os.path.join(out, "JPEGImages", f"{name}.jpg"),
            os.path.join(out, "Annotations", f"{name}.xml"),
            os.path.join(out, "SegmentationClass", f"{name}.png"))


def _convert_one(record: Record, image_dir: str, out: str, classes: Tuple[str, ...],
                 class_of: Mapping[int, int], images: str) -> str:
    """Worker: write one image's JPEG (link or copy), XML and label PNG. Returns its name."""
    image, instances = record
    source = os.path.abspath(os.path.join(image_dir, str(image["file_name"])))
    name = os.path.splitext(os.path.basename(source))[0]
    height, width = int(image["height"]), int(image["width"])
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: COCO image not found")
    with Image.open(source) as im:                         # header only, no decoding
        if im.size != (width, height):
            raise ValueError(f"{source}: image is {im.size[0]}x{im.size[1]}, the annotations "
                             f"say {width}x{height}")
    jpeg, xml, png = _outputs(out, name)
    with atomic_path(jpeg) as tmp:
        if images == "copy":
            shutil.copyfile(source, tmp)
        else:
            os.remove(tmp)
            os.symlink(source, tmp)
    try:
        write_mask(png, semantic_mask(instances, class_of, height, width))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{source}: bad instance segmentation ({e})") from None
    write_annotation(xml, name, (height, width), [
        dict(name=classes[class_of[a["category_id"]]], bndbox=voc_box(a["bbox"], height, width))
        for a in instances])
    return name


def coco_to_voc(coco_root: str, annotations: str, out: str, split: Optional[str] = None,
                image_dir: Optional[str] = None, images: str = "symlink", workers: int = 1,
                overwrite: bool = False) -> Dict[str, object]:
    """Convert one COCO split to the VOC layout under `out` (module docstring).

    Args:
        coco_root: the COCO folder (holding `train2014/`, `annotations/`).
        annotations: the instances file; a bare name is looked up in `<coco_root>/annotations`.
        split: the list written, `ImageSets/Segmentation/<split>.txt`; default from the file
            name: instances_train2014.json -> train, instances_val2014.json -> val.
        image_dir: the images; default `<coco_root>/<train2014|val2014|...>` from the file name.
        images: "symlink" (absolute links, default) or "copy".
        workers: processes; <= 1 converts in this process.
    Returns:
        {"split", "list", "written", "kept", "without_instances", "classes"}.
    """
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    if not os.path.isfile(annotations) and not os.path.dirname(annotations):
        annotations = os.path.join(coco_root, "annotations", annotations)
    match = ANNOTATION_NAME.match(os.path.basename(annotations))
    if (split is None or image_dir is None) and match is None:
        raise ValueError(f"{annotations}: cannot tell the split and image folder from the file "
                         f"name (expected instances_<split><year>.json); give --split and "
                         f"--image-dir")
    split = split or match.group("split")
    image_dir = image_dir or os.path.join(coco_root, match.group("folder"))
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: COCO image folder not found")
    instances = read_instances(annotations)
    classes = coco_classes(instances, annotations)
    class_file = os.path.join(out, "classes.txt")
    if os.path.isfile(class_file) and read_classes(class_file) != classes:
        raise ValueError(f"{class_file}: holds other classes than the categories of "
                         f"{annotations}; convert into another --out")
    class_of = {int(c["id"]): i for i, c in enumerate(
        sorted(instances["categories"], key=lambda c: c["id"]))}
    by_image: Dict[int, List[Dict[str, object]]] = {}
    for ann in instances["annotations"]:
        if ann.get("category_id") not in class_of:
            raise ValueError(f"{annotations}: annotation {ann.get('id')} has category "
                             f"{ann.get('category_id')!r}, not in the categories")
        by_image.setdefault(ann["image_id"], []).append(ann)
    records = [(image, by_image[image["id"]]) for image in instances["images"]
               if image["id"] in by_image]
    names = [os.path.splitext(os.path.basename(str(image["file_name"])))[0]
             for image, _ in records]
    todo = [r for r, n in zip(records, names)
            if overwrite or not all(os.path.lexists(p) for p in _outputs(out, n))]
    write_classes(class_file, classes)
    job = functools.partial(_convert_one, image_dir=image_dir, out=out, classes=classes,
                            class_of=class_of, images=images)
    for _ in map_images(job, todo, workers, f"COCO {split} -> {out}"):
        pass
    list_file = os.path.join(out, "ImageSets", "Segmentation", f"{split}.txt")
    with atomic_path(list_file) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in names))
    return {"split": split, "list": list_file, "written": len(todo),
            "kept": len(records) - len(todo),
            "without_instances": len(instances["images"]) - len(records),
            "classes": class_file}
