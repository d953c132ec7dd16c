"""Parity bundles: our Gluon ICDNet against steps recorded from the original release.

A bundle folder (format in docs/parity.md and symbols/bundle.py) holds the
starting checkpoint, one training batch, an inference batch and, for every step k, the release's
outputs of step k and its state after it.

Teacher-forced (the default): step k starts from the reference's state after step k-1 (step 0
from params.params): every parameter and aux state, the SGD momentum, the sign flip's shared
store and the warm-up value of step k. Step k's outputs, and its changes of every parameter and
aux state measured from that state, are compared with the reference's; the inference outputs
come from the reference's final state. One step from the same state is what can be judged:
several free-running steps of this model are chaotic (docs/release.md section 11: the
release perturbed by 1e-7 ends step 3 with parameter changes 10-25% off its own run, and CPUs
round differently).

Noise-aware verdicts (the default): a fixed tolerance sits at the float32 noise floor of real
bundles (section 11.1: a 1e-7 perturbation of a step's start moves conv3_2's update by 9.2e-4).
So every step is run again from its starting state perturbed by 1e-7 (relative) with
NOISE_RUNS different draws, and, on CPU contexts, once more with oneDNN capped at each of
KERNEL_CAPS (other kernels, other rounding: a bundle recorded on another CPU differs by that
much, and a threshold within it is not always crossed by the perturbed draws: measured, a
full-width bundle recorded under SSE4.1 moved fc7_ft_weight's step-1 change by 1.4e-2 on an
AVX-512 CPU whose 8 perturbed draws moved it by at most 6.9e-4); a tensor's noise is the
largest movement of our own result, on the scale of its error, and it is judged
`error <= max(tolerance, NOISE_FACTOR x noise)`. A tensor
whose noise exceeds NOISE_CAP (a threshold of the step, a ReLU, mask or argmax, lies within
rounding of the start) is reported unjudgeable and counted in the verdict line; every judged
tensor has a bound of at most NOISE_FACTOR x NOISE_CAP = 4e-3, so an error of 0.5% in any
judged tensor fails. `strict=True` keeps the fixed tolerances.

Free-running (`free_running=True`): every step continues from our own previous state, as in
training; the noise is then the movement of our whole run from a start perturbed by 1e-7, which
the chaos of several steps makes large: such tensors are unjudgeable.

Several devices: the devices' forwards run in the bundle's `device_order` (meta; the release's
order is a race), each device's own copy of the sign flip's mean starts from the bundle's
`devices:` key (a device pushes it for the classes absent from its slice, section 3.2).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from .checkpoint import assign, gather, read_params, release_key, trainer_params
from .devices import split_batch
from .engine import loop
from .io import read_json
from .model import ICDNet
from .model.losses import top_down_warmup
from .model.ops import share_moving_mean, shared_moving_mean, unshare_moving_mean
from .tasks import ICDTask

OUTPUT_TOLERANCE = 1e-4  # max|ours - ref| / max(max|ref|, 1e-6)
PARAM_TOLERANCE = 1e-3   # the same on the change from the state before the step, with a floor:
# a float32 parameter w changed by d is stored to ~1.2e-7 |w|, so a change below 1e-4 |w| (e.g.
# weight decay alone, or the top-down layers under the e^-10 warm-up) is judged against
# 1e-4 max|w|: 1e-3 of that floor is one unit in the last place, the finest float32 can resolve.
RESOLUTION_FLOOR = 1e-4
PERTURBATION = 1e-7   # relative perturbation of a step's start for the noise (section 11.1)
NOISE_RUNS = 3        # perturbed runs per check; the noise is the largest movement of the three
KERNEL_CAPS = ("SSE41", "AVX2")   # DNNL_MAX_CPU_ISA values of the kernel reruns (CPU contexts)
NOISE_FACTOR = 4.0    # judged: error <= max(tolerance, NOISE_FACTOR x noise)
NOISE_CAP = 1e-3      # noise beyond this: unjudgeable (bound would exceed 4e-3)
META_KEYS = ("num_cls", "lr", "momentum", "wd", "batch_size", "steps", "warmup_iters", "dropout")
BUNDLE_FILES = ("meta.json", "params.params", "batch.npz", "infer.npz", "expected.npz")
TRAIN_OUTPUTS = ("cam_prob", "icd_bu", "icd_td_prob")
INFER_OUTPUTS = ("cam", "icd_bu", "icd_bu_sp", "icd_td")
RESIGN_MEAN = "icd_accum_resign_moving_mean"   # the sign flip's moving mean (aux state)
STORE = "store:" + RESIGN_MEAN                 # its shared store (several devices)
DEVICES = "devices:" + RESIGN_MEAN             # each device's own copy (num_devices, C, 2)
STATE_KINDS = ("arg:", "aux:", "store:", "devices:")   # compared on their change over the step
MOMENTUM = "mom:"                              # read as state, not compared (it is the change)


@dataclass
class TensorError:
    """Error of one tensor, max|ours - ref| / `scale`; `noise` (None when strict) is the largest
    movement of our own result under the perturbed starts, divided by the same `scale`."""
    name: str
    error: float
    tolerance: float
    scale: float = 1.0
    noise: Optional[float] = None

    @property
    def bound(self) -> float:
        """max(tolerance, NOISE_FACTOR x noise), or the tolerance alone when strict."""
        return self.tolerance if self.noise is None else max(self.tolerance,
                                                             NOISE_FACTOR * self.noise)

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.bound)

    @property
    def judged(self) -> bool:
        return self.noise is None or bool(self.noise <= NOISE_CAP)

    @property
    def status(self) -> str:
        return "unjudgeable" if not self.judged else ("ok" if self.ok else "FAIL")


@dataclass
class Bundle:
    """A bundle read from its folder: float32 arrays keyed as in its files."""
    meta: dict
    params: Dict[str, np.ndarray]     # 'arg:NAME' | 'aux:NAME' at the start
    batch: Dict[str, np.ndarray]      # data (N,3,H,W), superpixel (N,H,W), label (N,C)
    infer: Dict[str, np.ndarray]      # the same for inference
    expected: Dict[str, np.ndarray]   # the reference's tensors (docs/parity.md)
    paths: Dict[str, str]             # file name -> path

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def num_devices(self) -> int:
        return int(self.meta.get("num_devices", 1))

    @property
    def device_order(self) -> List[int]:
        """The order in which the devices updated the sign flip's store (default context order)."""
        return [int(d) for d in self.meta.get("device_order", range(self.num_devices))]


def error_scale(ours: np.ndarray, ref: np.ndarray, floor: float = 1e-6) -> float:
    """max(max|ref|, floor): errors are max|ours - ref| / this; shapes must agree."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} differs from the reference's {ref.shape}")
    return max(float(np.abs(ref).max(initial=0)), floor)


# ---------------------------------------------------------------------------------------------
# reading a bundle
# ---------------------------------------------------------------------------------------------

def _load_npz(path: str) -> Dict[str, np.ndarray]:
    """All arrays of an .npz file, with errors naming it."""
    try:
        with np.load(path) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an archive")
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, AttributeError) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from None


def _read_meta(path: str) -> dict:
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    absent = [k for k in META_KEYS if k not in meta]
    if absent:
        raise ValueError(f"{path}: missing keys {', '.join(absent)}")
    for key in META_KEYS + ("num_devices",):
        if key in meta and (isinstance(meta[key], bool) or
                            not isinstance(meta[key], (int, float))):
            raise ValueError(f"{path}: {key} is {meta[key]!r}, not a number")
    devices = int(meta.get("num_devices", 1))
    order = meta.get("device_order", list(range(devices)))
    if not isinstance(order, list) or sorted(order) != list(range(devices)):
        raise ValueError(f"{path}: device_order {order!r} is not an order of the "
                         f"{devices} device(s)")
    return meta


def read_bundle(folder: str) -> Bundle:
    """Read and check a bundle folder; errors name the file and what is wrong with it."""
    paths = {name: os.path.join(folder, name) for name in BUNDLE_FILES}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: bundle file missing")
    meta = _read_meta(paths["meta.json"])
    params = {k: v.asnumpy() for k, v in read_params(paths["params.params"]).items()}
    inputs = {}
    for name in ("batch.npz", "infer.npz"):
        arrays = _load_npz(paths[name])
        missing = [k for k in ("data", "superpixel", "label") if k not in arrays]
        if missing:
            raise ValueError(f"{paths[name]}: missing arrays {', '.join(missing)}")
        inputs[name] = {k: arrays[k].astype(np.float32) for k in ("data", "superpixel", "label")}
    expected = _load_npz(paths["expected.npz"])
    steps = int(meta["steps"])
    required = [f"train/step{k}/{name}" for k in range(steps)
                for name in TRAIN_OUTPUTS + tuple(sorted(params))]
    required += [f"infer/{name}" for name in INFER_OUTPUTS]
    missing = [name for name in required if name not in expected]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{paths['expected.npz']}: missing {shown}")
    return Bundle(meta, params, inputs["batch.npz"], inputs["infer.npz"], expected, paths)


# ---------------------------------------------------------------------------------------------
# the reference's state before each step (teacher forcing)
# ---------------------------------------------------------------------------------------------

def state_before(bundle: Bundle, step: int) -> Dict[str, np.ndarray]:
    """The reference's checkpoint ('arg:NAME'|'aux:NAME') before `step`: after step - 1."""
    if step == 0:
        return dict(bundle.params)
    prefix = f"train/step{step - 1}/"
    return {key: bundle.expected[prefix + key] for key in bundle.params}


def momentum_before(bundle: Bundle, step: int, fixed_gammas: Sequence[str]) -> Dict[str, np.ndarray]:
    """SGD momentum ('arg:NAME' -> array) before `step`: the bundle's `mom:NAME` after step - 1,
    or derived from MXNet's update w <- w + mom: mom = w_{k-1} - w_{k-2}. A fix_gamma BatchNorm
    gamma is set to 1 by the forward before its update, so its momentum is gamma_{k-1} - 1.
    Zero before step 0 (a fresh optimiser)."""
    after = state_before(bundle, step)
    args = [key for key in after if key.startswith("arg:")]
    if step == 0:
        return {key: np.zeros_like(after[key]) for key in args}
    before = state_before(bundle, step - 1)
    prefix = f"train/step{step - 1}/{MOMENTUM}"
    momentum = {}
    for key in args:
        recorded = bundle.expected.get(prefix + key[4:])
        if recorded is not None:
            momentum[key] = recorded
        elif key in fixed_gammas:
            momentum[key] = after[key] - 1   # release: the forward wrote gamma = 1
        else:
            momentum[key] = after[key] - before[key]
    return momentum


def store_before(bundle: Bundle, step: int) -> np.ndarray:
    """The sign flip's shared store before `step`: the bundle's `store:` key after step - 1, else
    the checkpoint's aux value (the same on one device; step 0 starts from params.params)."""
    checkpoint = state_before(bundle, step)["aux:" + RESIGN_MEAN]
    return bundle.expected.get(f"train/step{step - 1}/{STORE}", checkpoint) if step else checkpoint


def devices_before(bundle: Bundle, step: int) -> np.ndarray:
    """Each device's own copy of the sign flip's mean before `step` (num_devices, C, 2): the
    bundle's `devices:` key after step - 1, else the checkpoint's value on every device (the
    release's Module copies the aux state to every device; step 0 starts from params.params)."""
    recorded = bundle.expected.get(f"train/step{step - 1}/{DEVICES}") if step else None
    if recorded is not None:
        return recorded
    return np.stack([state_before(bundle, step)["aux:" + RESIGN_MEAN]] * bundle.num_devices)


def change_origin(bundle: Bundle, name: str, free_running: bool) -> Optional[np.ndarray]:
    """The value a state tensor's change is measured from (the reference's state before its
    step, or the start when free-running); None for outputs, which are compared directly."""
    parts = name.split("/")
    key = parts[-1]
    if parts[0] != "train" or not key.startswith(STATE_KINDS):
        return None
    step = 0 if free_running else int(parts[1][len("step"):])
    if key == STORE:
        return store_before(bundle, step)
    if key == DEVICES:
        return devices_before(bundle, step)
    return state_before(bundle, step)[key]


# ---------------------------------------------------------------------------------------------
# our model on a bundle
# ---------------------------------------------------------------------------------------------

def build_from_params(params: Dict[str, np.ndarray], meta: dict, source: str,
                      contexts: Sequence[mx.Context]) -> ICDNet:
    """ICDNet with the bundle's parameters; width read from conv1_1's channel count."""
    width = params["arg:conv1_1_weight"].shape[0] / 64.0
    net = ICDNet(num_classes=int(meta["num_cls"]), width=width, dropout=float(meta["dropout"]))
    assign(net, params, source, contexts)
    net.hybridize(static_alloc=True)
    return net


def fixed_gamma_keys(net: gluon.Block) -> List[str]:
    """Checkpoint keys of the BatchNorm gammas with fix_gamma: MXNet's BatchNorm writes 1 into
    them at every training forward, so after a step such a gamma is 1 + its momentum
    (docs/release.md section 11; our feat_bn does the same)."""
    keys = []

    def visit(block):
        if isinstance(block, nn.BatchNorm) and block._kwargs.get("fix_gamma"):
            keys.append(release_key(block.gamma.name))
    net.apply(visit)
    return keys


def perturbed(state: Dict[str, np.ndarray], scale: float, rng: np.random.RandomState,
              fixed_gammas: Sequence[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """`state` with every parameter but the fixed gammas multiplied by 1 + scale * N(0, 1);
    returns (perturbed state, its difference from `state` per parameter, float64)."""
    if scale == 0:
        return state, {}
    out, delta = dict(state), {}
    for key, value in state.items():
        if key.startswith("arg:") and key not in fixed_gammas:
            noise = value.astype(np.float64) * scale * rng.standard_normal(value.shape)
            out[key] = (value + noise).astype(np.float32)
            delta[key] = out[key].astype(np.float64) - value   # exact: both float32
    return out, delta


def load_momentum(trainer: gluon.Trainer, momentum: Dict[str, np.ndarray]) -> None:
    """Start `trainer`'s SGD from `momentum` ('arg:NAME' -> array) through Trainer.load_states,
    in the format Trainer.save_states writes: {index of the parameter in the Trainer: momentum}."""
    states = {i: mx.nd.array(momentum[release_key(param.name)])
              for i, param in enumerate(trainer_params(trainer))}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "momentum.states")
        with open(path, "wb") as f:
            pickle.dump(states, f)
        trainer.load_states(path)


def replay_step(net: ICDNet, trainer: gluon.Trainer, parts: List[Dict[str, mx.nd.NDArray]],
                warm: float, contexts: Sequence[mx.Context],
                order: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
    """One training step, the training loop's (icd.engine.loop.train_step with ICD's forward and
    loss), on a batch split over `contexts` (`parts[d][name]` on device d) at warm-up weight
    `warm`.

    The devices' forwards are issued in `order` (default context order), so the shared sign-flip
    store takes their updates in that order, as symbols.bundle records the reference (the
    release's store takes them in whichever order they arrive: a race). Returns `cam_prob`
    (N, C), `icd_bu` and `icd_td_prob` (N, C, h, w) before the update, in context order; the
    checkpoint (`arg:`/`aux:`, icd.checkpoint.gather) after it; with several devices the shared
    store after it (`store:...`) and each device's copy (`devices:...`, (k, C, 2)).
    """
    inputs = [dict(part, warm=mx.nd.full((1,), warm, ctx=ctx))
              for part, ctx in zip(parts, contexts)]
    outputs = loop.train_step(net, trainer, ICDTask.forward, inputs,
                              sum(part["data"].shape[0] for part in parts), order)
    result = {
        "cam_prob": np.concatenate([mx.nd.sigmoid(o["cam"].mean(axis=(2, 3))).asnumpy()
                                    for o in outputs]),
        "icd_bu": np.concatenate([o["icd_bu"].asnumpy() for o in outputs]),
        "icd_td_prob": np.concatenate([mx.nd.sigmoid(o["icd_td"]).asnumpy() for o in outputs])}
    result.update({key: value.asnumpy() for key, value in gather(net).items()})
    store = shared_moving_mean(net.share_key)
    if store is not None:
        result[STORE] = store.master.asnumpy()
        result[DEVICES] = np.stack([c.asnumpy() for c in
                                    net.icd_accum_resign_moving_mean.list_data()])
    return result


def replay_infer(net: ICDNet, batch: Dict[str, np.ndarray],
                 ctx: mx.Context) -> Dict[str, np.ndarray]:
    """Inference outputs `infer/cam|icd_bu|icd_bu_sp|icd_td` on `batch`, (N, C, h, w) each."""
    inputs = [mx.nd.array(batch[k], ctx=ctx) for k in ("data", "superpixel", "label")]
    outputs = net(*inputs, mx.nd.ones((1,), ctx=ctx))
    return {f"infer/{name}": value.asnumpy() for name, value in zip(INFER_OUTPUTS, outputs)}


def replay(bundle: Bundle, contexts: Sequence[mx.Context], free_running: bool = False,
           perturbation: float = 0.0, seed: int = 0) -> Dict[str, np.ndarray]:
    """Our model's counterpart of every tensor of the bundle's expected.npz (and `mom:` aside).

    Teacher-forced: each step starts from the reference's state before it (state_before,
    momentum_before, store_before, devices_before) at the step's warm-up value, the devices in
    the bundle's order, and inference runs on the
    reference's final state. Free-running: step 0 starts from params.params and every later step
    from our own state. `perturbation` multiplies the parameters of each starting state by
    1 + perturbation * N(0, 1); the state tensors returned are shifted back by that difference,
    so that their changes over a step stay comparable with the unperturbed run's.
    """
    contexts = list(contexts)
    meta, source = bundle.meta, bundle.paths["expected.npz"]
    net = build_from_params(bundle.params, meta, bundle.paths["params.params"], contexts)
    fixed = fixed_gamma_keys(net)
    rng = np.random.RandomState(seed)
    parts = split_batch({k: mx.nd.array(v) for k, v in bundle.batch.items()}, contexts)
    ours, delta, trainer = {}, {}, None
    try:
        for step in range(bundle.steps):
            if step == 0 or not free_running:
                state, delta = perturbed(state_before(bundle, step), perturbation, rng, fixed)
                assign(net, state, source, contexts)
                trainer = loop.make_trainer(net, float(meta["lr"]), float(meta["momentum"]),
                                       float(meta["wd"]))
                load_momentum(trainer, momentum_before(bundle, step, fixed))
                if len(contexts) > 1:   # release: one store shared by the devices
                    share_moving_mean(net.share_key, mx.nd.array(store_before(bundle, step)),
                                      contexts)
                    for copy, value in zip(net.icd_accum_resign_moving_mean.list_data(),
                                           devices_before(bundle, step)):
                        copy[:] = mx.nd.array(value, ctx=copy.context)
            warm = top_down_warmup(step, int(meta["warmup_iters"]))
            for key, value in replay_step(net, trainer, parts, warm, contexts,
                                         bundle.device_order).items():
                # float64: a change stays exactly our own, from the perturbed start
                ours[f"train/step{step}/{key}"] = value - delta[key] if key in delta else value
    finally:
        unshare_moving_mean(net.share_key)
    if not free_running:
        state, _ = perturbed(state_before(bundle, bundle.steps), perturbation, rng, fixed)
        assign(net, state, source, contexts)
    ours.update(replay_infer(net, bundle.infer, contexts[0]))
    return ours


def compare(ours: Dict[str, np.ndarray], expected: Dict[str, np.ndarray],
            origin: Callable[[str], Optional[np.ndarray]],
            source: str = "expected") -> List[TensorError]:
    """Errors of every expected tensor but the `mom:` ones: outputs directly, state tensors
    (`arg:`, `aux:`, `store:`, `devices:`) on their change from `origin(name)`."""
    errors = []
    for name, ref in expected.items():
        if f"/{MOMENTUM}" in name:
            continue
        if name not in ours:
            raise ValueError(f"{source}: {name} has no counterpart in our model")
        start = origin(name)
        try:
            if start is None:
                scale = error_scale(ours[name], ref)
                tolerance = OUTPUT_TOLERANCE
            else:
                floor = max(1e-6, RESOLUTION_FLOOR * float(np.abs(start).max(initial=0)))
                scale = error_scale(ours[name], ref - start, floor)
                tolerance = PARAM_TOLERANCE
        except ValueError as e:
            raise ValueError(f"{source}: {name}: {e}") from None
        # a change's error: (ours - start) - (ref - start) = ours - ref
        error = float(np.abs(ours[name] - ref).max(initial=0)) / scale
        errors.append(TensorError(name, error, tolerance, scale))
    return errors


def check_bundle(folder: str, contexts: Optional[Sequence[mx.Context]] = None,
                 free_running: bool = False, strict: bool = False,
                 runs: int = NOISE_RUNS, kernels: bool = True) -> List[TensorError]:
    """One TensorError per compared tensor of a bundle's expected.npz, teacher-forced unless
    `free_running`. Unless `strict`, each also gets its noise: the largest movement of our own
    result over `runs` replays from starting states perturbed by 1e-7 (relative) with different
    draws (every step's start when teacher-forced, the first step's when free-running) and, on
    CPU contexts with `kernels`, over the replays under KERNEL_CAPS (`replay_under_isa`).

    `contexts`: as many devices as the bundle was recorded on (meta `num_devices`, default 1);
    default cpu(0) .. cpu(n - 1).
    """
    bundle = read_bundle(folder)
    contexts = list(contexts or [mx.cpu(i) for i in range(bundle.num_devices)])
    if len(contexts) != bundle.num_devices:
        raise ValueError(f"{bundle.paths['meta.json']}: recorded on {bundle.num_devices} "
                         f"device(s), but {len(contexts)} given; the batch must split the same way")

    def origin(name):
        return change_origin(bundle, name, free_running)

    ours = replay(bundle, contexts, free_running)
    errors = compare(ours, bundle.expected, origin, bundle.paths["expected.npz"])
    if not strict:
        for e in errors:
            e.noise = 0.0
        for again in _noise_replays(folder, bundle, contexts, free_running, runs, kernels):
            for e in errors:
                movement = float(np.abs(again[e.name] - ours[e.name]).max(initial=0))
                e.noise = max(e.noise, movement / e.scale)
    return errors


def _noise_replays(folder: str, bundle: Bundle, contexts: List[mx.Context], free_running: bool,
                   runs: int, kernels: bool) -> Iterator[Dict[str, np.ndarray]]:
    """The replays whose movement is the noise: `runs` perturbed ones, then (on CPU contexts,
    `kernels`) one under each oneDNN cap of KERNEL_CAPS."""
    for seed in range(runs):
        yield replay(bundle, contexts, free_running, PERTURBATION, seed)
    if kernels and all(c.device_type == "cpu" for c in contexts):
        for isa in KERNEL_CAPS:
            yield replay_under_isa(folder, len(contexts), free_running, isa)


def replay_under_isa(folder: str, num_devices: int, free_running: bool,
                     isa: str) -> Dict[str, np.ndarray]:
    """`replay` (unperturbed, cpu(0) .. cpu(num_devices - 1)) in a process whose oneDNN is capped
    at `isa`: DNNL_MAX_CPU_ISA is read once, when MXNet loads."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DNNL_MAX_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                        os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ours.npz")
        done = subprocess.run([sys.executable, "-m", "icd.parity", folder, out, str(num_devices)]
                              + (["--free-running"] if free_running else []),
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{folder}: the replay under DNNL_MAX_CPU_ISA={isa} failed: {last}")
        with np.load(out) as replayed:
            return dict(replayed)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

def summary(errors: List[TensorError]) -> str:
    """The checker's last line: count, unjudgeable count, worst judged error (relative to its
    bound), verdict (PASS when every judged tensor is within its bound)."""
    judged = [e for e in errors if e.judged] or errors
    worst = max(judged, key=lambda e: e.error / e.bound)
    verdict = "PASS" if all(e.ok for e in judged) else "FAIL"
    unjudgeable = sum(not e.judged for e in errors)
    counted = (f"{len(errors)} tensors, {unjudgeable} unjudgeable (noise > {NOISE_CAP:g})"
               if any(e.noise is not None for e in errors) else f"{len(errors)} tensors")
    return (f"parity: {counted}, worst {worst.error:.3g} (bound {worst.bound:.3g}) at "
            f"{worst.name}: {verdict}")


def report(errors: List[TensorError]) -> List[str]:
    """The checker's output: one line per tensor (error, tolerance, and unless strict the noise
    and the bound), then `summary`."""
    lines = []
    for e in errors:
        line = f"{e.name:<60s} error {e.error:.3e} tol {e.tolerance:.0e}"
        if e.noise is not None:
            line += f" noise {e.noise:.3e} bound {e.bound:.3e}"
        lines.append(f"{line} {e.status}")
    lines.append(summary(errors))
    return lines


def _replay_main(argv: Sequence[str]) -> None:
    """`python -m icd.parity BUNDLE OUT.npz DEVICES [--free-running]`: `replay_under_isa`'s
    process (the caller sets DNNL_MAX_CPU_ISA)."""
    folder, out, num_devices = argv[0], argv[1], int(argv[2])
    ours = replay(read_bundle(folder), [mx.cpu(i) for i in range(num_devices)],
                  "--free-running" in argv[3:])
    np.savez(out, **ours)


if __name__ == "__main__":
    _replay_main(sys.argv[1:])
