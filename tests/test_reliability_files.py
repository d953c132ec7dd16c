"""Reliability, round 2 (issue #21 items 1-4 and 11's checkpoint part, issue #25 item 1): what a
stage loads (optimizer states: restricted and device-free; non-finite weights and scores), what
it deletes (--overwrite), who writes a folder (locks), checkpoints that are complete or absent."""
import dataclasses
import errno
import json
import logging
import os
import pickle
import signal
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import icd.io
import icd.engine.hooks
import icd.engine.loop
import icd.tasks.segmentation
from icd.runs import checkpoint_path, complete_checkpoints, last_complete_epoch
from icd.checkpoint import (load_states,
                            read_params, read_states, save_states)
from icd.commands import infer_seg, seeds, superpixels
from icd.commands.train import check_resume
from icd.data.voc import read_list, read_mask
from icd.infer import infer
from icd.io import FolderInUse, exclusive_lock, write_json
from icd.provenance import ProvenanceError, lock_path, producing
from icd.data.dataset import DataPaths
from icd.seeds import SeedSettings, make_seeds
from icd.runs import snapshot_lock
from icd.tasks import train


# ---------------------------------------------------------------------------------------------
# Optimizer states: device-free, restricted loading

def small_trainer(contexts, update_on_kvstore):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(5, in_units=3, activation="relu"), gluon.nn.Dense(2, in_units=5))
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


def weights(net, ctx):
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
    expected = weights(net, saved_on[0])
    for devices in ([mx.cpu(0)], [mx.cpu(3), mx.cpu(4)]):
        resumed, resumed_trainer = small_trainer(devices, update_on_kvstore)
        resumed.load_parameters(params, ctx=devices)
        load_states(resumed_trainer, states)
        sgd_step(resumed, resumed_trainer, devices, 2)
        for ctx in devices:
            for name, value in weights(resumed, ctx).items():
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


# ---------------------------------------------------------------------------------------------
# Checkpoints complete or absent (issue #21.11)

def test_a_checkpoint_interrupted_before_its_params_is_not_resumable(tiny_config, monkeypatch):
    """Disk full (or SIGKILL) while checkpoint 1 is written leaves no .params of it; the fresh-run
    error advises the --begin-epoch of the last complete checkpoint, and that resume works."""
    cfg = tiny_config(num_epoch=3, model="vgg16_cam")
    save = icd.engine.hooks.staged_params

    def disk_full_at_epoch_1(values, path):
        if path.endswith("0001.params"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(values, path)

    monkeypatch.setattr(icd.engine.hooks, "staged_params", disk_full_at_epoch_1)
    with pytest.raises(OSError):
        train(cfg)
    monkeypatch.setattr(icd.engine.hooks, "staged_params", save)
    assert not os.path.exists(checkpoint_path(cfg, 1))
    assert complete_checkpoints(cfg) == [0] and last_complete_epoch(cfg) == 0
    with pytest.raises(FileExistsError, match=r"Resume with --begin-epoch 1,"):
        train(cfg)
    train(tiny_config(num_epoch=3, model="vgg16_cam", begin_epoch=1))
    assert complete_checkpoints(cfg) == [0, 1, 2]


def test_params_without_states_advise_no_resume(tiny_config):
    """A .params alone (e.g. copied for inference) cannot be resumed: the errors say so."""
    cfg = tiny_config(model="vgg16_cam", num_epoch=1)
    train(cfg)
    os.remove(checkpoint_path(cfg, 0, "states"))
    assert last_complete_epoch(cfg) is None
    with pytest.raises(FileExistsError) as error:
        train(cfg)
    assert "--begin-epoch" not in str(error.value) and "--overwrite" in str(error.value)


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "out.json")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(icd.io.json, "dump", full)
    with pytest.raises(OSError, match=rf"{path}: no space left on device") as error:
        write_json(path, {"a": 1})
    assert error.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_disk_full_in_mxnet_names_the_file(tmp_path, monkeypatch):
    """MXNet says `FileStream.Write incomplete` on a full disk: the error names the file."""
    from icd.checkpoint import save_checkpoint
    net = gluon.nn.Dense(2, in_units=2)
    net.initialize()
    path = str(tmp_path / "m-0000.params")
    real = os.statvfs

    def full(folder):
        stat = real(folder)
        return os.statvfs_result((stat.f_bsize, stat.f_frsize, stat.f_blocks, 0, 0) + tuple(
            stat)[5:])

    def incomplete(*args):
        raise mx.base.MXNetError("Check failed: FileStream.Write incomplete")

    monkeypatch.setattr(icd.io.os, "statvfs", full)
    monkeypatch.setattr(mx.nd, "save", incomplete)
    with pytest.raises(OSError, match=rf"{path}: no space left on device"):
        save_checkpoint(net, path)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Non-finite weights and scores (issue #21.4)

@pytest.fixture
def trained(tiny_config):
    cfg = tiny_config(num_epoch=1)
    train(cfg)
    return cfg


def test_non_finite_weights_and_scores_are_refused(trained, tmp_path):
    values = read_params(checkpoint_path(trained, 0))
    key = sorted(values)[3]
    values[key][0] = np.nan
    broken = str(tmp_path / "nan-0000.params")
    mx.nd.save(broken, values)
    results = str(tmp_path / "results")
    with pytest.raises(ValueError, match=rf"{broken}: tensor {key}: \d+ of \d+ values are NaN"):
        infer(trained, broken, results, [mx.cpu()])
    infer(trained, checkpoint_path(trained, 0), results, [mx.cpu()])
    name = sorted(os.listdir(os.path.join(results, "scores_icd")))[0]
    score = os.path.join(results, "scores_icd", name)
    array = np.load(score)
    array[0, 0, 0] = np.inf
    np.save(score, array)
    with pytest.raises(ValueError, match=rf"{score}: scores: 1 of \d+ values are NaN or inf"):
        make_seeds(results, DataPaths(trained.image_root, trained.annotation_root,
                                      trained.data_list), SeedSettings(crf=False))


def test_inference_refuses_non_finite_scores(trained, tmp_path):
    """Finite weights so large that the CAM overflows: nothing non-finite is written."""
    values = read_params(checkpoint_path(trained, 0))
    values["arg:fc8_weight"][:] = 1e38
    values["arg:fc8_bias"][:] = 3e38
    huge = str(tmp_path / "huge-0000.params")
    mx.nd.save(huge, values)
    results = str(tmp_path / "results")
    with pytest.raises(ValueError, match=r"scores_\w+/\w+\.npy: scores of \w+: \d+ of \d+ "
                                         r"values are NaN or infinite"):
        infer(trained, huge, results, [mx.cpu()])
    assert not any(f.endswith(".npy") for _, _, files in os.walk(results) for f in files)


# ---------------------------------------------------------------------------------------------
# --overwrite deletes only what the stage writes (issue #21.2)

def test_overwrite_never_follows_a_link_out_of_the_results(trained, tmp_path):
    results = tmp_path / "results"
    user = tmp_path / "user_files"
    user.mkdir()
    (user / "thesis.npy").write_bytes(b"mine")
    results.mkdir()
    os.symlink(user, results / "scores_icd")
    overwrite = dataclasses.replace(trained, overwrite=True)
    with pytest.raises(ProvenanceError, match=r"scores_icd: is a symbolic link to .*user_files, "
                                              r"outside .*results; refusing"):
        infer(overwrite, checkpoint_path(trained, 0), str(results), [mx.cpu()])
    assert (user / "thesis.npy").read_bytes() == b"mine"


def test_overwrite_keeps_files_the_stage_does_not_write(trained, tmp_path, monkeypatch, caplog):
    """Issue 30 item 1: `icd-seeds --out . --overwrite` deleted the user's holiday.png (not in
    the list, never written by a stage). Only `<id>.png` of this run's ids and of the ids its
    record lists are removed, and a log line names what was kept."""
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 0), results, [mx.cpu()])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "scores.npy").write_bytes(b"keep me too")
    (out / "holiday.png").write_bytes(b"my photo")
    (out / "extra").mkdir()
    monkeypatch.chdir(out)
    argv = ["--results", results, "--image-root", trained.image_root, "--annotation-root",
            trained.annotation_root, "--data-list", trained.data_list, "--no-crf", "--out", ".",
            "--workers", "1"]
    names = read_list(trained.data_list)
    (out / f"{names[0]}.png").write_bytes(b"an old seed")
    with caplog.at_level(logging.INFO, logger="icd.provenance"):
        assert seeds.main(argv + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "scores.npy").read_bytes() == b"keep me too"
    assert (out / "holiday.png").read_bytes() == b"my photo" and (out / "extra").is_dir()
    assert read_mask(str(out / f"{names[0]}.png")).ndim == 2   # rewritten
    assert ("kept 4 files the seeds stage did not write: extra/, holiday.png, notes.txt, "
            "scores.npy") in caplog.text
    assert json.loads((tmp_path / "mine.provenance.json").read_text())["state"] == "complete"
    # files of the ids the record lists are the stage's, even when the list no longer names them
    shorter = tmp_path / "shorter.txt"
    shorter.write_text(names[1] + "\n")
    assert seeds.main(argv[:-6] + [str(shorter), "--no-crf", "--out", ".", "--overwrite"]) == 0
    assert set(os.listdir(out)) == {"extra", "holiday.png", f"{names[1]}.png", "notes.txt",
                                    "scores.npy"}


def test_an_output_folder_that_is_an_input_is_refused(trained, tmp_path, capsys):
    """Issue 30: `icd-seeds --out` equal to the scores folder it reads replaced that folder's
    provenance record; now an error naming both flags, before anything is written."""
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 0), results, [mx.cpu()])
    scores = os.path.join(results, "scores_icd")
    record = open(scores + ".provenance.json").read()
    argv = ["--results", results, "--image-root", trained.image_root, "--annotation-root",
            trained.annotation_root, "--data-list", trained.data_list, "--no-crf"]
    assert seeds.main(argv + ["--out", scores + "/"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --out {scores}/: is the folder the stage reads as --results/--icd-scores "
        f"{scores}; a stage never writes into its input, choose another --out")
    assert open(scores + ".provenance.json").read() == record
    assert seeds.main(argv + ["--out", trained.image_root]) == 1
    assert "reads as --image-root" in capsys.readouterr().err
    gt = tmp_path / "segmentation" / "pred"   # predictions over the ground truth they are scored on
    assert infer_seg.main(["--model", "vgg16_largefov", "--image-root", trained.image_root,
                           "--data-list", trained.data_list, "--params", "none.params",
                           "--gt-root", str(gt), "--out", str(gt.parent)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --out/pred {gt}: is the folder the stage reads as --gt-root {gt}; a stage never "
        f"writes into its input, choose another --out")
    out = str(tmp_path / "sp")
    assert superpixels.main(["--image-root", out, "--data-list", trained.data_list, "--out",
                             out, "--features", "colour"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}: is the folder the stage reads as --image-root {out}; a stage never "
        f"writes into its input, choose another --out")


# ---------------------------------------------------------------------------------------------
# One run per folder: OS advisory locks (issue #21.3)

HOLD = """
import sys, time
from icd.io import exclusive_lock
with exclusive_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder():
    """Start a process holding a lock (bounded: it ends by itself after 60 s, and is killed)."""
    started = []

    def start(path, folder):
        process = subprocess.Popen([sys.executable, "-c", HOLD, path, folder],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_a_second_training_into_the_snapshot_refuses_naming_the_first(tiny_config, holder,
                                                                       caplog):
    cfg = tiny_config(model="vgg16_cam", num_epoch=1)
    lock = os.path.join(cfg.snapshot, f"{cfg.model}.lock")
    process = holder(lock, cfg.snapshot)
    with pytest.raises(FolderInUse, match=rf"snapshot \(vgg16_cam\): in use by another run \(pid "
                                          rf"{process.pid} on host .* since .*; lock {lock}\)"):
        train(cfg)
    assert not os.path.exists(checkpoint_path(cfg, 0))
    process.send_signal(signal.SIGKILL)                  # gone without releasing: stale
    process.wait(timeout=30)
    train(cfg)
    assert f"pid {process.pid}" in caplog.text and "taking over the lock" in caplog.text
    assert complete_checkpoints(cfg) == [0]
    assert not os.path.exists(lock)                      # released on exit
    with snapshot_lock(cfg):                             # and free again
        pass


def test_result_folders_are_locked_while_written(tmp_path, holder):
    folder = str(tmp_path / "results" / "seeds" / "crf")
    process = holder(lock_path(folder), folder)
    with pytest.raises(FolderInUse, match=rf"crf: in use by another run \(pid {process.pid}"):
        with producing([folder], "seeds", {"a": 1}):
            pass
    assert not os.path.exists(folder)
    process.terminate()
    process.wait(timeout=30)
    with producing([folder], "seeds", {"a": 1}):
        with exclusive_lock(lock_path(folder), folder):   # re-entrant in the holding process
            assert os.path.isfile(lock_path(folder))
        assert os.path.isfile(lock_path(folder))
    assert not os.path.exists(lock_path(folder))


def test_a_second_evaluation_into_a_report_folder_refuses(tmp_path, tiny_voc, holder, capsys):
    from icd.commands import evaluate as evaluate_command
    results = tmp_path / "results"
    results.mkdir()
    out = str(results / "eval")
    process = holder(lock_path(out), out)
    assert evaluate_command.main(["--results", str(results), "--gt-root", tiny_voc["gt_root"],
                                  "--data-list", tiny_voc["data_list"]]) == 1
    assert f"error: {out}: in use by another run (pid {process.pid} " in capsys.readouterr().err
