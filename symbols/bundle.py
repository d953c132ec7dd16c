"""Parity bundles: the release's graph (symbols.icd_symbol) trained a few steps with mx.mod.Module.

A bundle folder holds

- ``meta.json``: num_cls, lr, momentum, wd, batch_size, steps, warmup_iters, dropout (0), width,
  size, infer_size, seed, num_devices (the batch is split evenly over that many devices),
  device_order (with several devices: the order in which the devices' AccumResign reached the
  shared store in every step, e.g. [1, 0]; the release's order is a race, section 3.2).
- ``params.params``: ``mx.nd.save`` dict ``arg:NAME`` / ``aux:NAME``, the training graph's
  parameters and aux states at the start.
- ``batch.npz`` / ``infer.npz``: ``data`` (N,3,H,W) float32 RGB 0..255, ``superpixel`` (N,H,W)
  float32 ids, ``label`` (N,C) float32 multi-hot (infer: H = W = infer_size).
- ``expected.npz``: for k in 0..steps-1, ``train/step{k}/cam_prob`` (N,C), ``train/step{k}/icd_bu``
  (N,C,h,w), ``train/step{k}/icd_td_prob`` (N,C,h,w) (training outputs of step k, before its
  update) and ``train/step{k}/arg:NAME`` / ``train/step{k}/aux:NAME`` (the checkpoint after step
  k's update: every aux state averaged over the devices' own copies, as Module.save_params writes
  it). Optional state for teacher forcing: ``train/step{k}/mom:NAME`` (the SGD momentum after
  step k) and, with several devices, ``train/step{k}/store:icd_accum_resign_moving_mean`` (the
  sign flip's shared store after step k, which no checkpoint holds) and
  ``train/step{k}/devices:icd_accum_resign_moving_mean`` (num_devices, C, 2): each device's own
  aux copy after step k, in context order (a device pushes it for the classes absent from its
  slice in step k + 1). Then ``infer/cam``, ``infer/icd_bu``, ``infer/icd_bu_sp``,
  ``infer/icd_td`` (inference outputs on infer.npz with the parameters after the last step).

Usage: ``python -m symbols.bundle OUT_DIR [--num-cls 5 --width 0.125 --size 64 ...]``.
"""
import argparse
import json
import os

import mxnet as mx
import numpy as np

from icd.io import atomic_path, write_json

from .icd_symbol import DATA_NAMES, VGG_CONVS, channels, get_symbol
from .ops import reset_shared_store, shared_moving_mean

__all__ = ["make_bundle", "write_bundle", "make_params", "make_batch", "run_reference_steps", "run_reference_infer",
           "read_state", "read_momentum", "RESIGN_KEY", "STORE_KEY", "DEVICES_KEY", "TRAIN_OUTPUTS",
           "INFER_OUTPUTS"]

RESIGN_KEY = "icd_accum_resign"  # AccumResign's shared-store key (symbols.ops)
STORE_KEY = "store:icd_accum_resign_moving_mean"  # its value in a bundle (several devices)
DEVICES_KEY = "devices:icd_accum_resign_moving_mean"  # each device's own aux copy (several devices)
TRAIN_OUTPUTS = ("cam_prob", "icd_bu", "icd_td_prob")  # get_symbol(mode='train') order
INFER_OUTPUTS = ("cam", "icd_bu", "icd_bu_sp", "icd_td")  # get_symbol(mode='infer') order
MAX_SUPERPIXELS = 64


# ----------------------------------------------------------------------------------------------
# random bundle inputs
# ----------------------------------------------------------------------------------------------

def make_batch(rng, batch_size, num_cls, size):
    """A synthetic batch: blocky superpixels (a grid of random rectangles, <= 64 ids drawn without
    replacement from 0..63 so some ids are absent), a low-contrast image (127 +- 4 per superpixel
    plus noise of std 1, so that the graph's input 'data - 127' is O(1) and conv1_1's gradient stays
    commensurate with its weights over a few SGD steps), and labels alternating single-class /
    multi-class rows.

    Returns dict data (N,3,size,size), superpixel (N,size,size), label (N,C), all float32.
    """
    data = np.zeros((batch_size, 3, size, size), np.float32)
    superpixel = np.zeros((batch_size, size, size), np.float32)
    label = np.zeros((batch_size, num_cls), np.float32)
    for n in range(batch_size):
        rows = np.sort(rng.choice(np.arange(1, size), rng.randint(2, 6), replace=False))
        cols = np.sort(rng.choice(np.arange(1, size), rng.randint(2, 6), replace=False))
        cell = np.searchsorted(rows, np.arange(size), side="right")[:, None] * (len(cols) + 1) \
            + np.searchsorted(cols, np.arange(size), side="right")[None, :]
        ids = rng.choice(MAX_SUPERPIXELS, (len(rows) + 1) * (len(cols) + 1), replace=False)
        superpixel[n] = ids[cell]
        colour = rng.uniform(127 - 4, 127 + 4, (3, MAX_SUPERPIXELS))
        data[n] = np.clip(colour[:, ids[cell]] + rng.normal(0, 1, (3, size, size)), 0, 255)
        # even rows single-class, odd rows 2..3 classes (section 3.1 skips the latter)
        count = 1 if n % 2 == 0 else min(num_cls, rng.randint(2, 4))
        label[n, rng.choice(num_cls, count, replace=False)] = 1
    return {"data": data, "superpixel": superpixel, "label": label}


def make_params(rng, num_cls, width, batch):
    """Random start parameters of the training graph as {'arg:NAME'|'aux:NAME': float32 array}.

    Convs are He-normal (std sqrt(2/fan_in)) with biases N(0, 0.01), then rescaled in graph order
    (weight and bias together, LSUV-style) so that every convolution's output has std 1 on
    ``batch`` in a training forward: activations neither vanish nor explode through the
    width-reduced VGG and the logits x_cam, S'' are O(1) for any seed. feat_bn gamma 1 / beta
    N(0, 0.1) / moving stats random, icd_bu_weight N(0, 1). icd_accum_resign_moving_mean is random
    with alternating order of its two columns over the classes, so both signs are exercised;
    classes absent from batch['label'] keep their start value: the first absent class is +1, the
    second -1, the third a tie [0, 0] (sign +1).
    """
    sym = get_symbol(num_cls, width, "train", dropout=0.0)
    shapes = {name: batch[name].shape for name in DATA_NAMES}
    arg_shapes, _, _ = sym.infer_shape(**shapes)
    params = {}
    for name, shape in zip(sym.list_arguments(), arg_shapes):
        if name in DATA_NAMES:
            continue
        if name == "icd_bu_weight":
            value = rng.normal(0, 1, shape)
        elif name == "feat_bn_gamma":
            value = np.ones(shape)
        elif name == "feat_bn_beta":
            value = rng.normal(0, 0.1, shape)
        elif name.endswith("_bias"):
            value = rng.normal(0, 0.01, shape)
        else:
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        params["arg:" + name] = value.astype(np.float32)
    c5 = channels(512, width)
    params["aux:feat_bn_moving_mean"] = rng.normal(0, 0.5, c5).astype(np.float32)
    params["aux:feat_bn_moving_var"] = rng.uniform(0.5, 2.0, c5).astype(np.float32)
    # sign +1 (column 0 >= column 1) for even classes, -1 for odd ones; of the classes absent from
    # the batch (which keep their value) the first is +1, the second -1, the third a tie
    plus = np.arange(num_cls) % 2 == 0
    absent = np.flatnonzero(batch["label"].sum(axis=0) == 0)
    plus[absent[:2]] = [True, False][:len(absent[:2])]
    pair = np.sort(rng.uniform(0.05, 1.0, (num_cls, 2)), axis=1)
    resign = np.where(plus[:, None], pair[:, ::-1], pair)
    resign[absent[2:3]] = 0.0
    params["aux:icd_accum_resign_moving_mean"] = resign.astype(np.float32)
    _unit_output_std(params, sym, batch)
    return params


def _unit_output_std(params, sym, batch):
    """Rescale every convolution's weight and bias in place, in graph order, so that its output
    has std 1 on ``batch`` (training-mode forward of that convolution's ancestors only: neither
    AccumResign nor any shared store is touched). Each layer gets a fresh executor: an executor
    bound for inference (MKLDNN subgraph) keeps the weights it saw at its first forward."""
    internals = sym.get_internals()
    convs = [name for stage in VGG_CONVS for name, _, _ in stage] + ["fc6", "fc7", "fc8", "fc6_ft",
                                                                      "fc7_ft", "conv_ft"]
    for name in convs:
        probe = internals[name + "_output"]
        exe = probe.simple_bind(mx.cpu(), grad_req="null", data=batch["data"].shape)
        for key, value in list(params.items()) + [("arg:data", batch["data"])]:
            target = exe.arg_dict.get(key[4:], exe.aux_dict.get(key[4:]))
            if target is not None:
                target[:] = value
        std = float(exe.forward(is_train=True)[0].asnumpy().std())
        for key in ("arg:%s_weight" % name, "arg:%s_bias" % name):
            if key in params:
                params[key] = (params[key] / std).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# running the reference
# ----------------------------------------------------------------------------------------------

def _split_params(params):
    """{'arg:X'|'aux:X': array or NDArray} -> (arg_params, aux_params) NDArray dicts."""
    arg, aux = {}, {}
    for key, value in params.items():
        kind, name = key.split(":", 1)
        (arg if kind == "arg" else aux)[name] = mx.nd.array(value, dtype=np.float32)
    return arg, aux


def _data_batch(batch):
    return mx.io.DataBatch(data=[mx.nd.array(batch[name], dtype=np.float32) for name in DATA_NAMES])


def _forward_in_device_order(mod, data_batch, order):
    """Training forward that runs the devices one after another, in ``order`` (device indices).

    Module.forward launches every device's executor asynchronously, so the order in which the
    devices reach AccumResign (and hence update the shared moving mean, section 3.2) depends on
    scheduling: in the release it is a race. This does what DataParallelExecutorGroup.forward
    does, but waits for each device before starting the next, so that a bundle records one of
    the release's orders, the one given.
    """
    group = mod._exec_group
    mx.module.executor_group._load_data(data_batch, group.data_arrays, group.data_layouts)
    for d in order:
        group.execs[d].forward(is_train=True)
        mx.nd.waitall()


def _device_average(arrays):
    """Module.get_params' value of one parameter: the average of its per-device copies."""
    return (mx.nd.add_n(*[a.copyto(mx.cpu()) for a in arrays]) / len(arrays)).asnumpy()


def read_state(mod):
    """{'arg:NAME'|'aux:NAME': float32 array} of a bound Module, read from its executors.

    What Module.get_params / save_params returns (each parameter and aux state averaged over the
    devices' copies), but read after ``mx.nd.waitall()`` from the executors themselves: MXNet
    1.9.1's BatchNorm updates its moving statistics in its backward, and get_params right after
    update() was observed to return them from before that backward (docs/release.md 11).
    """
    mx.nd.waitall()
    execs = mod._exec_group.execs
    state = {"arg:" + name: _device_average([e.arg_dict[name] for e in execs])
             for name in mod._exec_group.param_names}
    state.update({"aux:" + name: _device_average([e.aux_dict[name] for e in execs])
                  for name in mod._exec_group.aux_names})
    return state


def read_momentum(mod):
    """{'mom:NAME': float32 array}: the SGD momentum of every parameter after the last update.

    Module keeps it in its kvstore's updater (keyed by name) when it updates on the kvstore
    (several devices), else in its own updater keyed by index * num_device + device.
    """
    updater = mod._kvstore._updater if mod._update_on_kvstore else mod._updater
    names = mod._exec_group.param_names
    num_device = len(mod._context)
    momentum = {}
    for key, value in updater.states.items():
        name = key if isinstance(key, str) else names[key // num_device]
        momentum.setdefault("mom:" + name, value.asnumpy())
    return momentum


def _reference_module(params, batch, meta, contexts):
    """The release's training graph as an mx.mod.Module on ``contexts``, bound to ``batch``'s
    shapes, started from ``params``, with its SGD (run_reference_steps' section 4)."""
    sym = get_symbol(meta["num_cls"], meta["width"], "train", dropout=meta.get("dropout", 0.0),
                     warmup_iters=meta["warmup_iters"])
    batch_size = batch["data"].shape[0]
    mod = mx.mod.Module(sym, data_names=DATA_NAMES, label_names=None, context=contexts)
    mod.bind(data_shapes=[(name, batch[name].shape) for name in DATA_NAMES], for_training=True)
    arg_params, aux_params = _split_params(params)
    mod.init_params(arg_params=arg_params, aux_params=aux_params)
    # Section 4: MXNet's Optimizer (1.9.1, verified by tests/test_symbols.py) gives wd_mult 0 to every
    # parameter whose name does not end in _weight or _gamma: biases and feat_bn_beta get no decay,
    # feat_bn_gamma is decayed. Module passes the parameter names (param_idx2name), so the default
    # applies unchanged; lr_mult 10 comes from the __lr_mult__ attrs of get_symbol.
    mod.init_optimizer(kvstore="device", optimizer="sgd", optimizer_params={
        "learning_rate": meta["lr"], "momentum": meta["momentum"], "wd": meta["wd"],
        "rescale_grad": 1.0 / batch_size})
    return mod


def _reference_step(mod, data_batch, order, several):
    """One training step of ``mod``: {key: float32 array} for the outputs before the update, the
    checkpoint and momentum after it and, on several devices, the shared store and each device's
    moving mean (run_reference_steps' keys without the step prefix)."""
    if several:
        _forward_in_device_order(mod, data_batch, order)
    else:
        mod.forward(data_batch, is_train=True)
    result = {name: out.asnumpy() for name, out in zip(TRAIN_OUTPUTS, mod.get_outputs())}
    mod.backward()
    mod.update()
    result.update(read_state(mod))
    result.update(read_momentum(mod))
    if several:
        result[STORE_KEY] = shared_moving_mean(RESIGN_KEY)
        result[DEVICES_KEY] = np.stack([exe.aux_dict[DEVICES_KEY.split(":")[1]].asnumpy()
                                        for exe in mod._exec_group.execs])
    return result


def run_reference_steps(params, batch, meta, contexts=None, order=None):
    """Train the release's graph ``meta['steps']`` steps on ``batch`` (the same batch every step).

    params: {'arg:NAME'|'aux:NAME': array} start values; batch: dict data/superpixel/label;
    meta: dict with num_cls, width, lr, momentum, wd, steps, warmup_iters, dropout;
    contexts: list of mx.Context (default [mx.cpu()]), the batch is split evenly across them;
    order: the device indices in the order their AccumResign updates the store (default context
    order).

    Section 4: mx.mod.Module, SGD with momentum, wd, rescale_grad = 1/batch_size (whole batch),
    constant lr, lr_mult 10 for fc8_weight, fc8_bias and conv_ft_weight (symbol attrs), MXNet's
    default wd_mult. The AccumResign store is reset and starts from params' aux value; the top-down
    warm-up counter starts at meta['warmup_iters'] on every device.

    Returns, as float32 numpy arrays, for every step k:
    'train/step{k}/cam_prob'|'icd_bu'|'icd_td_prob': outputs of step k before its update;
    'train/step{k}/arg:NAME'|'aux:NAME': the checkpoint after step k's update (read_state: every
    aux state, icd_accum_resign_moving_mean included, averaged over the devices' own copies);
    'train/step{k}/mom:NAME': the SGD momentum after step k (read_momentum);
    with several devices also 'train/step{k}/store:icd_accum_resign_moving_mean', the shared
    store after step k (not in a checkpoint; teacher forcing starts the next step from it), and
    'train/step{k}/devices:icd_accum_resign_moving_mean' (num_devices, C, 2), each device's aux.
    """
    contexts = contexts or [mx.cpu()]
    order = list(range(len(contexts))) if order is None else list(order)
    if sorted(order) != list(range(len(contexts))):
        raise ValueError("order %r is not a permutation of the %d devices" % (order, len(contexts)))
    mod = _reference_module(params, batch, meta, contexts)
    reset_shared_store(RESIGN_KEY)
    data_batch = _data_batch(batch)
    result = {}
    for step in range(meta["steps"]):
        prefix = "train/step%d/" % step
        step_result = _reference_step(mod, data_batch, order, several=len(contexts) > 1)
        result.update((prefix + key, value) for key, value in step_result.items())
    return result


def run_reference_infer(params, batch, meta, context=None):
    """Inference outputs of the release's graph: is_train=False, so feat_bn uses its moving
    statistics and the sign comes from the stored moving mean without update.

    params: {'arg:NAME'|'aux:NAME': array}; batch: dict data/superpixel/label.
    Returns {'infer/cam'|'infer/icd_bu'|'infer/icd_bu_sp'|'infer/icd_td': (N,C,h,w) float32}.
    """
    sym = get_symbol(meta["num_cls"], meta["width"], "infer", dropout=meta.get("dropout", 0.0))
    mod = mx.mod.Module(sym, data_names=DATA_NAMES, label_names=None, context=context or mx.cpu())
    mod.bind(data_shapes=[(name, batch[name].shape) for name in DATA_NAMES], for_training=False)
    arg_params, aux_params = _split_params(params)
    mod.init_params(arg_params=arg_params, aux_params=aux_params, allow_extra=True)
    mod.forward(_data_batch(batch), is_train=False)
    return {"infer/" + name: out.asnumpy() for name, out in zip(INFER_OUTPUTS, mod.get_outputs())}


def make_bundle(out_dir, num_cls=5, width=0.125, size=64, infer_size=None, batch_size=2, steps=3,
                warmup_iters=2, lr=1e-3, momentum=0.9, wd=5e-4, seed=0, contexts=None, order=None):
    """Write a parity bundle (format in the module docstring) to ``out_dir``; returns its meta dict.

    Everything random comes from numpy RandomState(seed), so a bundle is a function of its
    arguments. ``contexts`` (default [mx.cpu()]) are the training devices, ``order`` the order
    of their store updates (default context order).
    """
    infer_size = infer_size or size
    rng = np.random.RandomState(seed)
    batch = make_batch(rng, batch_size, num_cls, size)
    infer = make_batch(rng, batch_size, num_cls, infer_size)
    params = make_params(rng, num_cls, width, batch)
    meta = {"num_cls": num_cls, "lr": lr, "momentum": momentum, "wd": wd, "batch_size": batch_size,
            "steps": steps, "warmup_iters": warmup_iters, "dropout": 0.0, "width": width, "size": size,
            "infer_size": infer_size, "seed": seed}
    return write_bundle(out_dir, meta, params, batch, infer, contexts, order)


def write_bundle(out_dir, meta, params, batch, infer, contexts=None, order=None):
    """Run the reference on ``batch`` from ``params`` (run_reference_steps on ``contexts`` in
    device ``order``, then run_reference_infer on ``infer`` with the final parameters) and
    write the bundle to ``out_dir``, each file atomically. ``meta`` needs num_cls, lr, momentum, wd, steps,
    warmup_iters, dropout, width; batch_size, num_devices and device_order are set here. Returns
    the meta."""
    contexts = contexts or [mx.cpu()]
    order = list(range(len(contexts))) if order is None else [int(d) for d in order]
    meta = dict(meta, batch_size=int(batch["data"].shape[0]), num_devices=len(contexts),
                device_order=order)
    expected = run_reference_steps(params, batch, meta, contexts, order)
    last = "train/step%d/" % (meta["steps"] - 1)
    final = {key[len(last):]: value for key, value in expected.items()
             if key.startswith((last + "arg:", last + "aux:"))}
    expected.update(run_reference_infer(final, infer, meta))

    write_json(os.path.join(out_dir, "meta.json"), meta)
    with atomic_path(os.path.join(out_dir, "params.params")) as tmp:
        mx.nd.save(tmp, {k: mx.nd.array(v) for k, v in params.items()})
    for name, arrays in (("batch.npz", batch), ("infer.npz", infer), ("expected.npz", expected)):
        with atomic_path(os.path.join(out_dir, name)) as tmp:
            np.savez(tmp, **arrays)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a parity bundle of the release's graph.")
    parser.add_argument("out_dir")
    parser.add_argument("--num-cls", type=int, default=5)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--infer-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup-iters", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cpus", type=int, default=1,
                        help="train on cpu(0) .. cpu(N-1), the batch split evenly over them")
    parser.add_argument("--order", default="",
                        help="with --cpus N: the order of the devices' sign-flip store updates, "
                             "e.g. 1,0 (default 0,1,...; the release's order is a race)")
    args = parser.parse_args(argv)
    meta = make_bundle(args.out_dir, num_cls=args.num_cls, width=args.width, size=args.size,
                       infer_size=args.infer_size, batch_size=args.batch_size, steps=args.steps,
                       warmup_iters=args.warmup_iters, seed=args.seed, lr=args.lr,
                       contexts=[mx.cpu(i) for i in range(args.cpus)],
                       order=[int(d) for d in args.order.split(",")] if args.order else None)
    print("bundle written to %s: %s" % (args.out_dir, json.dumps(meta, sort_keys=True)))


if __name__ == "__main__":
    main()
