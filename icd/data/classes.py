"""Class lists: which foreground classes a dataset has, in which order, and their colours.

A class list is data, not code: a text file with one class name per line, in the order of the
label ids (line k holds class id k; the background is implicit and always id 0), like the
`classes.txt` that `icd-coco-to-voc` and `icd-synthetic` write. PASCAL VOC's 20 classes (the
release's, docs/release.md section 1) are the default wherever no list is given. Everything
that counts classes follows the list: image labels (class index = line - 1), `num_cls`, seeds
and label maps (class index + 1), the CRF's C + 1 labels, evaluation over C + 1 classes, palettes.
"""
from __future__ import annotations

import colorsys
import os
import unicodedata
from typing import Optional, Sequence, Tuple

import numpy as np

from ..constants import IGNORE_LABEL
from ..io import atomic_path

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
BACKGROUND = "background"
MAX_CLASSES = IGNORE_LABEL - 1   # ids 1..254 in an 8-bit label map; 255 means "ignore"
IGNORE_COLOUR = (224, 224, 192)  # VOC's colour of 255
GOLDEN_ANGLE = 0.381966          # hue step (1 - 1/phi of a turn): neighbours never look alike


def read_classes(path: Optional[str] = None) -> Tuple[str, ...]:
    """The foreground class names of a class-list file, in id order; VOC's 20 when `path` is
    None or "".

    One name per line (leading/trailing spaces dropped, inner spaces kept: COCO's "traffic
    light"); blank lines after the last name are allowed. Errors name the file and the line:
    an empty name, a duplicate, `background` listed (it is implicit, id 0), more than 254 names.
    """
    if not path:
        return VOC_CLASSES
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: class-list file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: class list is not UTF-8 text ({e.reason})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: class list is empty (expected one class name per line)")
    return check_classes(lines, path)


def check_classes(names: Sequence[str], source: str = "classes",
                  entry: str = "line") -> Tuple[str, ...]:
    """`names` stripped of surrounding spaces, checked to be a class list: at least one, each a
    line of a class-list file (`class_name_problem`), no duplicates, no `background` (implicit,
    id 0), at most 254. Errors read `<source>: <entry> <k>: <problem>` (k from 1)."""
    names = tuple(str(name).strip() for name in names)
    if not names:
        raise ValueError(f"{source}: no classes given")
    first = {}
    for number, name in enumerate(names, 1):
        if not name:
            raise ValueError(f"{source}: {entry} {number}: empty class name")
        problem = class_name_problem(name)
        if problem:
            raise ValueError(f"{source}: {entry} {number}: class name {name!r} {problem}")
        if name.lower() == BACKGROUND:
            raise ValueError(f"{source}: {entry} {number}: {name!r} must not be listed: the "
                             f"background is implicit (label 0), the list holds foreground "
                             f"classes only")
        if name in first:
            raise ValueError(f"{source}: {entry} {number}: duplicate class name {name!r} (first "
                             f"on {entry} {first[name]})")
        first[name] = number
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{source}: {len(names)} classes, at most {MAX_CLASSES} fit an 8-bit "
                         f"label map (ids 1..{MAX_CLASSES}, {IGNORE_LABEL} = ignore)")
    return names


def class_name_problem(name: str) -> str:
    """Why `name` cannot be one line of a class-list file that reads back as `name`, or "" when
    it can: not empty, no blanks at either end (`read_classes` drops them), no control or
    invisible character (a newline would make two classes of one)."""
    if not name.strip():
        return "is empty"
    if name != name.strip():
        return "has blanks at its start or end"
    for char in name:
        if unicodedata.category(char).startswith("C"):
            return f"holds the control or invisible character U+{ord(char):04X}"
    return ""


def write_classes(path: str, classes: Sequence[str]) -> None:
    """Write a class-list file atomically (one name per line, read back by `read_classes`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in classes))


def segmentation_classes(classes: Sequence[str] = VOC_CLASSES) -> Tuple[str, ...]:
    """The C + 1 names of the label ids 0..C: background, then the foreground classes."""
    return (BACKGROUND, *classes)


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


def class_palette(classes: Sequence[str] = VOC_CLASSES) -> np.ndarray:
    """(256, 3) uint8 RGB colours of the label ids, for pictures made for people.

    VOC's own colour map for VOC's list; for any other list a deterministic one: id 0 black,
    ids 1..254 hues a golden angle apart (so any C gets distinct neighbouring colours) at three
    alternating brightness levels, 255 VOC's ignore colour.
    """
    if tuple(classes) == VOC_CLASSES:
        return voc_palette()
    palette = np.zeros((256, 3), np.uint8)
    for i in range(1, MAX_CLASSES + 1):
        rgb = colorsys.hsv_to_rgb(((i - 1) * GOLDEN_ANGLE) % 1.0, 0.75, (1.0, 0.8, 0.6)[i % 3])
        palette[i] = np.round(np.array(rgb) * 255)
    palette[IGNORE_LABEL] = IGNORE_COLOUR
    return palette


# The file a dataset names its classes in: `<dataset>/classes.txt`, beside the data folders
# (JPEGImages, Annotations, SegmentationClass), as icd-synthetic and icd-coco-to-voc write it.
CLASS_FILE = "classes.txt"


def dataset_class_file(*roots: Optional[str]) -> Optional[str]:
    """The `classes.txt` of the dataset that holds the data folders `roots` (in the parent folder
    of each, e.g. `data/mine/classes.txt` for `data/mine/JPEGImages`), the first found; None when
    no root has one (PASCAL VOC ships none)."""
    for root in roots:
        if root:
            path = os.path.join(os.path.dirname(os.path.normpath(os.path.abspath(root))),
                                CLASS_FILE)
            if os.path.isfile(path):
                return path
    return None


def show_classes(classes: Sequence[str], shown: int = 8) -> str:
    """A class list for a message: `6 classes [aeroplane, bird, ...]`, the first `shown` names."""
    more = ", ..." if len(classes) > shown else ""
    return f"{len(classes)} classes [{', '.join(classes[:shown])}{more}]"


def class_difference(expected: Sequence[str], given: Sequence[str]) -> Optional[str]:
    """None when the lists are equal (names and order); else their first difference, e.g.
    `label 2 is 'bird' / 'car'` or `7 / 3 classes`."""
    expected, given = tuple(expected), tuple(given)
    if expected == given:
        return None
    for label, (a, b) in enumerate(zip(expected, given), 1):
        if a != b:
            return f"label {label} is {a!r} / {b!r}"
    return f"{len(expected)} / {len(given)} classes"


def require_classes(expected: Sequence[str], given: Sequence[str], source: str, made: str,
                    given_source: str, hint: str = "pass the --classes file of the data it "
                                                   "was made from") -> None:
    """ValueError naming both lists and their first difference unless `given` is `expected`
    (names and order): a list in another order maps every label to the wrong class.

    The message reads `<source>: <made> <expected>, but <given_source> gives <given>
    (<difference>); <hint>`, e.g. source a checkpoint's run record, made "was trained on",
    given_source "--classes c.txt"."""
    difference = class_difference(expected, given)
    if difference is not None:
        raise ValueError(f"{source}: {made} {show_classes(expected)}, but {given_source} gives "
                         f"{show_classes(given)} ({difference}); {hint}")


def dataset_classes(path: Optional[str], *roots: Optional[str],
                    flag: str = "--classes") -> Tuple[str, ...]:
    """The class list of a command: `read_classes(path)`, checked against the dataset's own
    `classes.txt` (`dataset_class_file(*roots)`) when it has one.

    A dataset with a classes.txt is not VOC: leaving `flag` out is an error naming the file,
    and so is a list that differs from it (names and order).
    """
    found = dataset_class_file(*roots)
    if found is None:
        return read_classes(path)
    if not path:
        raise ValueError(f"{flag}: not given, but the data has a class list, {found} "
                         f"({show_classes(read_classes(found))}); pass {flag} {found} (without "
                         f"{flag} the classes are PASCAL VOC's 20)")
    classes = read_classes(path)
    require_classes(read_classes(found), classes, found, "the data's class list has",
                    f"{flag} {path}", f"pass {flag} {found}")
    return classes


def classes_of_data(classes: Optional[Sequence[str]], *roots: Optional[str]) -> Tuple[str, ...]:
    """The class list of a library function over the data folders `roots`: `classes` as given,
    or, left out (None), PASCAL VOC's 20, unless the data has its own classes.txt: then leaving
    it out is an error naming the file (`dataset_classes`), never silently VOC."""
    if classes is not None:
        return tuple(classes)
    found = dataset_class_file(*roots)
    if found is not None:
        raise ValueError(f"classes: not given, but the data has a class list, {found} "
                         f"({show_classes(read_classes(found))}); pass "
                         f"classes=read_classes({found!r}) (left out, they are PASCAL VOC's 20)")
    return VOC_CLASSES
