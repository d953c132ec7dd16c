"""(image, label map) pairs for training DeepLab on seeds or ground-truth masks.

Images are `<image_root>/<name>.jpg`, label maps `<label_root>/<name>.png` (single-channel index
or palette PNGs read with `icd.data.voc.read_mask`: ids 0..C, 255 = ignore), e.g. the seeds
`results/seeds/crf` or `SegmentationClassAug`. Augmentation: the common DeepLab-LargeFOV one,
random scale in [0.5, 1.5] (continuous), mirror with p = 0.5, pad bottom/right to the crop size
(image with the mean 127, labels with 255), random crop (321 on VOC).

Determinism as in `icd.data.dataset`: item (epoch, index) draws from
``np.random.default_rng([seed, epoch, index])`` and the epoch order from
``default_rng([seed, epoch])`` (the same `TrainLoader`), so a seed gives the same batches
whatever the number of worker processes.
"""
from __future__ import annotations

import os
from typing import List, Tuple, Union

import numpy as np
from mxnet import gluon

from .dataset import TrainLoader
from .transforms import TRAIN_SIZE, crop, mirror, pad_to, rescale
from .voc import IGNORE_LABEL, NUM_CLASSES, check_exif_turn, read_image, read_list, read_mask

SCALE_RANGE = (0.5, 1.5)  # DeepLab-LargeFOV: continuous random scale

Pair = Tuple[np.ndarray, np.ndarray]


def segmentation_transform(image: np.ndarray, label: np.ndarray, size: int,
                           rng: np.random.Generator,
                           scale_range: Tuple[float, float] = SCALE_RANGE) -> Pair:
    """(H, W, 3) uint8 RGB, (H, W) uint8 ids -> (S, S, 3) uint8, (S, S) uint8.

    Random scale s ~ U(scale_range) (bilinear image, nearest labels), mirror with p = 0.5, pad
    bottom/right to >= S (image 127, labels 255), random S x S crop.
    """
    image, label = rescale(image, label, float(rng.uniform(*scale_range)))
    if rng.random() < 0.5:
        image, label = mirror(image, label)
    height, width = label.shape
    image, label = pad_to(image, label.astype(np.int32), size)
    label[height:], label[:, width:] = IGNORE_LABEL, IGNORE_LABEL   # not pad_to's region id
    top = int(rng.integers(0, image.shape[0] - size + 1))
    left = int(rng.integers(0, image.shape[1] - size + 1))
    image, label = crop(image, label, top, left, size)
    return np.ascontiguousarray(image), np.ascontiguousarray(label, np.uint8)


class SegmentationDataset(gluon.data.Dataset):
    """Augmented (image, label map) training items.

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` for epoch 0) is
    (data (3, S, S) uint8 RGB, label (S, S) uint8 ids 0..num_classes or 255): bytes through
    the loader, cast to float32 on the device (icd.devices.split_batch, exact) as the ICD
    loaders' (icd.data.dataset module doc).
    """

    def __init__(self, image_root: str, label_root: str, data_list: str,
                 crop_size: int = TRAIN_SIZE, num_classes: int = NUM_CLASSES, seed: int = 0,
                 scale_range: Tuple[float, float] = SCALE_RANGE):
        self.image_root, self.label_root = image_root, label_root
        self.names: List[str] = read_list(data_list)
        self.crop_size, self.num_classes, self.seed = crop_size, num_classes, seed
        self.scale_range = scale_range
        # a label folder made for another list fails here, not hours into training
        missing = [n for n in self.names if not os.path.isfile(self.label_path(n))]
        if missing:
            raise FileNotFoundError(
                f"{label_root}: no label map for {len(missing)} of the {len(self.names)} images "
                f"of {data_list} (first: {self.label_path(missing[0])})")

    def label_path(self, name: str) -> str:
        return os.path.join(self.label_root, f"{name}.png")

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Pair:
        """(H, W, 3) uint8 RGB image and its (H, W) uint8 label map, checked against each other."""
        name = self.names[index]
        image_path = os.path.join(self.image_root, f"{name}.jpg")
        image = read_image(image_path)
        path = self.label_path(name)
        label = read_mask(path)
        check_exif_turn(image_path, image.shape, path, label.shape, "label map")
        if label.shape != image.shape[:2]:
            raise ValueError(f"{path}: label map {label.shape} does not match the image "
                             f"{image.shape[:2]}")
        bad = (label > self.num_classes) & (label != IGNORE_LABEL)
        if bad.any():
            raise ValueError(f"{path}: label {int(label[bad][0])} outside 0..{self.num_classes} "
                             f"and not {IGNORE_LABEL} (ignore)")
        return image, label

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.load(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        image, label = segmentation_transform(image, label, self.crop_size, rng, self.scale_range)
        return np.ascontiguousarray(image.transpose(2, 0, 1)), label


def segmentation_loader(image_root: str, label_root: str, data_list: str,
                        crop_size: int = TRAIN_SIZE, batch_size: int = 20,
                        num_classes: int = NUM_CLASSES,
                        num_workers: int = min(4, os.cpu_count() or 1),
                        seed: int = 0, shard: Tuple[int, int] = (0, 1),
                        pin_memory: bool = False) -> TrainLoader:
    """Training batches (data (B, 3, S, S), label (B, S, S)), uint8, reshuffled every epoch
    (`set_epoch` chooses the epoch), last partial batch dropped. Default batch 20: DeepLab-
    LargeFOV's (Chen et al., ICLR 2015). A missing label map is an error naming it, up front.
    `shard` (I, N): worker I of N, B per worker (EpochShuffleSampler); `pin_memory` as
    train_loader's."""
    dataset = SegmentationDataset(image_root, label_root, data_list, crop_size, num_classes,
                                  seed)
    if len(dataset) < batch_size * shard[1]:
        raise ValueError(f"{data_list}: {len(dataset)} images cannot fill one batch of "
                         f"{batch_size * shard[1]} (the last partial batch is dropped)")
    return TrainLoader(dataset, batch_size, num_workers, shard, pin_memory)
