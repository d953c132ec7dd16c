"""Score maps of a trained model, in the release's result layout (docs/release.md section 6).

For each image with sorted present classes L, at feature resolution of the image padded to
`infer_size`:
  scores_cam/<name>.npy        x_cam[L]   CAM logits
  scores_icd/<name>.npy        S''[L]     adapted ICD scores (top-down), used for seeds
  scores_icd_bu/<name>.npy     S[L]       bottom-up scores after the sign flip (Table 3)
  scores_icd_bu_sp/<name>.npy  S'[L]      superpixel-refined bottom-up scores (Table 3)
  scores_demo/class_<c>.jpg    demo sheets: image, CAM, ICD per row, a few images per class
A CAM-only model writes scores_cam only.

Each score folder gets a `provenance.json` (see icd.provenance): the model, checkpoint file (size,
mtime), inference size, roots and class list; images larger than the inference size, of which
only the centre crop is scored (release), are logged and listed in it, so that the seed step can
name them.
"""
from __future__ import annotations

import collections
import logging
import os
import re
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Deque, Dict, Iterator, List, Sequence, Tuple

import cv2
import mxnet as mx
import numpy as np
from tqdm import tqdm

from . import amp
from .checkpoint import load_checkpoint
from .config import Config
from .data.dataset import infer_loader
from .data.transforms import infer_window
from .io import atomic_path, require_finite
from .model import model_from_config, model_options
from .data.voc import write_image
from .devices import split_batch
from .provenance import file_identity, producing, require_checkpoint_classes
from .visualize import score_panel

log = logging.getLogger(__name__)

# network output -> results folder (the release's names for cam and icd_td)
OUTPUT_FOLDERS = {"cam": "scores_cam", "icd_td": "scores_icd", "icd_bu": "scores_icd_bu",
                 "icd_bu_sp": "scores_icd_bu_sp"}
DEMO_ROWS = 4
WRITE_THREADS = 2   # .npy writers running beside the devices


def infer_settings(cfg: Config, params: str) -> Dict[str, object]:
    """What the score folders' provenance records (and compares): model, checkpoint, size, roots."""
    epoch = re.search(r"-(\d{4})\.params$", params)
    return {"model": cfg.model, "model_options": model_options(cfg.model, cfg),
            "checkpoint": file_identity(params), "epoch": int(epoch.group(1)) if epoch else None,
            "infer_size": cfg.infer_size, "image_root": os.path.abspath(cfg.image_root),
            "superpixel_root": os.path.abspath(cfg.superpixel_root),
            "classes": list(cfg.class_names), "amp": cfg.amp}


def inference_network(cfg: Config, params: str, contexts: Sequence[mx.Context]
                      ) -> mx.gluon.HybridBlock:
    """The network of `cfg` with the checkpoint `params` on `contexts`, ready for inference
    (icd-infer, icd-infer-seg, icd-run): in `cfg.amp` precision (enabled here too, for a process
    that did not train it), hybridized with static memory."""
    amp.enable(cfg.amp, contexts)
    net = model_from_config(cfg)
    load_checkpoint(net, params, contexts)
    net.hybridize(static_alloc=True)
    return net


def infer(cfg: Config, params: str, out_dir: str, contexts: Sequence[mx.Context],
          shard: Tuple[int, int] = (0, 1)) -> List[str]:
    """Write the score maps of every image of `cfg.data_list` (of its shard (I, N):
    icd.devices.shard_names); returns the image names.

    Raises ProvenanceError before writing if a score folder holds results of other settings
    (unless cfg.overwrite, which clears them), ValueError if the checkpoint's run record names
    another class list than cfg's; a failure leaves the folders marked failed.
    """
    require_checkpoint_classes(params, cfg.class_names)   # its scores' class order
    net = inference_network(cfg, params, contexts)
    loader = infer_loader(cfg.image_root, cfg.superpixel_root, cfg.annotation_root,
                          cfg.data_list, image_size=cfg.infer_size,
                          batch_size=cfg.infer_batch_size, num_workers=cfg.num_workers,
                          shard=shard, classes=cfg.class_names)
    names = loader.dataset.names
    folders = [os.path.join(out_dir, OUTPUT_FOLDERS[k]) for k in net.output_names
               if k in OUTPUT_FOLDERS]
    with producing(folders, "infer", infer_settings(cfg, params), cfg.overwrite, shard,
                   names) as notes:
        with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="infer") as pool:
            written = _write_scores(net, loader, names, out_dir, contexts, cfg.infer_size,
                                    notes.setdefault("cropped", {}), pool)
    return [n for n in names if n in written]


def _queue(net, batch, contexts: Sequence[mx.Context]) -> Tuple[list, List[dict]]:
    """Queue one loader batch's forward on the devices: (the batch, outputs of each device)."""
    data, superpixel, label = batch[:3]
    parts = split_batch({"data": data, "superpixel": superpixel, "label": label}, contexts)
    # float32 score maps whatever the precision (--amp: a convolution's output is low precision)
    outputs = [{name: out.astype("float32", copy=False) for name, out in
                zip(net.output_names, net(*[part[n] for n in net.infer_input_names]))}
               for part in parts]
    return batch, outputs


def _pipelined(net, loader, contexts: Sequence[mx.Context]) -> Iterator[Tuple[list, List[dict]]]:
    """`_queue` of every batch, batch t+1 queued on the devices before batch t is yielded (and
    read back): the devices never wait for the host's writing."""
    queued = None
    for batch in tqdm(loader, desc="infer", disable=None):
        current, queued = queued, _queue(net, batch, contexts)
        if current is not None:
            yield current
    if queued is not None:
        yield queued


def _save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _write_scores(net, loader, names: List[str], out_dir: str, contexts: Sequence[mx.Context],
                  size: int, cropped: Dict[str, dict], pool: Executor) -> set:
    """The inference loop; fills `cropped` with the images larger than `size`.

    Pipelined (`_pipelined`); the .npy files are written by `pool` while the devices work (the
    files of a serial loop; each is written atomically and an error names it).
    """
    written = set()
    demo: Dict[int, list] = {}
    writes: Deque[Future] = collections.deque()
    for (data, superpixel, label, index, hw), outputs in _pipelined(net, loader, contexts):
        merged = {k: np.concatenate([o[k].asnumpy() for o in outputs]) for k in outputs[0]
                  if k in OUTPUT_FOLDERS}
        labels, index, hw = label.asnumpy(), index.asnumpy(), hw.asnumpy()
        for j in range(data.shape[0]):
            name = names[int(index[j])]
            if name in written:       # release: the list is padded by repeating its head
                continue
            written.add(name)
            h, w = (int(v) for v in hw[j])
            if h > size or w > size:
                top, left = infer_window(h, w, size)
                log.warning("%s: %dx%d image is larger than the inference size %d; as in the "
                            "release only rows %d:%d, columns %d:%d are scored", name, h, w,
                            size, top, top + size, left, left + size)
                cropped[name] = {"size": [h, w], "window": [top, left, size]}
            present = np.flatnonzero(labels[j])
            for key, array in merged.items():
                path = os.path.join(out_dir, OUTPUT_FOLDERS[key], name + ".npy")
                require_finite(array[j, present], f"{path}: scores of {name}")
                writes.append(pool.submit(_save_npy, path, array[j, present].astype(np.float32)))
            image = data[j].asnumpy().transpose(1, 2, 0)[:h, :w]
            shown = [k for k in ("cam", "icd_td") if k in merged]
            for c in present:
                rows = demo.setdefault(int(c), [])
                if len(rows) < DEMO_ROWS:
                    rows.append(_crop_panel(image, [merged[k][j, c] for k in shown], data.shape[2]))
        while len(writes) > 4 * WRITE_THREADS:   # bounded memory; errors surface here
            writes.popleft().result()
    for write in writes:
        write.result()
    for c, rows in demo.items():
        width = max(r.shape[1] for r in rows)
        sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])
        write_image(os.path.join(out_dir, "scores_demo", f"class_{c}.jpg"), sheet)
    return written


def _crop_panel(image: np.ndarray, scores: List[np.ndarray], size: int) -> np.ndarray:
    """Demo row of an image: score maps resized to the padded input, then cropped to the image."""
    h, w = image.shape[:2]
    resized = [cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR)[:h, :w] for s in scores]
    return score_panel(image, resized)
