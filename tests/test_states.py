"""Optimizer states (.states files, icd.checkpoint): saved device-free and resumed on other
devices, read without running pickled code, named when of another content or model; on resume
the run's own optimizer settings with the file's arrays only, the .states tied to its .params
and run record, the per-parameter update counts of a multi-device run."""
import json
import os
import pickle
import re
import shutil

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import icd.engine.loop
from icd.checkpoint import (_updaters, file_digest, load_states, read_params, read_states,
                            save_states, trainer_params, update_counts)
from icd.commands.train import check_resume
from icd.runs import checkpoint_path
from icd.tasks import train


FLOAT32_NOISE = 8 * np.finfo(np.float32).eps   # a few roundings of a value of size 1


def small_net(contexts):
    """Two dense layers whose parameter names are the same in every instance (the Trainer
    numbers parameters by sorted name)."""
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Dense(5, in_units=3, activation="relu", prefix="a_"),
                gluon.nn.Dense(2, in_units=5, prefix="b_"))
    net.initialize(mx.init.Xavier(), ctx=contexts)
    return net


def backward(net, contexts, seed):
    """The gradients of one batch of 4, split over `contexts`."""
    x = mx.nd.array(np.random.default_rng(seed).standard_normal((4, 3)))
    with autograd.record():
        losses = [(net(p) ** 2).sum() for p in gluon.utils.split_and_load(x, contexts)]
    autograd.backward(losses)


def step(net, trainer, contexts, seed):
    backward(net, contexts, seed)
    trainer.step(4)


def weights(net, ctx):
    return {name: p.data(ctx).asnumpy() for name, p in net.collect_params().items()}


def assert_same_step(before, after, expected, what):
    """`after` - `before` equals `expected` - `before` up to float32 rounding of the weights."""
    for i in before:
        tolerance = FLOAT32_NOISE * max(np.abs(before[i]).max(), 1.0)
        np.testing.assert_allclose(after[i] - before[i], expected[i] - before[i], rtol=0,
                                   atol=tolerance, err_msg=f"{what}: parameter {i}")


# ---------------------------------------------------------------------------------------------
# Update counts per parameter, whatever device updated it

def kvstore_step(net, trainer, contexts, seed, placement):
    """One step as MXNet's `kvstore('device')` makes it on GPUs with update_on_kvstore: the
    gradients of each parameter summed on one device (its merge buffer: `placement[i]`), the
    kvstore's updater run there on that device's weight, the result copied to every device. On
    CPU contexts MXNet runs the updater on cpu_pinned(0) for every parameter, so the per-device
    counts of GPUs have to be made this way."""
    backward(net, contexts, seed)
    updater = _updaters(trainer)[0]
    updater.optimizer.rescale_grad = 1.0 / 4
    for i, param in enumerate(trainer_params(trainer)):
        device = placement[i]
        grad = mx.nd.add_n(*[g.as_in_context(device) for g in param.list_grad()])
        weight = param.data(device)
        updater(i, grad, weight)
        for copy in param.list_data():
            if copy.context != device:
                weight.copyto(copy)


def adam_trainer(net):
    return gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01, "wd": 5e-4},
                         kvstore="device")


@pytest.mark.parametrize("devices", [[mx.cpu(0)], [mx.cpu(3), mx.cpu(4)]])
def test_adam_counts_of_two_devices_survive_a_resume(tmp_path, devices):
    """Adam trained on cpu(1), cpu(2), each parameter updated on one of them as a GPU kvstore
    does (MXNet counts per device id): the .states keeps every parameter's count, and a resume on
    one device (or two others, each parameter now updated on the other device) continues the
    counts and makes the uninterrupted run's next Adam step. Before: only the last device's
    counts were saved and Adam's bias correction restarted for the other half."""
    saved_on = [mx.cpu(1), mx.cpu(2)]
    net = small_net(saved_on)
    trainer = adam_trainer(net)
    placement = [saved_on[i % 2] for i in range(4)]
    for seed in range(3):
        kvstore_step(net, trainer, saved_on, seed, placement)
    counts = trainer.optimizer._all_index_update_counts
    assert {d: c for d, c in counts.items() if c} == {1: {0: 3, 2: 3}, 2: {1: 3, 3: 3}}
    params, states = str(tmp_path / "m.params"), str(tmp_path / "m.states")
    net.save_parameters(params)
    save_states(trainer, states)
    before = weights(net, saved_on[0])
    kvstore_step(net, trainer, saved_on, 3, placement)   # the uninterrupted run's next step
    expected = weights(net, saved_on[0])

    resumed = small_net(devices)
    resumed.load_parameters(params, ctx=devices)
    resumed_trainer = adam_trainer(resumed)
    load_states(resumed_trainer, states)
    optimizer = resumed_trainer.optimizer
    for device in {0} | {ctx.device_id for ctx in devices}:
        assert optimizer._all_index_update_counts[device] == {0: 3, 1: 3, 2: 3, 3: 3}, device
    assert optimizer.num_update == 3
    if len(devices) == 1:
        step(resumed, resumed_trainer, devices, 3)
    else:
        kvstore_step(resumed, resumed_trainer, devices, 3, [devices[(i + 1) % 2]
                                                           for i in range(4)])
    assert update_counts(optimizer) == {0: 4, 1: 4, 2: 4, 3: 4}
    for ctx in devices:
        assert_same_step(before, weights(resumed, ctx), expected, f"resumed on {ctx}")


# ---------------------------------------------------------------------------------------------
# The run's optimizer settings; the .states tied to its .params and run record

def sgd_trainer(net, momentum=0.9, wd=5e-4, lr=0.1):
    return gluon.Trainer(net.collect_params(), "sgd",
                         {"learning_rate": lr, "momentum": momentum, "wd": wd})


def edit_optimizer(path, **settings):
    """Rewrite the optimizer object of a .states file we wrote (a trusted file: plain pickle)."""
    with open(path, "rb") as f:
        states, optimizer = pickle.load(f)
    for name, value in settings.items():
        setattr(optimizer, name, value)
    with open(path, "wb") as f:
        pickle.dump((states, optimizer), f)


def test_a_states_file_never_replaces_the_runs_optimizer(tmp_path):
    """A .states whose optimizer says momentum 0, wd 0.5, lr 123 gives only its momentum arrays:
    the trainer keeps momentum 0.9, wd 5e-4, lr 0.1, and its next step is the uninterrupted
    run's."""
    ctx = [mx.cpu()]
    net = small_net(ctx)
    trainer = sgd_trainer(net)
    for seed in range(2):
        step(net, trainer, ctx, seed)
    params, states = str(tmp_path / "m.params"), str(tmp_path / "m.states")
    net.save_parameters(params)
    save_states(trainer, states)
    before = weights(net, ctx[0])
    step(net, trainer, ctx, 2)
    expected = weights(net, ctx[0])
    edit_optimizer(states, momentum=0.0, wd=0.5, lr=123.0)

    resumed = small_net(ctx)
    resumed.load_parameters(params, ctx=ctx)
    resumed_trainer = sgd_trainer(resumed)
    load_states(resumed_trainer, states)
    optimizer = resumed_trainer.optimizer
    assert (type(optimizer).__name__, optimizer.momentum, optimizer.wd,
            optimizer.learning_rate) == ("SGD", 0.9, 5e-4, 0.1)
    step(resumed, resumed_trainer, ctx, 2)
    assert_same_step(before, weights(resumed, ctx[0]), expected, "resumed")


def test_states_of_another_optimizer_are_refused(tmp_path):
    """SGD's momentum arrays are not Adam's (mean, variance), nor what SGD without momentum
    keeps (nothing): refused naming the file and the parameter, not applied as the run's."""
    ctx = [mx.cpu()]
    net = small_net(ctx)
    trainer = sgd_trainer(net)
    step(net, trainer, ctx, 0)
    states = str(tmp_path / "sgd.states")
    save_states(trainer, states)
    with pytest.raises(ValueError, match=rf"{states}: the state of parameter 0 \(net_a_bias\) "
                                         r"holds \('float32', \(5,\)\), but the run's optimizer "
                                         r"\(Adam\) keeps \(\('float32', \(5,\)\), "
                                         r"\('float32', \(5,\)\)\).*another optimizer"):
        load_states(adam_trainer(net), states)
    with pytest.raises(ValueError, match=rf"{states}: the state of parameter 0 .* keeps None"):
        load_states(sgd_trainer(net, momentum=0.0), states)


def test_release_states_only_files_resume_with_the_runs_optimizer(tmp_path):
    """The release's Module writes the states dict alone (docs/release.md section 4): its arrays
    are the trainer's momentum, the trainer's optimizer and settings stay."""
    ctx = [mx.cpu()]
    net = small_net(ctx)
    trainer = sgd_trainer(net)
    step(net, trainer, ctx, 0)
    path = str(tmp_path / "release.states")
    with open(path, "wb") as f:
        pickle.dump({i: s.copyto(mx.cpu()) for i, s in _updaters(trainer)[0].states.items()}, f)
    resumed = sgd_trainer(net, momentum=0.5)
    optimizer = resumed.optimizer
    load_states(resumed, path)
    assert resumed.optimizer is optimizer and optimizer.momentum == 0.5
    for i, state in _updaters(trainer)[0].states.items():
        np.testing.assert_array_equal(_updaters(resumed)[0].states[i].asnumpy(),
                                      state.asnumpy())


def test_resume_refuses_files_not_written_with_the_run_record(tiny_config, tmp_path, caplog):
    """Another run's .states (momentum 0.5, seed 7) copied into this run's checkpoint, this
    run's .states edited (momentum 0, wd 0.5, lr 123), or another run's .params: refused on
    resume naming the .states, the .params and the record; the checkpoint as written resumes, and
    so does one whose record an older version wrote (no digests: a warning)."""
    ours = tiny_config(num_epoch=1, model="vgg16_cam")
    other = tiny_config(num_epoch=1, model="vgg16_cam", momentum=0.5, seed=7)
    other.snapshot += "_other"
    train(ours)
    train(other)
    states, params = checkpoint_path(ours, 0, "states"), checkpoint_path(ours, 0)
    record_file = checkpoint_path(ours, 0, "json")
    record = json.load(open(record_file))
    assert record["digests"] == {"params": file_digest(params), "states": file_digest(states)}
    for path in (states, params):
        shutil.copy(path, tmp_path)
    resume = tiny_config(num_epoch=2, model="vgg16_cam", begin_epoch=1)

    def refused(changed):
        return re.escape(f"{states}, {params}: not the files run {record['run']} wrote at epoch "
                         f"0: {changed} differs from its digest in {record_file}")

    shutil.copy(checkpoint_path(other, 0, "states"), states)
    with pytest.raises(ValueError, match=refused(states)):
        train(resume)
    shutil.copy(tmp_path / os.path.basename(states), states)
    edit_optimizer(states, momentum=0.0, wd=0.5, lr=123.0)
    with pytest.raises(ValueError, match=refused(states)):
        train(resume)
    shutil.copy(tmp_path / os.path.basename(states), states)
    shutil.copy(checkpoint_path(other, 0), params)
    with pytest.raises(ValueError, match=refused(params)):
        train(resume)
    shutil.copy(tmp_path / os.path.basename(params), params)
    assert [r["epoch"] for r in train(resume)["records"]] == [0, 1]

    del record["digests"]
    json.dump(record, open(record_file, "w"))
    train(tiny_config(num_epoch=2, model="vgg16_cam", begin_epoch=1, overwrite=True))
    assert f"{record_file}: the run record holds no digests" in caplog.text


# ---------------------------------------------------------------------------------------------
# Device-free states, restricted loading

def small_trainer(contexts, update_on_kvstore):
    # fixed names: Gluon's Trainer indexes its parameters in the order of their sorted names, so
    # automatic names (dense9 before dense10 in one process, not in another) would pair a .states
    # file's arrays with other layers depending on how many networks the process built before
    net = gluon.nn.HybridSequential(prefix="small_")
    with net.name_scope():
        net.add(gluon.nn.Dense(5, in_units=3, activation="relu", prefix="first_"),
                gluon.nn.Dense(2, in_units=5, prefix="second_"))
    net.initialize(mx.init.Xavier(), ctx=contexts)
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": 0.1, "momentum": 0.9, "wd": 5e-4},
                            kvstore="device", update_on_kvstore=update_on_kvstore)
    return net, trainer


def sgd_step(net, trainer, contexts, seed):
    x = mx.nd.array(np.random.default_rng(seed).standard_normal((4, 3)))
    parts = gluon.utils.split_and_load(x, contexts)
    with autograd.record():
        losses = [(net(p) ** 2).sum() for p in parts]
    autograd.backward(losses)
    trainer.step(4)


def weights_by_position(net, ctx):
    """Parameter position -> value on `ctx` (Gluon's names differ between instances)."""
    return {i: p.data(ctx).asnumpy() for i, p in enumerate(net.collect_params().values())}


def all_arrays(state):
    if isinstance(state, (tuple, list)):
        return [a for s in state for a in all_arrays(s)]
    return [] if state is None else [state]


class _RawNDArray:
    """Stands in for NDArray when a states file is unpickled by `saved_devices`."""

    def __init__(self, *args):
        self.raw = b""

    def __setstate__(self, state):
        self.raw = bytes(state["handle"])


class _RawUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _RawNDArray if name == "NDArray" else super().find_class(module, name)


def saved_devices(path):
    """(device type, device id) each array of a states file was saved with: MXNet's raw bytes
    hold magic, storage type, ndim, the int64 dims, then the context (an array loaded on a CPU
    reports cpu(0) whatever it was saved from, so only the bytes tell)."""
    with open(path, "rb") as f:
        states, _ = _RawUnpickler(f).load()
    found = []
    for state in states.values():
        for array in all_arrays(state):
            ndim = int.from_bytes(array.raw[8:12], "little")
            offset = 12 + 8 * ndim
            found.append((int.from_bytes(array.raw[offset:offset + 4], "little"),
                          int.from_bytes(array.raw[offset + 4:offset + 8], "little")))
    return found


@pytest.mark.parametrize("update_on_kvstore", [None, False])   # None: Gluon picks True here
def test_states_saved_on_some_devices_resume_on_others(tmp_path, update_on_kvstore):
    """Issue #25.1: states written from cpu(1), cpu(2) hold every array on mx.cpu() and resume on
    cpu(0) alone or on cpu(3), cpu(4); one step from them equals the uninterrupted run's."""
    saved_on = [mx.cpu(1), mx.cpu(2)]
    net, trainer = small_trainer(saved_on, update_on_kvstore)
    for seed in range(2):
        sgd_step(net, trainer, saved_on, seed)
    params, states = str(tmp_path / "m.params"), str(tmp_path / "m.states")
    net.save_parameters(params)
    save_states(trainer, states)
    loaded, optimizer = read_states(states)
    assert isinstance(optimizer, mx.optimizer.SGD) and optimizer.momentum == 0.9
    assert saved_devices(states) == [(1, 0)] * 4          # four arrays, all on cpu(0)
    sgd_step(net, trainer, saved_on, 2)                   # the uninterrupted run's next step
    expected = weights_by_position(net, saved_on[0])
    for devices in ([mx.cpu(0)], [mx.cpu(3), mx.cpu(4)]):
        resumed, resumed_trainer = small_trainer(devices, update_on_kvstore)
        resumed.load_parameters(params, ctx=devices)
        load_states(resumed_trainer, states)
        sgd_step(resumed, resumed_trainer, devices, 2)
        for ctx in devices:
            for name, value in weights_by_position(resumed, ctx).items():
                # one device sums the batch in another order than two: float32 rounding only
                np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7,
                                           err_msg=f"{name} on {ctx}")


def test_training_saved_on_cpu1_cpu2_resumes_on_cpu3_cpu4(tiny_config, monkeypatch):
    """Issue #25.1 through the training loop: ICD trained on cpu(1), cpu(2) (update_on_kvstore),
    stopped after epoch 1, resumes on cpu(3), cpu(4) to the uninterrupted run's epoch 2."""
    import shutil
    monkeypatch.setattr(icd.engine.loop, "parse_devices", lambda gpus, cpus: [mx.cpu(1), mx.cpu(2)])
    straight = tiny_config(num_epoch=3, cpus=2)
    straight.snapshot += "_straight"
    train(straight)
    assert set(saved_devices(checkpoint_path(straight, 1, "states"))) == {(1, 0)}
    monkeypatch.setattr(icd.engine.loop, "parse_devices", lambda gpus, cpus: [mx.cpu(3), mx.cpu(4)])
    resumed = tiny_config(num_epoch=3, cpus=2, begin_epoch=2)
    os.makedirs(resumed.snapshot)
    for suffix in ("params", "states", "json"):
        shutil.copy(checkpoint_path(straight, 1, suffix), resumed.snapshot)
    train(resumed)
    a, b = (read_params(checkpoint_path(c, 2)) for c in (straight, resumed))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(b[key].asnumpy(), a[key].asnumpy(), err_msg=key)


class Payload:
    """A pickle that runs `touch <marker>` when loaded with pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("nested", [False, True])
def test_states_with_a_pickle_payload_run_nothing_and_are_named(tiny_config, tmp_path, nested):
    """Issue #21.1: a .states file carrying a __reduce__ payload (os.system) ran it on
    --begin-epoch; now the restricted reader refuses it, naming the file, and nothing runs."""
    marker = tmp_path / "pwned"
    cfg = tiny_config(begin_epoch=1)
    os.makedirs(cfg.snapshot)
    states = checkpoint_path(cfg, 0, "states")
    value = ({0: mx.nd.zeros(2), 1: Payload(marker)}, None) if nested else Payload(marker)
    with open(states, "wb") as f:
        pickle.dump(value, f)
    open(checkpoint_path(cfg, 0), "wb").close()
    with pytest.raises(ValueError, match=rf"{states}: not a readable optimizer-state file "
                                         rf"\(UnpicklingError: refused to load (posix|os)\.system"):
        check_resume(cfg)
    _, trainer = small_trainer([mx.cpu()], None)
    with pytest.raises(ValueError, match=rf"{states}: not a readable optimizer-state file"):
        load_states(trainer, states)
    assert not marker.exists()


def test_states_of_wrong_content_are_named(tmp_path):
    path = str(tmp_path / "x.states")
    with open(path, "wb") as f:
        pickle.dump({"a": [1, 2]}, f)
    with pytest.raises(ValueError, match=rf"{path}: not an optimizer-state file \(expected a "
                                         r"dict of parameter index"):
        read_states(path)
    with open(path, "wb") as f:
        pickle.dump(({0: 3.5}, None), f)
    with pytest.raises(ValueError, match=rf"{path}: state of parameter 0: a float, not an "):
        read_states(path)


def test_states_of_another_model_are_named(tmp_path):
    net, trainer = small_trainer([mx.cpu()], None)
    sgd_step(net, trainer, [mx.cpu()], 0)
    path = str(tmp_path / "small.states")
    save_states(trainer, path)
    other = gluon.nn.Dense(5, in_units=3)   # the first layer alone
    other.initialize()
    with pytest.raises(ValueError, match=rf"{path}: holds a state of parameter 2, but the model "
                                         r"trains 2 parameters"):
        load_states(gluon.Trainer(other.collect_params(), "sgd"), path)
    wider = gluon.nn.HybridSequential()
    wider.add(gluon.nn.Dense(6, in_units=3), gluon.nn.Dense(2, in_units=6))
    wider.initialize()
    with pytest.raises(ValueError, match=rf"{path}: the state of parameter 0 \(\w+\) has shape "
                                         r"\(5,( 3)?\), the parameter \(6,( 3)?\): the file "
                                         r"belongs to another model"):
        load_states(gluon.Trainer(wider.collect_params(), "sgd"), path)


def test_release_states_only_files_are_read(tmp_path):
    """The release's Module writes the states dict alone (no optimizer): still accepted."""
    path = str(tmp_path / "release.states")
    with open(path, "wb") as f:
        pickle.dump({0: mx.nd.ones((2, 3)), 1: None}, f)
    states, optimizer = read_states(path)
    assert optimizer is None and states[0].shape == (2, 3) and states[1] is None
