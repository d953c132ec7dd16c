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

- `coco_images_<split>.json`: which COCO image each `<name>` is ({name: {"id", "file_name"}}).

An instance whose polygon has an odd number of coordinates, or whose box lies wholly outside its
image, is left out with a warning naming the annotation (counted in the summary by kind,
`LEFT_OUT`). Images without any (remaining) instance (about 1% of COCO 2014) have no image-level
label, so they are left out (counted in the summary). Resumable: an image whose three files
exist is kept unless `overwrite`. `<name>` is the file name without folder and extension
(`COCO_train2014_000000000009`, `photo.v2`: an image id is the whole list line, dots included)
with every character other than letters, digits, `.`, `_`, `-` replaced by `_` (a name with a
space would be split by the other stages), `image_<image id>` for a name that is no image id
(`icd.data.voc.name_problem`: starting with `.`, ending in `.jpg`); names that would then be
equal (the same file name in two folders, or equal but for case) get `_<image id>` appended.
A `file_name` that leaves the image folder (absolute, or through `..`) is refused, and so is an
image or annotation with a missing or ill-typed field, and a category name that would not read
back from `classes.txt` as written (`class_name_problem`: a newline, blanks at its ends): the
error names the file and its id.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from ..io import atomic_path, read_json, write_json
from ..pool import map_images
from .classes import IGNORE_LABEL, check_classes, class_name_problem, read_classes, write_classes
from .voc import name_problem, write_annotation, write_mask

IMAGE_MODES = ("symlink", "copy")
# instances_train2014.json -> split "train", images in <coco-root>/train2014
ANNOTATION_NAME = re.compile(r"^instances_(?P<folder>(?P<split>[a-z]+)\d{4})\.json$")

# (name, source image path, height, width, the image's instances)
Record = Tuple[str, str, int, int, List[Dict[str, object]]]
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")   # characters replaced by "_" in names
# why an instance is left out of the conversion (with a warning naming it, counted in the summary)
LEFT_OUT = ("odd_polygon", "outside_image")
log = logging.getLogger(__name__)


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
    seen = set()
    for category in instances["categories"]:
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise ValueError(f"{path}: a category has no integer 'id' ({str(category)[:80]})")
        if not isinstance(category.get("name"), str) or category["id"] in seen:
            raise ValueError(f"{path}: category {category['id']}: "
                             + ("the id is given twice" if category["id"] in seen else
                                f"'name' must be a string, got {category.get('name')!r}"))
        problem = class_name_problem(category["name"])
        if problem:   # classes.txt holds one name per line and must read back as written
            raise ValueError(f"{path}: category {category['id']}: name {category['name']!r} "
                             f"{problem}; it would not read back from classes.txt as written: "
                             f"rename the category in the file")
        seen.add(category["id"])
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


def _convert_one(record: Record, out: str, classes: Tuple[str, ...],
                 class_of: Mapping[int, int], images: str) -> str:
    """Worker: write one image's JPEG (link or copy), XML and label PNG. Returns its name."""
    name, source, height, width, instances = record
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_image(image: object, path: str) -> None:
    """An entry of `images`: an integer id, a non-empty file_name, positive height and width;
    else an error naming the file and the image id."""
    if not isinstance(image, dict) or not _is_int(image.get("id")):
        raise ValueError(f"{path}: an image has no integer 'id' ({str(image)[:80]})")
    where = f"{path}: image {image['id']}"
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        raise ValueError(f"{where}: 'file_name' must be a non-empty string, got "
                         f"{image.get('file_name')!r}")
    for key in ("height", "width"):
        if not _is_int(image.get(key)) or image[key] < 1:
            raise ValueError(f"{where}: {key!r} must be a positive integer, got "
                             f"{image.get(key)!r}")


def check_annotation(ann: object, path: str, class_of: Mapping[int, int],
                     image_ids: Mapping[int, object]) -> None:
    """An entry of `annotations`: integer id and image_id (an image of the file), a category_id
    of the categories, bbox [x, y, w, h] of finite numbers with w, h >= 0, a segmentation
    (polygon list or RLE object), iscrowd 0 or 1 if given; else an error naming the file and the
    annotation id."""
    if not isinstance(ann, dict) or not _is_int(ann.get("id")):
        raise ValueError(f"{path}: an annotation has no integer 'id' ({str(ann)[:80]})")
    where = f"{path}: annotation {ann['id']}"
    if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
        raise ValueError(f"{where}: 'image_id' {ann.get('image_id')!r} is not the id of an image "
                         f"of the file")
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in class_of:
        raise ValueError(f"{where}: has category {ann.get('category_id')!r}, not in the "
                         f"categories")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))
            and bbox[2] >= 0 and bbox[3] >= 0):
        raise ValueError(f"{where}: 'bbox' must be [x, y, width, height] of finite numbers "
                         f"(width, height >= 0), got {bbox!r}")
    if not isinstance(ann.get("segmentation"), (list, dict)):
        raise ValueError(f"{where}: 'segmentation' must be a polygon list or an RLE object, got "
                         f"{ann.get('segmentation')!r:.80}")
    if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), bool):
        raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {ann.get('iscrowd')!r}")


def instance_problem(ann: Mapping[str, object], image: Mapping[str, object]) -> Tuple[str, str]:
    """(kind in LEFT_OUT, why) when a checked annotation cannot be converted as given, else
    ("", ""): a polygon of an odd number of coordinates (one is missing, so its outline is
    unknown) or a box wholly outside its image (the instance shows nothing of it)."""
    polygons = ann["segmentation"] if isinstance(ann["segmentation"], list) else []
    odd = [k for k, polygon in enumerate(polygons, 1)
           if isinstance(polygon, list) and len(polygon) % 2]
    if odd:
        return "odd_polygon", (f"polygon {odd[0]} has {len(polygons[odd[0] - 1])} coordinates, "
                               f"an odd number (x, y pairs)")
    x, y, w, h = ann["bbox"]
    if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
        return "outside_image", (f"box {ann['bbox']} lies wholly outside its "
                                 f"{image['width']}x{image['height']} image {image['id']}")
    return "", ""


def image_source(image_dir: str, image: Mapping[str, object], path: str) -> str:
    """The absolute path of an image's file, refused when its file_name leaves `image_dir`
    (absolute, or climbing out through `..`): the converter links only the split's images."""
    file_name = str(image["file_name"])
    root = os.path.abspath(image_dir)
    source = os.path.normpath(os.path.join(root, file_name))
    if os.path.isabs(file_name) or not source.startswith(root + os.sep):
        raise ValueError(f"{path}: image {image['id']}: file_name {file_name!r} is outside the "
                         f"image folder {image_dir}")
    return source


def image_names(images: Sequence[Mapping[str, object]]) -> List[str]:
    """Unique, safe names of COCO images (module docstring): the file name's stem with unsafe
    characters replaced; names equal (ignoring case) to another get `_<image id>` appended until
    none are (image ids are unique, so a suffixed name cannot equal another suffixed name)."""
    names = [UNSAFE.sub("_", os.path.splitext(os.path.basename(str(image["file_name"])))[0])
             for image in images]
    names = [n if not name_problem(n) else f"image_{image['id']}"
             for n, image in zip(names, images)]
    suffixed = [False] * len(names)
    while True:
        groups: Dict[str, List[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name.casefold(), []).append(i)
        clashes = [i for group in groups.values() if len(group) > 1 for i in group
                   if not suffixed[i]]
        if not clashes:
            return names
        for i in clashes:
            names[i], suffixed[i] = f"{names[i]}_{images[i]['id']}", True


def _claimed_elsewhere(out: str, split: str, sources: Mapping[str, str]) -> None:
    """Refuse names that another split converted into `out` holds for another image file."""
    for entry in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        match = re.fullmatch(r"coco_images_(.+)\.json", entry)
        if not match or match.group(1) == split:
            continue
        other = read_json(os.path.join(out, entry))
        images = other.get("images") if isinstance(other, dict) else None
        for name, record in (images if isinstance(images, dict) else {}).items():
            source = record.get("source") if isinstance(record, dict) else None
            if name in sources and source != sources[name]:
                raise ValueError(f"{os.path.join(out, entry)}: {name!r} is already image "
                                 f"{source} of split {match.group(1)}, not {sources[name]}; "
                                 f"convert into another --out")


def _locate(coco_root: str, annotations: str, split: Optional[str],
            image_dir: Optional[str]) -> Tuple[str, str, str]:
    """The instances file, the split and the image folder: given, or told by the file name."""
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
    return annotations, split, image_dir


def _images_by_id(instances: Mapping[str, list], path: str) -> Dict[int, Dict[str, object]]:
    """Each checked image under its id; an id given twice is an error."""
    image_ids: Dict[int, Dict[str, object]] = {}
    for image in instances["images"]:
        check_image(image, path)
        if image["id"] in image_ids:
            raise ValueError(f"{path}: image {image['id']}: the id is given twice")
        image_ids[image["id"]] = image
    return image_ids


def _instances_by_image(instances: Mapping[str, list], path: str, class_of: Mapping[int, int],
                        image_ids: Mapping[int, Mapping[str, object]]
                        ) -> Tuple[Dict[int, List[Dict[str, object]]], Dict[str, int]]:
    """The kept instances of each image, and how many were left out of each kind
    (`instance_problem`), each left out with a warning."""
    by_image: Dict[int, List[Dict[str, object]]] = {}
    left_out = dict.fromkeys(LEFT_OUT, 0)
    for ann in instances["annotations"]:
        check_annotation(ann, path, class_of, image_ids)
        kind, problem = instance_problem(ann, image_ids[ann["image_id"]])
        if kind:
            log.warning("%s: annotation %s: %s; the instance is left out", path, ann["id"],
                        problem)
            left_out[kind] += 1
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    return by_image, left_out


def _write_list(out: str, split: str, names: Sequence[str]) -> str:
    """`ImageSets/Segmentation/<split>.txt`, one name a line; returns its path."""
    list_file = os.path.join(out, "ImageSets", "Segmentation", f"{split}.txt")
    with atomic_path(list_file) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in names))
    return list_file


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
        {"split", "list", "written", "kept", "without_instances", "left_out" ({kind: number
        of instances left out}, `instance_problem`), "classes", "mapping"}.
    """
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    annotations, split, image_dir = _locate(coco_root, annotations, split, image_dir)
    instances = read_instances(annotations)
    classes = coco_classes(instances, annotations)
    class_file = os.path.join(out, "classes.txt")
    if os.path.isfile(class_file) and read_classes(class_file) != classes:
        raise ValueError(f"{class_file}: holds other classes than the categories of "
                         f"{annotations}; convert into another --out")
    class_of = {int(c["id"]): i for i, c in enumerate(
        sorted(instances["categories"], key=lambda c: c["id"]))}
    image_ids = _images_by_id(instances, annotations)
    by_image, left_out = _instances_by_image(instances, annotations, class_of, image_ids)
    annotated = [image for image in instances["images"] if image["id"] in by_image]
    names = image_names(annotated)
    records = [(name, image_source(image_dir, image, annotations), image["height"],
                image["width"], by_image[image["id"]]) for name, image in zip(names, annotated)]
    _claimed_elsewhere(out, split, {r[0]: r[1] for r in records})
    todo = [r for r in records
            if overwrite or not all(os.path.lexists(p) for p in _outputs(out, r[0]))]
    write_classes(class_file, classes)
    mapping = os.path.join(out, f"coco_images_{split}.json")
    write_json(mapping, dict(annotations=os.path.abspath(annotations), images={
        name: dict(id=image["id"], file_name=image["file_name"], source=record[1])
        for name, image, record in zip(names, annotated, records)}))
    job = functools.partial(_convert_one, out=out, classes=classes, class_of=class_of,
                            images=images)
    for _ in map_images(job, todo, workers, f"COCO {split} -> {out}"):
        pass
    list_file = _write_list(out, split, names)
    return {"split": split, "list": list_file, "written": len(todo),
            "kept": len(records) - len(todo),
            "without_instances": len(instances["images"]) - len(records),
            "left_out": left_out, "classes": class_file, "mapping": mapping}
