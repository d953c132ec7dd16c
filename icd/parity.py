"""Parity bundles: run our Gluon model on the release's recorded steps and report errors.

A bundle folder (format in README "Parity with the release") holds the starting parameters,
one training batch, an inference batch and the release's outputs and parameters after each
step. We replay the steps on one device at constant lr with the warm-up counter starting at
`warmup_iters`, and compare every tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from .checkpoint import assign, gather, read_params
from .model import ICDNet
from .model.losses import top_down_warmup
from .train import make_trainer
from .model.ops import share_moving_mean, unshare_moving_mean

OUTPUT_TOLERANCE = 1e-4  # max|ours - ref| / max(max|ref|, 1e-6)
PARAM_TOLERANCE = 1e-3   # the same on the change from the starting value, with a floor:
# a float32 parameter w changed by d is stored to ~1.2e-7 |w|, so a change below 1e-4 |w| (e.g.
# weight decay alone, or the top-down layers under the e^-10 warm-up) is judged against
# 1e-4 max|w|: 1e-3 of that floor is one unit in the last place, the finest float32 can resolve.
RESOLUTION_FLOOR = 1e-4
META_KEYS = ("num_cls", "lr", "momentum", "wd", "batch_size", "steps", "warmup_iters", "dropout")


@dataclass
class TensorError:
    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tolerance)


def relative_error(ours: np.ndarray, ref: np.ndarray, floor: float = 1e-6) -> float:
    """max|ours - ref| / max(max|ref|, floor); shapes must agree."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} differs from the reference's {ref.shape}")
    return float(np.abs(ours - ref).max(initial=0) / max(np.abs(ref).max(initial=0), floor))


def _read_bundle(folder: str):
    paths = {name: os.path.join(folder, name) for name in
             ("meta.json", "params.params", "batch.npz", "infer.npz", "expected.npz")}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: bundle file missing")
    with open(paths["meta.json"], encoding="utf-8") as f:
        meta = json.load(f)
    absent = [k for k in META_KEYS if k not in meta]
    if absent:
        raise ValueError(f"{paths['meta.json']}: missing keys {', '.join(absent)}")
    arrays = {}
    for name in ("batch.npz", "infer.npz"):
        with np.load(paths[name]) as npz:
            missing = [k for k in ("data", "superpixel", "label") if k not in npz]
            if missing:
                raise ValueError(f"{paths[name]}: missing arrays {', '.join(missing)}")
            arrays[name] = {k: npz[k].astype(np.float32) for k in ("data", "superpixel", "label")}
    expected = dict(np.load(paths["expected.npz"]))
    return meta, read_params(paths["params.params"]), arrays, expected, paths


def build_from_params(params: Dict[str, mx.nd.NDArray], meta: dict, source: str,
                      contexts: Sequence[mx.Context]) -> ICDNet:
    """ICDNet with the bundle's parameters; width read from conv1_1's channel count."""
    width = params["arg:conv1_1_weight"].shape[0] / 64.0
    net = ICDNet(num_classes=int(meta["num_cls"]), width=width, dropout=float(meta["dropout"]))
    assign(net, params, source, contexts)
    net.hybridize(static_alloc=True)
    return net


def replay_steps(net: ICDNet, batch: Dict[str, np.ndarray], meta: dict,
                 contexts: Sequence[mx.Context],
                 on_step: Optional[Callable[[List[int]], None]] = None) -> Dict[str, np.ndarray]:
    """Train `meta['steps']` steps on `batch` split over `contexts`, like the release's Module.

    `on_step`, if given, receives after each step the device order of the shared sign-flip
    store's updates (multi-device only). Returns `train/step{k}/cam_prob|icd_bu|icd_td_prob` (before step k's update) and
    `train/step{k}/arg:NAME|aux:NAME` (after it), the keys of a bundle's expected.npz.
    """
    contexts = list(contexts)
    trainer = make_trainer(net, float(meta["lr"]), float(meta["momentum"]), float(meta["wd"]))
    parts = {k: gluon.utils.split_and_load(mx.nd.array(v), contexts) for k, v in batch.items()}
    store = None
    if len(contexts) > 1:
        store = share_moving_mean(net.share_key,
                                  net.icd_accum_resign_moving_mean.data(contexts[0]), contexts)
    result = {}
    try:
        for step in range(int(meta["steps"])):
            warm = top_down_warmup(step, int(meta["warmup_iters"]))
            with autograd.record():
                outputs = [net(parts["data"][d], parts["superpixel"][d], parts["label"][d],
                               mx.nd.full((1,), warm, ctx=ctx))
                           for d, ctx in enumerate(contexts)]
            autograd.backward([out[-1] for out in outputs])
            prefix = f"train/step{step}/"
            result[prefix + "cam_prob"] = np.concatenate(
                [mx.nd.sigmoid(o[0].mean(axis=(2, 3))).asnumpy() for o in outputs])
            result[prefix + "icd_bu"] = np.concatenate([o[1].asnumpy() for o in outputs])
            result[prefix + "icd_td_prob"] = np.concatenate(
                [mx.nd.sigmoid(o[3]).asnumpy() for o in outputs])
            trainer.step(batch["data"].shape[0])
            for key, value in gather(net).items():
                result[prefix + key] = value.asnumpy()
            if store is not None and on_step is not None:
                on_step(list(store.order))
    finally:
        unshare_moving_mean(net.share_key)
    return result


def replay_infer(net: ICDNet, batch: Dict[str, np.ndarray],
                 ctx: mx.Context) -> Dict[str, np.ndarray]:
    """Inference outputs `infer/cam|icd_bu|icd_bu_sp|icd_td` on `batch`, (N, C, h, w) each."""
    inputs = [mx.nd.array(batch[k], ctx=ctx) for k in ("data", "superpixel", "label")]
    outputs = net(*inputs, mx.nd.ones((1,), ctx=ctx))
    return {f"infer/{name}": value.asnumpy()
            for name, value in zip(("cam", "icd_bu", "icd_bu_sp", "icd_td"), outputs)}


def compare(ours: Dict[str, np.ndarray], expected: Dict[str, np.ndarray],
            start: Dict[str, np.ndarray], source: str = "expected") -> List[TensorError]:
    """Errors of every expected tensor: outputs directly, parameters on their change from start."""
    errors = []
    for name, ref in expected.items():
        if name not in ours:
            raise ValueError(f"{source}: {name} has no counterpart in our model")
        key = name.rsplit("/", 1)[-1]
        if key.startswith(("arg:", "aux:")):
            floor = max(1e-6, RESOLUTION_FLOOR * float(np.abs(start[key]).max(initial=0)))
            errors.append(TensorError(name, relative_error(ours[name] - start[key],
                                                           ref - start[key], floor),
                                      PARAM_TOLERANCE))
        else:
            errors.append(TensorError(name, relative_error(ours[name], ref), OUTPUT_TOLERANCE))
    return errors


def check_bundle(folder: str, contexts: Sequence[mx.Context] = None) -> List[TensorError]:
    """Replay a bundle with our model; one TensorError per tensor of its expected.npz."""
    contexts = list(contexts or [mx.cpu()])
    meta, params, arrays, expected, paths = _read_bundle(folder)
    net = build_from_params(params, meta, paths["params.params"], contexts)
    start = {k: v.asnumpy() for k, v in params.items()}
    ours = replay_steps(net, arrays["batch.npz"], meta, contexts)
    ours.update(replay_infer(net, arrays["infer.npz"], contexts[0]))
    missing = [f"train/step{k}/{n}" for k in range(int(meta["steps"]))
               for n in ("cam_prob", "icd_bu", "icd_td_prob")] + \
        [f"infer/{n}" for n in ("cam", "icd_bu", "icd_bu_sp", "icd_td")]
    missing = [m for m in missing if m not in expected]
    if missing:
        raise ValueError(f"{paths['expected.npz']}: missing {', '.join(missing)}")
    return compare(ours, expected, start, paths["expected.npz"])


def summary(errors: List[TensorError]) -> str:
    """The checker's last line: count, worst error (relative to its tolerance), PASS/FAIL."""
    worst = max(errors, key=lambda e: e.error / e.tolerance)
    verdict = "PASS" if all(e.ok for e in errors) else "FAIL"
    return f"parity: {len(errors)} tensors, worst {worst.error:.3g} at {worst.name}: {verdict}"
