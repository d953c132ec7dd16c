"""The release's checkpoint format <-> Gluon parameters.

A checkpoint is an `mx.nd.save` dict with `arg:<name>` for trainable parameters and `aux:<name>`
for auxiliary states (docs/release.md section 2). Our parameter names equal the release's
except BatchNorm's statistics, which Gluon calls running_* and the release moving_*. A Trainer's
states go to a `.states` file read back without running anything in it (`read_states`). Where
a run's checkpoints are named, listed, rotated and resumed is icd.runs'.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import logging
import os
import pickle
from typing import Dict, Iterator, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .io import atomic_path, require_finite

log = logging.getLogger(__name__)
AUX_SUFFIXES = ("moving_mean", "moving_var")   # MXNet: auxiliary states, never trained
_GLUON_TO_RELEASE = {"running_mean": "moving_mean", "running_var": "moving_var"}


def release_key(gluon_name: str) -> str:
    """`arg:`/`aux:` checkpoint key of a Gluon parameter name.

    MXNet's convention: every `*_moving_mean` / `*_moving_var` is an auxiliary state (BatchNorm
    statistics of any network, the sign flip's moving mean); Gluon's `running_*` are renamed
    `moving_*` first.
    """
    name = gluon_name
    for gluon_suffix, release_suffix in _GLUON_TO_RELEASE.items():
        if name.endswith(gluon_suffix):
            name = name[: -len(gluon_suffix)] + release_suffix
    return ("aux:" if name.endswith(AUX_SUFFIXES) else "arg:") + name


def release_keys(net: mx.gluon.Block) -> Dict[str, tuple]:
    """Checkpoint key -> shape for every parameter and aux state of `net`."""
    return {release_key(name): p.shape for name, p in net.collect_params().items()}


def gather(net: mx.gluon.Block) -> Dict[str, mx.nd.NDArray]:
    """Checkpoint dict of `net` on the CPU: `arg:`/`aux:` key -> NDArray.

    With several devices every state the optimiser does not update (the aux states: BatchNorm
    statistics, the sign-flip moving mean) is the average of the devices' own copies (release:
    Module.save_params -> get_params); trained parameters are equal on all devices.
    """
    out = {}
    for name, param in net.collect_params().items():
        copies = param.list_data()
        if param.grad_req == "null" and len(copies) > 1:
            value = mx.nd.add_n(*[c.copyto(mx.cpu()) for c in copies]) / len(copies)
        else:
            value = copies[0].copyto(mx.cpu())
        out[release_key(name)] = value
    return out


def save_checkpoint(net: mx.gluon.Block, path: str) -> None:
    """Write `net`'s parameters in the release's format, atomically."""
    with staged_params(gather(net), path):
        pass


@contextlib.contextmanager
def staged_params(values: Dict[str, mx.nd.NDArray], path: str) -> Iterator[str]:
    """Write checkpoint `values` under a temporary name beside `path` and yield the file's
    digest (`file_digest`); the file takes the name `path` when the block succeeds. A run's
    checkpoint writes its .states and run record inside the block: the .params comes last
    (icd.runs.complete_checkpoints), yet the record names its digest
    (icd.runs.check_checkpoint_files)."""
    with atomic_path(path) as tmp:
        mx.nd.save(tmp, values)
        yield file_digest(tmp)


def file_digest(path: str) -> str:
    """`sha256:<hex>` of the bytes of `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def read_params(path: str) -> Dict[str, mx.nd.NDArray]:
    """Read an `mx.nd.save` dict with `arg:`/`aux:` keys, with errors naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError as e:
        # MXNet's message is a C++ traceback; its last line says what is wrong
        reason = str(e).strip().splitlines()[-1].replace("MXNetError: ", "")
        raise ValueError(f"{path}: not an MXNet parameter file ({reason})") from None
    if not isinstance(loaded, dict) or not all(
            k.startswith(("arg:", "aux:")) for k in loaded):
        raise ValueError(f"{path}: expected a dict with 'arg:'/'aux:' keys (release format)")
    return loaded


def assign(net: mx.gluon.Block, values: Dict[str, mx.nd.NDArray], source: str,
           contexts: Optional[Sequence[mx.Context]] = None, allow_missing: bool = False,
           ignore_extra: bool = False) -> list:
    """Set `net`'s parameters from checkpoint `values`; returns the keys that were missing.

    Raises ValueError naming `source` and every missing, extra or mis-shaped key.
    """
    contexts = list(contexts or [mx.cpu()])
    expected = {release_key(n): p for n, p in net.collect_params().items()}
    missing = sorted(set(expected) - set(values))
    extra = sorted(set(values) - set(expected))
    wrong = sorted(f"{k} {tuple(values[k].shape)} (model {p.shape})" for k, p in expected.items()
                   if k in values and tuple(values[k].shape) != tuple(p.shape))
    problems = []
    if wrong:
        problems.append(f"mis-shaped keys: {', '.join(wrong)}")
    if missing and not allow_missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if extra and not ignore_extra:
        problems.append(f"extra keys: {', '.join(extra)}")
    if problems:
        raise ValueError(f"{source}: does not match the model; " + "; ".join(problems))
    for key, param in expected.items():
        if key in values:
            if param._data is None:   # not allocated yet (Gluon has no public test for it)
                param.initialize(ctx=contexts, force_reinit=True)
            param.set_data(values[key])
    return missing


def load_checkpoint(net: mx.gluon.Block, path: str,
                    contexts: Optional[Sequence[mx.Context]] = None) -> None:
    """Load a full checkpoint (ours or the release's `vgg16_icd-0019.params`) into `net`;
    NaN or infinite values are refused (`require_finite_params`)."""
    assign(net, require_finite_params(read_params(path), path), path, contexts)




def require_finite_params(values: Dict[str, mx.nd.NDArray], source: str
                          ) -> Dict[str, mx.nd.NDArray]:
    """`values`, after checking every tensor is finite; ValueError naming `source` and the first
    tensor (in key order) with NaN or infinite values (a diverged run's checkpoint)."""
    for key in sorted(values):
        require_finite(values[key].asnumpy(), f"{source}: tensor {key}")
    return values


# Optimizer states (`.states`). MXNet writes them with pickle (`Updater.get_states`:
# `pickle.dumps((states, optimizer))`), and unpickling runs whatever a file names, so they are
# read with an unpickler that admits only what MXNet's own states contain: NDArrays
# (`NDArray.__reduce__`: NDArray(None) + its raw bytes), numpy arrays and scalars, the optimizer
# and its LR scheduler (mxnet.optimizer / mxnet.lr_scheduler classes, plain attributes),
# numbers, strings, tuples, lists, dicts and None. They are written device-free: every array on
# mx.cpu(), so that a run saved on devices (GPUs, cpu(1), ...) resumes on any other list.
_STATE_GLOBALS = {("mxnet.ndarray.ndarray", "NDArray"), ("builtins", "bytearray"),
                  ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar")}
_STATE_BASES = {"mxnet.optimizer.optimizer": mx.optimizer.Optimizer,
                "mxnet.lr_scheduler": mx.lr_scheduler.LRScheduler}


class _StatesUnpickler(pickle.Unpickler):
    """Resolves only the globals of MXNet's optimizer states (see above); others are refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _STATE_GLOBALS:
            return getattr(importlib.import_module(module), name)
        base = _STATE_BASES.get(module)
        if base is not None:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and issubclass(found, base):
                return found
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of MXNet's "
                                     f"optimizer states")


def _check_state(value, where: str) -> None:
    """An optimizer state is an NDArray, None, or a tuple / list of states (MXNet's)."""
    if isinstance(value, (tuple, list)):
        for item in value:
            _check_state(item, where)
    elif isinstance(value, mx.nd.NDArray):
        if value.handle is None:
            raise ValueError(f"{where}: an NDArray without data")
    elif value is not None:
        raise ValueError(f"{where}: a {type(value).__name__}, not an NDArray")


def read_states(path: str) -> Tuple[Dict[int, object], Optional[mx.optimizer.Optimizer]]:
    """(states, optimizer) of an optimizer-state file, through the restricted unpickler: states
    is {parameter index: NDArray / tuple of NDArrays / None}; optimizer is None for files that
    hold states only (the release's Module writes those). ValueError naming `path` for anything
    else; nothing a file names is ever run."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: optimizer-state file not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        loaded = _StatesUnpickler(io.BytesIO(data)).load()
    except Exception as e:   # unpickling raises anything; MXNet's raw bytes MXNetError
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable optimizer-state file ({type(e).__name__}: "
                         f"{reason})") from None
    states, optimizer = loaded if isinstance(loaded, tuple) and len(loaded) == 2 \
        else (loaded, None)
    if not isinstance(states, dict) or not all(isinstance(k, int) for k in states):
        raise ValueError(f"{path}: not an optimizer-state file (expected a dict of parameter "
                         f"index -> state, got {type(states).__name__})")
    if optimizer is not None and not isinstance(optimizer, mx.optimizer.Optimizer):
        raise ValueError(f"{path}: not an optimizer-state file (its optimizer is a "
                         f"{type(optimizer).__name__})")
    for index, state in states.items():
        _check_state(state, f"{path}: state of parameter {index}")
    return states, optimizer


# MXNet 1.9.1's Trainer has no public access to its parameters in index order, its updaters or
# its lazy set-up, which the release-format .states need (indices, momentum per parameter): the
# private attributes are read in these two helpers only. Nor has its Optimizer to the update
# counts per device (`_all_index_update_counts`): read by `update_counts`, set by `save_states`
# and `load_states`.
def trainer_params(trainer: mx.gluon.Trainer) -> list:
    """`trainer`'s parameters in the order of their indices in a .states file."""
    return trainer._params


def _updaters(trainer: mx.gluon.Trainer) -> list:
    """The updaters that hold `trainer`'s optimizer states, after Gluon's lazy set-up: the
    kvstore's one with update_on_kvstore (kvstore=device, several devices), else one per device
    (equal states: each applies the same summed gradient)."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    return [trainer._kvstore._updater] if trainer._update_on_kvstore else trainer._updaters


def _arrays(state) -> list:
    if isinstance(state, (tuple, list)):
        return [a for s in state for a in _arrays(s)]
    return [] if state is None else [state]


def _layout(state):
    """What an optimizer state holds: None, (dtype, shape) of an array, or a tuple of layouts."""
    if isinstance(state, (tuple, list)):
        return tuple(_layout(s) for s in state)
    return None if state is None else (np.dtype(state.dtype).name, tuple(state.shape))


def _check_fits(states: Dict[int, object], optimizer: mx.optimizer.Optimizer,
                params: Sequence[mx.gluon.Parameter], path: str) -> None:
    """Every state belongs to a parameter of the trainer, has its shape and holds what the run's
    `optimizer` keeps for that parameter (SGD with momentum: one array; Adam: two; SGD without
    momentum: none), so that the file's arrays are the run's optimizer's state; ValueError
    naming `path`, another model before another optimizer."""
    for index, state in sorted(states.items()):
        if not 0 <= index < len(params):
            raise ValueError(f"{path}: holds a state of parameter {index}, but the model trains "
                             f"{len(params)} parameters: the file belongs to another model")
        for array in _arrays(state):
            if tuple(array.shape) != tuple(params[index].shape):
                raise ValueError(
                    f"{path}: the state of parameter {index} ({params[index].name}) has shape "
                    f"{tuple(array.shape)}, the parameter {tuple(params[index].shape)}: the "
                    f"file belongs to another model")
    for index, state in sorted(states.items()):
        param = params[index]
        own = _layout(optimizer.create_state_multi_precision(
            index, mx.nd.zeros(param.shape, mx.cpu(), dtype=param.dtype)))
        if _layout(state) != own:
            raise ValueError(
                f"{path}: the state of parameter {index} ({param.name}) holds {_layout(state)}, "
                f"but the run's optimizer ({type(optimizer).__name__}) keeps {own} (None: "
                f"nothing; (dtype, shape) per array): the file was written by another optimizer")


def _on_cpu(state):
    if isinstance(state, (tuple, list)):
        return type(state)(_on_cpu(s) for s in state)
    return state.copyto(mx.cpu()) if isinstance(state, mx.nd.NDArray) else state


def update_counts(optimizer: mx.optimizer.Optimizer) -> Dict[int, int]:
    """How many updates each parameter index has had, whatever device made them. MXNet counts
    per device id (`Optimizer._all_index_update_counts`; Adam's bias correction reads the count),
    and a kvstore on several GPUs updates each parameter on one of them only, so a parameter's
    count is its largest over the devices."""
    counts: Dict[int, int] = {}
    for device_counts in optimizer._all_index_update_counts.values():
        for index, count in device_counts.items():
            counts[index] = max(count, counts.get(index, 0))
    return counts


def _saved_counts(optimizer: mx.optimizer.Optimizer, num_params: int, path: str
                  ) -> Dict[int, int]:
    """`update_counts` of the optimizer object of a .states file, after checking they are
    counts of the model's parameters; ValueError naming `path`."""
    per_device = getattr(optimizer, "_all_index_update_counts", None)
    if not isinstance(per_device, dict) or not all(
            isinstance(counts, dict) and all(
                type(index) is int and 0 <= index < num_params and type(count) is int
                and count >= 0 for index, count in counts.items())
            for counts in per_device.values()):
        raise ValueError(f"{path}: its optimizer's update counts are not {{device: {{parameter "
                         f"index: count}}}} for the model's {num_params} parameters")
    return update_counts(optimizer)


def save_states(trainer: mx.gluon.Trainer, path: str) -> None:
    """Write `trainer`'s optimizer states as `Trainer.save_states` does ((states, optimizer)
    pickled), but device-free: every array on mx.cpu(), and the optimizer's update counts per
    parameter whatever device made them (`update_counts`), kept as device 0's; atomically."""
    updater = _updaters(trainer)[0]
    states = {index: _on_cpu(state) for index, state in updater.states.items()}
    optimizer = copy.copy(updater.optimizer)   # its __getstate__ leaves param_dict out
    counts = update_counts(updater.optimizer)
    optimizer._all_index_update_counts = {0: counts}
    optimizer._index_update_count = counts
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((states, optimizer), f)


def load_states(trainer: mx.gluon.Trainer, path: str) -> None:
    """Start `trainer` from the optimizer state arrays and per-parameter update counts of `path`
    (`read_states`: restricted, checked), on its own devices whatever devices wrote them.

    The trainer keeps its own optimizer, whose settings are the run's (learning rate, momentum,
    weight decay, ...): a file's optimizer object only gives the update counts, and the release's
    states-only files (docs/release.md section 4) none. Each updater gets its own copy of the
    arrays, which MXNet moves to the weight's device at the first update
    (`Updater.sync_state_context`), also with update_on_kvstore; the counts go to every device id
    the optimizer may count under, so whichever device updates a parameter continues its count.
    """
    states, saved = read_states(path)
    updaters = _updaters(trainer)
    optimizer, params = trainer.optimizer, trainer_params(trainer)
    _check_fits(states, optimizer, params, path)
    counts = {} if saved is None else _saved_counts(saved, len(params), path)
    for updater in updaters:
        updater.states = {index: _on_cpu(state) for index, state in states.items()}
        updater.states_synced = dict.fromkeys(updater.states, False)
    devices = {0} | {ctx.device_id for param in params for ctx in param.list_ctx()}
    optimizer._all_index_update_counts = {device: dict(counts) for device in devices}
    optimizer._index_update_count = optimizer._all_index_update_counts[0]
    optimizer.num_update = max([optimizer.num_update, *counts.values()])
