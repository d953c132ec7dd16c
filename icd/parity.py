"""Parity bundles: our Gluon ICDNet against steps recorded from the original release.

A bundle folder (format in README "Parity with the release" and symbols/bundle.py) holds the
starting checkpoint, one training batch, an inference batch and, for every step k, the release's
outputs of step k and its state after it.

Teacher-forced (the default): step k starts from the reference's state after step k-1 (step 0
from params.params): every parameter and aux state, the SGD momentum, the sign flip's shared
store and the warm-up value of step k. Step k's outputs, and its changes of every parameter and
aux state measured from that state, are compared with the reference's; the inference outputs
come from the reference's final state. One step from the same state is what can be judged:
several free-running steps of this model are chaotic (ORIGINAL_RELEASE.md section 11: the
release perturbed by 1e-7 ends step 3 with parameter changes 10-25% off its own run, and CPUs
round differently).

Free-running (`free_running=True`): every step continues from our own previous state, as in
training, and each tensor is reported beside the bundle's sensitivity: our run from a start
perturbed by 1e-7 against our unperturbed run. A tensor that this perturbation alone moves
beyond its tolerance is reported but not judged.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

from .checkpoint import assign, gather, read_params, release_key
from .devices import split_batch
from .io import read_json
from .model import ICDNet
from .model.losses import top_down_warmup
from .model.ops import share_moving_mean, shared_moving_mean, unshare_moving_mean
from .train import make_trainer

OUTPUT_TOLERANCE = 1e-4  # max|ours - ref| / max(max|ref|, 1e-6)
PARAM_TOLERANCE = 1e-3   # the same on the change from the state before the step, with a floor:
# a float32 parameter w changed by d is stored to ~1.2e-7 |w|, so a change below 1e-4 |w| (e.g.
# weight decay alone, or the top-down layers under the e^-10 warm-up) is judged against
# 1e-4 max|w|: 1e-3 of that floor is one unit in the last place, the finest float32 can resolve.
RESOLUTION_FLOOR = 1e-4
SENSITIVITY_PERTURBATION = 1e-7  # relative perturbation of the start for --free-running
META_KEYS = ("num_cls", "lr", "momentum", "wd", "batch_size", "steps", "warmup_iters", "dropout")
BUNDLE_FILES = ("meta.json", "params.params", "batch.npz", "infer.npz", "expected.npz")
TRAIN_OUTPUTS = ("cam_prob", "icd_bu", "icd_td_prob")
INFER_OUTPUTS = ("cam", "icd_bu", "icd_bu_sp", "icd_td")
RESIGN_MEAN = "icd_accum_resign_moving_mean"   # the sign flip's moving mean (aux state)
STORE = "store:" + RESIGN_MEAN                 # its shared store (several devices)
STATE_KINDS = ("arg:", "aux:", "store:")       # compared on their change over the step
MOMENTUM = "mom:"                              # read as state, not compared (it is the change)


@dataclass
class TensorError:
    """Error of one tensor; `sensitivity` (free-running only) is the error of our own run from
    a perturbed start against our unperturbed run, on the same scale."""
    name: str
    error: float
    tolerance: float
    sensitivity: Optional[float] = None

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tolerance)

    @property
    def judged(self) -> bool:
        return self.sensitivity is None or bool(self.sensitivity <= self.tolerance)

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.judged else "not judged")


@dataclass
class Bundle:
    """A bundle read from its folder: float32 arrays keyed as in its files."""
    meta: dict
    params: Dict[str, np.ndarray]     # 'arg:NAME' | 'aux:NAME' at the start
    batch: Dict[str, np.ndarray]      # data (N,3,H,W), superpixel (N,H,W), label (N,C)
    infer: Dict[str, np.ndarray]      # the same for inference
    expected: Dict[str, np.ndarray]   # the reference's tensors (README)
    paths: Dict[str, str]             # file name -> path

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def num_devices(self) -> int:
        return int(self.meta.get("num_devices", 1))


def relative_error(ours: np.ndarray, ref: np.ndarray, floor: float = 1e-6) -> float:
    """max|ours - ref| / max(max|ref|, floor); shapes must agree."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} differs from the reference's {ref.shape}")
    return float(np.abs(ours - ref).max(initial=0) / max(np.abs(ref).max(initial=0), floor))


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


def change_origin(bundle: Bundle, name: str, free_running: bool) -> Optional[np.ndarray]:
    """The value a state tensor's change is measured from (the reference's state before its
    step, or the start when free-running); None for outputs, which are compared directly."""
    parts = name.split("/")
    key = parts[-1]
    if parts[0] != "train" or not key.startswith(STATE_KINDS):
        return None
    step = 0 if free_running else int(parts[1][len("step"):])
    return store_before(bundle, step) if key == STORE else state_before(bundle, step)[key]


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
    (ORIGINAL_RELEASE.md section 11; our feat_bn does the same)."""
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
              for i, param in enumerate(trainer._params)}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "momentum.states")
        with open(path, "wb") as f:
            pickle.dump(states, f)
        trainer.load_states(path)


def train_step(net: ICDNet, trainer: gluon.Trainer, parts: List[Dict[str, mx.nd.NDArray]],
               warm: float, contexts: Sequence[mx.Context]) -> Dict[str, np.ndarray]:
    """One training step on a batch split over `contexts` (`parts[d][name]` on device d).

    The devices' forwards run one after another in context order, so the shared sign-flip store
    takes device 0's update first, as symbols.bundle records the reference (the release's store
    takes them in whichever order they arrive). Returns `cam_prob` (N, C), `icd_bu` and
    `icd_td_prob` (N, C, h, w) before the update; the checkpoint (`arg:`/`aux:`, icd.checkpoint
    .gather) after it; with several devices the shared store after it (`store:...`).
    """
    outputs = []
    with autograd.record():
        for d, ctx in enumerate(contexts):
            outputs.append(net(parts[d]["data"], parts[d]["superpixel"], parts[d]["label"],
                               mx.nd.full((1,), warm, ctx=ctx)))
            mx.nd.waitall()   # device d's sign flip has updated the store before d + 1 starts
    autograd.backward([out[-1] for out in outputs])
    trainer.step(sum(part["data"].shape[0] for part in parts))
    result = {
        "cam_prob": np.concatenate([mx.nd.sigmoid(o[0].mean(axis=(2, 3))).asnumpy()
                                    for o in outputs]),
        "icd_bu": np.concatenate([o[1].asnumpy() for o in outputs]),
        "icd_td_prob": np.concatenate([mx.nd.sigmoid(o[3]).asnumpy() for o in outputs])}
    result.update({key: value.asnumpy() for key, value in gather(net).items()})
    store = shared_moving_mean(net.share_key)
    if store is not None:
        result[STORE] = store.master.asnumpy()
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
    momentum_before, store_before) at the step's warm-up value, and inference runs on the
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
                trainer = make_trainer(net, float(meta["lr"]), float(meta["momentum"]),
                                       float(meta["wd"]))
                load_momentum(trainer, momentum_before(bundle, step, fixed))
                if len(contexts) > 1:   # release: one store shared by the devices
                    share_moving_mean(net.share_key, mx.nd.array(store_before(bundle, step)),
                                      contexts)
            warm = top_down_warmup(step, int(meta["warmup_iters"]))
            for key, value in train_step(net, trainer, parts, warm, contexts).items():
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
    (`arg:`, `aux:`, `store:`) on their change from `origin(name)`."""
    errors = []
    for name, ref in expected.items():
        if f"/{MOMENTUM}" in name:
            continue
        if name not in ours:
            raise ValueError(f"{source}: {name} has no counterpart in our model")
        start = origin(name)
        try:
            if start is None:
                errors.append(TensorError(name, relative_error(ours[name], ref),
                                          OUTPUT_TOLERANCE))
            else:
                floor = max(1e-6, RESOLUTION_FLOOR * float(np.abs(start).max(initial=0)))
                errors.append(TensorError(name, relative_error(ours[name] - start, ref - start,
                                                               floor), PARAM_TOLERANCE))
        except ValueError as e:
            raise ValueError(f"{source}: {name}: {e}") from None
    return errors


def check_bundle(folder: str, contexts: Optional[Sequence[mx.Context]] = None,
                 free_running: bool = False,
                 sensitivity: Optional[bool] = None) -> List[TensorError]:
    """One TensorError per compared tensor of a bundle's expected.npz, teacher-forced unless
    `free_running`. With `sensitivity` (default: when free-running) each also gets the error of
    our own run from starting states perturbed by 1e-7 against our unperturbed run: the start
    when free-running, every step's starting state when teacher-forced.

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
    if free_running if sensitivity is None else sensitivity:
        again = replay(bundle, contexts, free_running, SENSITIVITY_PERTURBATION)
        reference = {e.name: ours[e.name] for e in errors}
        for e, s in zip(errors, compare(again, reference, origin, "our unperturbed run")):
            e.sensitivity = s.error
    return errors


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

def summary(errors: List[TensorError]) -> str:
    """The checker's last line: count, worst judged error (relative to its tolerance), verdict."""
    judged = [e for e in errors if e.judged] or errors
    worst = max(judged, key=lambda e: e.error / e.tolerance)
    verdict = "PASS" if all(e.ok for e in judged) else "FAIL"
    return f"parity: {len(errors)} tensors, worst {worst.error:.3g} at {worst.name}: {verdict}"


def report(errors: List[TensorError]) -> List[str]:
    """The checker's output: one line per tensor; with sensitivities, per step the worst error
    and the most sensitive tensor, and how many tensors were not judged; then `summary`."""
    lines = []
    for e in errors:
        line = f"{e.name:<60s} {e.error:.3e} (tol {e.tolerance:.0e})"
        if e.sensitivity is not None:
            line += f" sensitivity {e.sensitivity:.3e}"
        lines.append(f"{line} {e.status}")
    if any(e.sensitivity is not None for e in errors):
        groups: Dict[str, List[TensorError]] = {}
        for e in errors:
            groups.setdefault(e.name.rsplit("/", 1)[0], []).append(e)
        for group, members in groups.items():
            worst = max(members, key=lambda e: e.error / e.tolerance)
            touchy = max(members, key=lambda e: e.sensitivity / e.tolerance)
            lines.append(f"{group}: worst error {worst.error:.3g} at {worst.name}; a "
                         f"{SENSITIVITY_PERTURBATION:g} perturbation moves {touchy.name} by "
                         f"{touchy.sensitivity:.3g} (tol {touchy.tolerance:.0e})")
        unjudged = sum(not e.judged for e in errors)
        lines.append(f"sensitivity: {unjudged} of {len(errors)} tensors move beyond their "
                     f"tolerance under a {SENSITIVITY_PERTURBATION:g} perturbation and are not "
                     f"judged")
    lines.append(summary(errors))
    return lines
