"""Devices of a run: `--gpus 0,1` / `--cpus N` -> MXNet contexts; `--shard I/N` -> the part of
a list one machine processes (the workers of a training job: icd.distributed).

Every device named is checked to exist, so a wrong flag fails before anything is built.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import gluon


def available_gpus() -> int:
    """Number of GPUs MXNet can use (0 with a CPU build of MXNet or without a CUDA driver)."""
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:
        return 0


def _check_gpu(index: int, flag: str) -> None:
    count = available_gpus()
    if index >= count:
        seen = f"MXNet sees {count} GPU(s) (ids 0..{count - 1})" if count else \
            "MXNet sees no GPU (a CPU build of MXNet, or no CUDA driver); use --cpus N"
        raise ValueError(f"{flag}: no GPU {index}: {seen}")


def parse_context(text: str, flag: str = "--ctx") -> mx.Context:
    """'cpu(0)', 'gpu(1)', 'cpu' or 'gpu1' -> mx.Context; a GPU must exist."""
    match = re.fullmatch(r"\s*(cpu|gpu)\s*\(?\s*(\d*)\s*\)?\s*", text)
    if not match:
        raise ValueError(f"{flag}: not a device: {text!r} (expected e.g. cpu(0) or gpu(1))")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "gpu":
        _check_gpu(index, flag)
    return mx.Context(kind, index)


def parse_gpus(gpus: str) -> List[int]:
    """The release's `--gpus 0,1` -> [0, 1]: distinct non-negative ids of existing GPUs."""
    ids = []
    for item in gpus.split(","):
        if not item.strip().isdigit():
            raise ValueError(f"--gpus: not a GPU id: {item.strip()!r} in {gpus!r} "
                             "(expected ids like 0 or 0,1)")
        ids.append(int(item))
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus: GPU ids repeat in {gpus!r}")
    for index in ids:
        _check_gpu(index, "--gpus")
    return ids


def parse_devices(gpus: str = "", cpus: int = 0) -> List[mx.Context]:
    """Devices from the release's `--gpus 0,1` or our `--cpus N`; neither means one CPU."""
    if gpus and cpus:
        raise ValueError("--gpus, --cpus: give either GPUs or CPU contexts, not both")
    if cpus < 0:
        raise ValueError(f"--cpus: must be a positive number of CPU contexts, got {cpus}")
    if gpus:
        return [mx.gpu(i) for i in parse_gpus(gpus)]
    return [mx.cpu(i) for i in range(max(cpus, 1))]


def shard_names(names: Sequence[str], shard: Tuple[int, int] = (0, 1)) -> List[str]:
    """Shard (I, N) of a name list: every N-th name from the I-th; the N shards are disjoint and
    their union is the list."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
    return list(names[index::count])


def split_batch(batch: Mapping[str, mx.nd.NDArray],
                contexts: Sequence[mx.Context]) -> List[Dict[str, mx.nd.NDArray]]:
    """A batch {input name: (N, ...) array} split along N over `contexts` (data parallelism,
    the release's Module: device d gets a contiguous slice): one {input name: slice} per device."""
    parts = {name: gluon.utils.split_and_load(array, list(contexts), even_split=False)
             for name, array in batch.items()}
    # uint8 images and ids travel as bytes and become float32 on the device (exact for 0..255)
    parts = {name: [a.astype("float32") if a.dtype == np.uint8 else a for a in arrays]
             for name, arrays in parts.items()}
    return [{name: arrays[d] for name, arrays in parts.items()}
            for d in range(len(next(iter(parts.values()))))]
