"""Gluon datasets and loaders of the release's pipeline (section 5).

Determinism: a training item is keyed by (epoch, index) and draws its augmentation from
``np.random.default_rng([seed, epoch, index])``; the per-epoch shuffle comes from
``default_rng([seed, epoch])``. The epoch travels with the sampled key (Gluon copies the dataset
into its worker processes once, when the loader is built), so a given seed yields the same
batches whatever the number of worker processes.

Bytes: images and superpixel ids leave the loader as uint8 (a quarter of float32's bytes through
the worker pipes and the host-to-device copy); `icd.devices.split_batch` casts them to float32 on
the device, which is exact for 0..255, so the network sees the release's float RGB 0..255.
Defaults: one worker process per core; batches in ordinary host memory. `pin_memory` (opt-in)
puts them in page-locked memory, whose copy to a GPU can run asynchronously, but MXNet 1.9.1 does
not pool it: every batch is a cudaHostAlloc / cudaFreeHost pair (docs/gpus.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from mxnet import gluon

from ..devices import shard_names
from ..constants import MAX_REGIONS
from .classes import read_classes
from .superpixels import read_superpixels
from .transforms import INFER_SIZE, TRAIN_SIZE, infer_transform, train_transform
from .classes import classes_of_data
from .voc import VOC_CLASSES, check_exif_turn, multi_hot, read_image, read_image_labels, \
    read_list


@dataclass(frozen=True)
class DataPaths:
    """The data that travels through every stage, as one value: images `<image_root>/<name>.jpg`,
    image-level labels `<annotation_root>/<name>.xml`, the list file of the names, and the class
    list in label order (None: PASCAL VOC's 20 unless the data has its own classes.txt,
    `icd.data.classes.classes_of_data`) and, for the stages that score against them, the
    ground-truth masks `<gt_root>/<name>.png` (None: not given). A stage that can do without a
    root says what None means there (e.g. icd.evaluate.evaluate without annotations)."""
    image_root: Optional[str]
    annotation_root: Optional[str]
    data_list: str
    classes: Optional[Tuple[str, ...]] = None
    gt_root: Optional[str] = None

    def __post_init__(self):
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def class_names(self) -> Tuple[str, ...]:
        """The foreground classes in label order (VOC's 20 when `classes` is None)."""
        return self.classes if self.classes is not None else read_classes(None)

    @classmethod
    def of(cls, cfg: Any) -> "DataPaths":
        """The data of a Config: its roots, list and class list (`class_names`)."""
        return cls(cfg.image_root, cfg.annotation_root, cfg.data_list, cfg.class_names)


def default_workers() -> int:
    """Loader worker processes by default: the number of cores."""
    return os.cpu_count() or 1


def _loader_arrays(image: np.ndarray, superpixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(S, S, 3) uint8 image, (S, S) ids < 256 -> (3, S, S) uint8, (S, S) uint8 (module doc)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), np.uint8), superpixels.astype(np.uint8)


class _SuperpixelImages(gluon.data.Dataset):
    """Names, multi-hot labels over `classes` and loading of (image, superpixels) pairs of a
    list."""

    def __init__(self, image_root: str, superpixel_root: str, annotation_root: str,
                 data_list: str, classes: Sequence[str] = VOC_CLASSES):
        self.image_root = image_root
        self.superpixel_root = superpixel_root
        self.names: List[str] = read_list(data_list)
        # labels are parsed up front so that a bad annotation fails before training starts
        self.labels = np.stack([
            multi_hot(read_image_labels(os.path.join(annotation_root, f"{name}.xml"), classes),
                      len(classes))
            for name in self.names])

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB image and its (H, W) int32 superpixels."""
        name = self.names[index]
        image_path = os.path.join(self.image_root, f"{name}.jpg")
        image = read_image(image_path)
        path = os.path.join(self.superpixel_root, f"{name}.png")
        try:
            superpixels = read_superpixels(path, expected_shape=image.shape)
        except ValueError:   # when an EXIF orientation explains it, say so
            check_exif_turn(image_path, image.shape, path, read_superpixels(path).shape,
                            "superpixel map")
            raise
        if superpixels.max() >= MAX_REGIONS:
            raise ValueError(f"{path}: superpixel id {superpixels.max()} >= {MAX_REGIONS}; "
                             f"ids must be 0..{MAX_REGIONS - 1}")
        return image, superpixels


class TrainDataset(_SuperpixelImages):
    """Augmented training items (release, section 5).

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` for epoch 0) is
    (data (3, S, S) uint8 RGB 0..255, superpixels (S, S) uint8 ids < NUM_SUPERPIXEL_IDS,
    label (C,) float32 multi-hot over `classes`).
    """

    def __init__(self, image_root: str, superpixel_root: str, annotation_root: str,
                 data_list: str, image_size: int = TRAIN_SIZE, seed: int = 0,
                 classes: Sequence[str] = VOC_CLASSES):
        super().__init__(image_root, superpixel_root, annotation_root, data_list, classes)
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, superpixels = self.load(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        image, superpixels = train_transform(image, superpixels, self.image_size, rng)
        return (*_loader_arrays(image, superpixels), self.labels[index])


class EpochShuffleSampler(gluon.data.Sampler):
    """Shuffled (epoch, index) keys; the order of epoch e comes from default_rng([seed, e]).

    Each pass over the sampler is one epoch and advances the epoch counter; set_epoch(e)
    chooses the epoch of the next pass (e.g. when resuming).
    Shard (I, N) with `block` B (several workers, icd.distributed): the order is cut into global
    batches of N * B keys (the last partial one dropped) and shard I yields block I of each, so the
    N shards together yield the single-machine epoch of batch N * B, rank-major in every batch.
    """

    def __init__(self, length: int, seed: int = 0, shard: Tuple[int, int] = (0, 1),
                 block: int = 1):
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.shard = shard
        self.block = block

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
        rank, count = self.shard
        if count > 1:
            batches = order[:len(self) * count].reshape((-1, count, self.block))
            order = batches[:, rank].reshape(-1)
        return iter([(epoch, int(index)) for index in order])

    def __len__(self) -> int:
        count = self.shard[1]
        if count == 1:
            return self.length
        return self.length // (count * self.block) * self.block


class TrainLoader(gluon.data.DataLoader):
    """DataLoader over a TrainDataset: reshuffled every epoch, last partial batch dropped."""

    def __init__(self, dataset: TrainDataset, batch_size: int, num_workers: int = 0,
                 shard: Tuple[int, int] = (0, 1), pin_memory: bool = False):
        self.dataset = dataset
        self.epoch_sampler = EpochShuffleSampler(len(dataset), dataset.seed, shard, batch_size)
        # release: drop the last partial batch
        super().__init__(dataset, num_workers=num_workers, pin_memory=pin_memory,
                         batch_sampler=gluon.data.BatchSampler(
                             self.epoch_sampler, batch_size, last_batch="discard"))

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over the loader produce the batches of `epoch` (0-based)."""
        self.epoch_sampler.set_epoch(epoch)


def train_loader(image_root: str, superpixel_root: str, annotation_root: str, data_list: str,
                 image_size: int = TRAIN_SIZE, batch_size: int = 32,
                 num_workers: Optional[int] = None, seed: int = 0,
                 shard: Tuple[int, int] = (0, 1),
                 classes: Optional[Sequence[str]] = None,
                 pin_memory: bool = False) -> TrainLoader:
    """Training batches (data (B,3,S,S) uint8, superpixels (B,S,S) uint8, labels (B,C) float32).

    Images are `<image_root>/<name>.jpg`, superpixels `<superpixel_root>/<name>.png`, labels
    from `<annotation_root>/<name>.xml` over the C `classes`, names from the `data_list` file.
    `shard` (I, N): worker I of N, B per worker (EpochShuffleSampler). `num_workers` None: one
    per core; `pin_memory`: page-locked batches (module doc).
    """
    classes = classes_of_data(classes, image_root, annotation_root)
    dataset = TrainDataset(image_root, superpixel_root, annotation_root, data_list,
                           image_size=image_size, seed=seed, classes=classes)
    if len(dataset) < batch_size * shard[1]:
        raise ValueError(f"{data_list}: {len(dataset)} images cannot fill one batch of "
                         f"{batch_size * shard[1]} (the last partial batch is dropped)")
    return TrainLoader(dataset, batch_size,
                       default_workers() if num_workers is None else num_workers, shard,
                       pin_memory)


class InferDataset(_SuperpixelImages):
    """Inference items over the list padded by repeating its head to a multiple of the batch.

    ``dataset[i]`` is (data (3, S, S) uint8 RGB, superpixels (S, S) uint8, label (C,)
    float32, name index (int32, into ``names``), original (h, w) int32).
    """

    def __init__(self, image_root: str, superpixel_root: str, annotation_root: str,
                 data_list: str, image_size: int = INFER_SIZE, batch_size: int = 4,
                 shard: Tuple[int, int] = (0, 1), classes: Sequence[str] = VOC_CLASSES):
        super().__init__(image_root, superpixel_root, annotation_root, data_list, classes)
        self.image_size = image_size
        indices = shard_names(range(len(self.names)), shard)   # shard (I, N) of the list
        # release: the list is padded by repeating its head to a multiple of the batch size
        padded = -(-len(indices) // batch_size) * batch_size
        self.order = [indices[i % len(indices)] for i in range(padded)]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int):
        index = self.order[position]
        image, superpixels = self.load(index)
        hw = np.array(image.shape[:2], np.int32)
        image, superpixels = infer_transform(image, superpixels, self.image_size)
        return (*_loader_arrays(image, superpixels), self.labels[index], np.int32(index), hw)


def infer_loader(image_root: str, superpixel_root: str, annotation_root: str, data_list: str,
                 image_size: int = INFER_SIZE, batch_size: int = 4,
                 num_workers: int = 0,
                 shard: Tuple[int, int] = (0, 1),
                 classes: Optional[Sequence[str]] = None,
                 pin_memory: bool = False) -> gluon.data.DataLoader:
    """Inference batches in list order (data, superpixels, labels over `classes`, name indices,
    (h, w)) of shard (I, N) of the list; `pin_memory` as train_loader's."""
    classes = classes_of_data(classes, image_root, annotation_root)
    dataset = InferDataset(image_root, superpixel_root, annotation_root, data_list,
                           image_size=image_size, batch_size=batch_size, shard=shard,
                           classes=classes)
    loader = gluon.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                   last_batch="keep", num_workers=num_workers,
                                   pin_memory=pin_memory)
    loader.dataset = dataset   # public, as TrainLoader's (Gluon keeps it private)
    return loader
