"""PASCAL VOC helpers: list files, image-level labels from XML, label PNGs.

Formats follow docs/release.md section 1: multi-hot float32 labels over a class list (VOC's 20
classes in VOC order by default; any list of `icd.data.classes`).
Label maps (ground truth, seeds) hold class ids, 255 meaning "ignore". We write them as the
release writes seeds (section 11: `cv2.imwrite` of an (h, w) uint8 array): single-channel 8-bit
PNGs whose pixel values are the labels, like SBD's SegmentationClassAug, so that
`cv2.imread(path, 0)` (the release's `compute_iou.py`, DeepLab loaders) and PIL both read the
labels. We read palette PNGs (VOC's SegmentationClass) and grey ones alike. Palettes
(`icd.data.classes`) are for coloured pictures made for people (overlays, figures), never for
label files.
"""
from __future__ import annotations

import os
import unicodedata
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from ..io import atomic_path
from .classes import IGNORE_LABEL, VOC_CLASSES, voc_palette  # noqa: F401 (VOC's, re-exported)

NUM_CLASSES = len(VOC_CLASSES)


FILE_EXTENSIONS = (".jpg", ".jpeg", ".png")   # a list line ending so names a file, not an id


def read_list(path: str) -> List[str]:
    """Image ids of a list file (`train_aug.txt` style), checked whole before any stage runs.

    A list is a set of image ids; every stage reads and writes `<id>.jpg`, `<id>.npy`,
    `<id>.png` with the whole id. Each non-blank line is an id, the whole line without its
    surrounding blanks (``2007_000032``, ``shot.v2``: a dot is part of the id), or the release's
    pair ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` (the image file, then the mask file of
    the same image; docs/release.md section 1), which gives ``x``: the base name of the image
    path without its ``.jpg``. A UTF-8 byte-order mark (written by some Windows editors) is not
    part of the first id. Anything else is an error naming the list file and the line, before
    any image is read: text that is not UTF-8, a comment line (``#``), a line of several words
    that is not that pair (``train_00004 extra``, ``my pic``: the stages cannot name files with
    blanks), an id a stage cannot write back as ``<id>.png`` (`name_problem`: ``x.jpg`` is a
    file name, not an id), and an id listed twice.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data list not found")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    names, line_of = [], {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} "
                             f"at column {e.start + 1}); save the list as UTF-8") from None
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        controls = [c for c in line.rstrip("\r") if unicodedata.category(c) == "Cc" and c != "\t"]
        if controls:   # a lone CR (old Mac line ends) or a form feed would split a line silently
            raise ValueError(f"{where}: holds the control character U+{ord(controls[0]):04X}; "
                             f"save the list with one name per line (LF or CRLF line ends)")
        if line.strip().startswith("#"):
            raise ValueError(f"{where}: {line.strip()!r} looks like a comment; a list holds image "
                             f"names only, remove the line")
        name = _line_id(line.split())
        if name is None:
            raise ValueError(f"{where}: {line.strip()!r} is not one image id: an id is the whole "
                             f"line and holds no blanks (the stages name files <id>.jpg, "
                             f"<id>.png), and the one line of two words is the release's pair "
                             f"'JPEGImages/<id>.jpg SegmentationClass/<id>.png'")
        problem = name_problem(name)
        if problem:
            raise ValueError(f"{where}: image name {name!r} {problem}")
        if name in line_of:
            raise ValueError(f"{where}: image {name!r} is listed again (first on line "
                             f"{line_of[name]}); a list names each image once")
        line_of[name] = number
        names.append(name)
    if not names:
        raise ValueError(f"{path}: data list is empty")
    return names


def _line_id(words: Sequence[str]) -> Optional[str]:
    """The image id of a list line's words: the one word, or the `x` of the release's pair
    `<folder>/x.jpg <folder>/x.png`; None for anything else."""
    if len(words) == 1:
        return words[0]
    if len(words) != 2 or not (words[0].endswith(".jpg") and words[1].endswith(".png")):
        return None
    image, mask = (os.path.basename(word)[:-len(".jpg")] for word in words)
    return image if image == mask else None


def name_problem(name: str) -> str:
    """Why `name` cannot be an image id that every stage writes and reads back as `<name>.png`
    and lists one per line, or "" when it can: no whitespace, control or format characters,
    no path separator (``/``, ``\\``), not empty, no leading ``.`` (``..``, hidden files and
    the temporaries of `icd.io.atomic_path`, which a stage deletes when it starts), and no image
    file extension at its end (``x.jpg`` names a file: its id is ``x``)."""
    if not name:
        return "is empty"
    if name.startswith("."):
        return "starts with '.' (hidden files and the stages' temporary files do)"
    for char in name:
        if char in "/\\":
            return f"holds the path separator {char!r}"
        if char.isspace() or unicodedata.category(char).startswith("C"):
            return f"holds the control or blank character U+{ord(char):04X}"
    if name.lower().endswith(FILE_EXTENSIONS):
        return (f"ends in a file extension ({os.path.splitext(name)[1]}): a list names image "
                f"ids, the stages add the extension (write {os.path.splitext(name)[0]!r})")
    return ""


def read_image(path: str) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB.

    release: read with OpenCV (BGR), then the channel axis is reversed to RGB (section 1).
    Not the release: a truncated JPEG (no end-of-image marker after its last scan) or PNG (no
    IEND chunk) is an error naming the file. OpenCV accepts such files with a warning that does
    not name them and decodes the missing part as flat grey, which would train, infer and seed on
    grey patches without anyone noticing; a warning would scroll by in a 10,582-image run, so
    the file has to be repaired or left out of the list.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found")
    with open(path, "rb") as f:
        encoded = f.read()
    problem = _truncation(encoded)
    if problem:
        raise ValueError(f"{path}: {problem}; re-download or re-encode it, or remove it from "
                         f"the list")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: unreadable image (OpenCV could not decode it)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


EXIF_ORIENTATION = 0x0112   # the EXIF tag; values 5-8 turn the image by 90 degrees


def exif_orientation(path: str) -> int:
    """The EXIF orientation (1-8) of an image file, 1 when it has none (or is unreadable)."""
    try:
        with Image.open(path) as im:
            value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def check_exif_turn(image_path: str, image_shape: Sequence[int], path: str,
                    shape: Sequence[int], what: str) -> None:
    """An error naming the image when the (H, W) `shape` of the `what` in `path` (label map,
    superpixels, saliency) differs from the (H, W[, 3]) shape of the image read from
    `image_path` and the image's EXIF orientation explains it. Other mismatches are left to
    the caller's own check.

    release: images are read with cv2.imread, which applies the EXIF orientation; masks are
    single-channel PNGs, never turned.
    """
    (height, width), (h, w) = tuple(image_shape[:2]), tuple(shape[:2])
    if (h, w) == (height, width):
        return
    orientation = exif_orientation(image_path)
    if orientation != 1:
        raise ValueError(
            f"{image_path}: its EXIF orientation {orientation} makes OpenCV (and so the release) "
            f"read it turned, as {width}x{height} (W x H), but its {what} {path} is {w}x{h}: "
            f"save the image with its pixels turned and no EXIF orientation (e.g. PIL's "
            f"ImageOps.exif_transpose), or make the {what} from the image as read")


def _truncation(encoded: bytes) -> str:
    """Why an encoded JPEG or PNG is incomplete, or "" (other formats are not checked)."""
    if encoded.startswith(b"\xff\xd8"):
        # entropy-coded data stuffs every 0xFF, so the last FFDA is the last scan's start and an
        # FFD9 after it is the image's end (an EXIF thumbnail's FFD9 comes before it)
        last_scan = encoded.rfind(b"\xff\xda")
        if last_scan < 0 or encoded.find(b"\xff\xd9", last_scan) < 0:
            return "unreadable image, truncated JPEG (no end-of-image marker after its last scan)"
    elif encoded.startswith(b"\x89PNG"):
        if encoded.rfind(b"IEND", -64) < 0:
            return "unreadable image, truncated PNG (no IEND chunk at its end)"
    return ""


def write_image(path: str, image: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write an (H, W, 3) uint8 RGB image atomically; the format follows the extension."""
    bgr = np.ascontiguousarray(np.asarray(image, np.uint8)[:, :, ::-1])
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
            raise ValueError(f"{path}: OpenCV could not write the image")


def write_annotation(path: str, name: str, image_shape: Sequence[int],
                     objects: Sequence[dict]) -> None:
    """Write a VOC XML annotation atomically.

    `image_shape` is (H, W[, C]); each object is a dict with ``name`` (a VOC class name),
    ``bndbox`` (xmin, ymin, xmax, ymax) 1-based inclusive pixel coordinates as in VOC, and an
    optional ``difficult`` (0/1, default 0).
    """
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in zip(("height", "width", "depth"), (*image_shape[:2], 3)):
        ET.SubElement(size, tag).text = str(int(value))
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj["name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = str(int(obj.get("difficult", 0)))
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["bndbox"]):
            ET.SubElement(box, tag).text = str(int(value))
    ET.indent(root)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=False)


def read_image_labels(xml_path: str, class_names: Sequence[str] = VOC_CLASSES) -> List[int]:
    """Sorted class indices (positions in `class_names`) of an annotation (release rule, section 1).

    Objects with ``difficult`` 0 count; if that leaves none, the difficult ones are taken instead.
    A name not in `class_names` is an error naming the file and the class.
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
            raise ValueError(f"{xml_path}: unknown class name {name!r}: not in the class list "
                             f"({len(class_names)} classes: {_listed(class_names)}); give the "
                             f"dataset's list with --classes FILE")
        diff_node = obj.find("difficult")
        is_difficult = diff_node is not None and (diff_node.text or "0").strip() not in ("", "0")
        (difficult if is_difficult else easy).add(class_names.index(name))
    labels = easy or difficult
    if not labels:
        raise ValueError(f"{xml_path}: annotation has no objects")
    return sorted(labels)


def _listed(names: Sequence[str], shown: int = 6) -> str:
    """The first `shown` names of a list, then how many more."""
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head}, ... {len(names) - shown} more"


def multi_hot(labels: Sequence[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(num_classes,) float32 multi-hot vector of class indices."""
    y = np.zeros((num_classes,), np.float32)
    y[list(labels)] = 1
    return y


def read_mask(path: str) -> np.ndarray:
    """A label PNG as (H, W) uint8 class ids, 255 = ignore.

    Palette PNGs (VOC's SegmentationClass) give their palette indices, single-channel 8-bit
    PNGs (SegmentationClassAug, our seeds) their values; colour (RGB) PNGs are an error: their
    colours are not labels.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: mask not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"{path}: a label map must be a palette or single-channel 8-bit "
                                 f"PNG, got PIL mode {im.mode}")
            return np.array(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: unreadable mask ({e})") from None


def write_mask(path: str, mask: np.ndarray) -> None:
    """Write (H, W) class ids 0..255 as a single-channel 8-bit PNG, atomically.

    release: seeds are `cv2.imwrite` of an (h, w) uint8 array, so `cv2.imread(path, 0)` returns
    the ids.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"{path}: a label map must be a non-empty (H, W) array, got shape "
                         f"{mask.shape}")
    if mask.dtype != np.uint8 and (
            not np.issubdtype(mask.dtype, np.integer) or mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{path}: label ids must be integers in 0..255, got {mask.dtype} "
                         f"values {mask.min()}..{mask.max()}")
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, np.ascontiguousarray(mask, np.uint8)):
            raise ValueError(f"{path}: OpenCV could not write the label PNG")
