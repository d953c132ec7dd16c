"""Our Gluon ICDNet against the release's graph (symbols/) through parity bundles, teacher-forced:
every step is judged from the reference's state before it, so no test depends on how a chaotic
multi-step trajectory is conditioned (ORIGINAL_RELEASE.md section 11)."""
import os
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from icd.checkpoint import gather, read_params
from icd.devices import split_batch
from icd.io import write_json
from icd.parity import (build_from_params, check_bundle, load_momentum, read_bundle,
                        replay_infer, state_before, summary, train_step)
from icd.model.ops import share_moving_mean, unshare_moving_mean
from icd.train import checkpoint_path, make_trainer, train
from symbols.bundle import (make_batch, make_bundle, make_params, run_reference_infer,
                            write_bundle)

from conftest import REPO

TOOL = os.path.join(REPO, "tools", "check_parity.py")
RESIGN = "icd_accum_resign_moving_mean"
# name: (width, train size, infer size, classes, steps, warm-up iterations, seed, lr)
BUNDLES = {
    "small-lr1e-2": (0.125, 96, 80, 6, 4, 3, 3, 0.01),
    "small-lr1e-3": (0.125, 96, 80, 6, 4, 3, 7, 0.001),
    "321-513": (0.0625, 321, 513, 5, 2, 0, 0, 0.001),
    "full-width-lr1e-2": (1.0, 32, 40, 20, 2, 1, 0, 0.01),
    "full-width-lr1e-3": (1.0, 32, 40, 20, 2, 1, 1, 0.001),
}
# Bundles whose every step is well conditioned with a margin: three draws of the 1e-7
# perturbation stayed within 0.44 of every tolerance under the default oneDNN ISA, AVX2 and
# SSE41. Many seeds are not: "small" at seed 1 sits 2e-7 from a ReLU kink of conv3_1 in step 0
# (a 1e-7 perturbation moves conv3_1_weight's change by 2.7e-3). The larger bundles all have a
# threshold (ReLU, top-down mask, superpixel argmax) within 1e-7 on some ISA: at 32 px (4x4
# feature maps) one draw moves fc7_ft_weight's step-1 change by 1.4e-2 under SSE41, at
# 321 -> 513 up to 1.6e-3 (lr 1e-2); so their conditioning is not asserted, which would test
# this CPU's rounding rather than our model.
WELL_CONDITIONED = ("small-lr1e-2", "small-lr1e-3")


def write_named_bundle(tmp_path_factory, name):
    width, size, infer_size, num_cls, steps, warmup, seed, lr = BUNDLES[name]
    folder = str(tmp_path_factory.mktemp(f"bundle_{name}"))
    make_bundle(folder, num_cls=num_cls, width=width, size=size, infer_size=infer_size,
                steps=steps, warmup_iters=warmup, lr=lr, seed=seed)
    return folder


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def bundle(request, tmp_path_factory):
    return write_named_bundle(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    return write_named_bundle(tmp_path_factory, "small-lr1e-2")


def worst(errors, key=lambda e: e.error / e.tolerance, n=8):
    return "\n".join(f"{e.name} error {e.error:.3g} sensitivity {e.sensitivity} "
                     f"(tol {e.tolerance:.0e})" for e in sorted(errors, key=key)[-n:])


def test_gluon_model_matches_release_graph(bundle):
    errors = check_bundle(bundle)
    steps = read_bundle(bundle).steps
    assert len(errors) == steps * (3 + 43) + 4   # outputs, 40 args + 3 aux, inference
    assert all(e.ok for e in errors), worst(errors)
    assert summary(errors).endswith("PASS")


@pytest.mark.parametrize("name", WELL_CONDITIONED)
def test_every_step_is_well_conditioned(name, tmp_path_factory):
    """Replaces the former free-running 'well conditioned' test with one that judges one step:
    our step k from the reference's state before it, perturbed by 1e-7 (relative), stays within
    every tolerance of our unperturbed step k, and the check passes on every tensor. Otherwise
    the bundle would sit on a discontinuity (a ReLU, sign, mask or argmax flip) that another
    CPU's rounding could cross."""
    errors = check_bundle(write_named_bundle(tmp_path_factory, name), sensitivity=True)
    assert all(e.judged for e in errors), worst(errors, key=lambda e: e.sensitivity / e.tolerance)
    assert all(e.ok for e in errors), worst(errors)


def copy_bundle(source, target):
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes(open(os.path.join(source, name), "rb").read())
    return target


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True)


def test_checker_cli_passes_and_fails_on_one_changed_update(small_bundle, tmp_path):
    ok = run_tool(small_bundle)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 189 and all(line.endswith(" ok") for line in lines[:-1])
    assert re.fullmatch(r"parity: 188 tensors, worst \S+ at \S+: PASS", lines[-1])
    # the reference's update of icd_bu_weight in step 1 made 1% larger, the later states moved
    # with it: teacher-forced, step 1 fails and no other step does
    bad = copy_bundle(small_bundle, tmp_path / "bad")
    expected = dict(np.load(bad / "expected.npz"))
    key = "arg:icd_bu_weight"
    shift = 0.01 * (expected[f"train/step1/{key}"] - expected[f"train/step0/{key}"])
    for step in range(1, 4):
        expected[f"train/step{step}/{key}"] = expected[f"train/step{step}/{key}"] + shift
    np.savez(bad / "expected.npz", **expected)
    fail = run_tool(bad)
    assert fail.returncode == 1, fail.stdout[-2000:] + fail.stderr[-2000:]
    lines = fail.stdout.strip().splitlines()
    assert lines[-1].endswith(f"at train/step1/{key}: FAIL")
    assert [line.split()[0] for line in lines[:-1] if line.endswith("FAIL")] == \
        [f"train/step1/{key}"]


def test_free_running_reports_sensitivity(small_bundle):
    run = run_tool(small_bundle, "--free-running")
    assert run.returncode in (0, 1), run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    tensors = [line for line in lines if line.startswith(("train/step", "infer/")) and
               " sensitivity " in line]
    assert len(tensors) == 188
    assert all(line.endswith((" ok", " FAIL", " not judged")) for line in tensors)
    for step in range(4):
        assert any(line.startswith(f"train/step{step}: worst error ") for line in lines)
    assert re.fullmatch(r"sensitivity: \d+ of 188 tensors move beyond .* not judged", lines[-2])
    assert re.fullmatch(r"parity: 188 tensors, worst \S+ at \S+: (PASS|FAIL)", lines[-1])


@pytest.mark.parametrize("broken", ["expected.npz", "meta.json", "batch.npz", "steps"])
def test_a_broken_bundle_is_named(small_bundle, tmp_path, broken):
    bad = copy_bundle(small_bundle, tmp_path / "bad")
    if broken == "steps":   # a step more than expected.npz holds
        meta = read_bundle(str(bad)).meta
        write_json(str(bad / "meta.json"), dict(meta, steps=meta["steps"] + 1))
        named = bad / "expected.npz"
    else:
        (bad / broken).write_bytes(b"not what it should be")
        named = bad / broken
    with pytest.raises(ValueError, match=re.escape(str(named))):
        check_bundle(str(bad))
    run = run_tool(bad)
    assert run.returncode == 1 and not run.stdout
    assert run.stderr.strip().startswith("error: ") and str(named) in run.stderr


def two_device_batch(rng, num_cls=4, size=64):
    """Batch of 4 split over two devices: class 0 on both, class 1 only on device 0, class 2 only
    on device 1, class 3 absent."""
    batch = make_batch(rng, 4, num_cls, size)
    batch["label"][:] = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]]
    return batch


def test_two_devices_match_the_release_on_two_devices(tmp_path):
    """Data-parallel over cpu(0), cpu(1), teacher-forced: gradients summed and rescaled by the
    whole batch, BN per device, one sign-flip store updated once per device in device order
    (started from the bundle's store: key), and the checkpoint (icd.checkpoint.gather) against
    the release's, whose aux states are the devices' averages."""
    rng = np.random.RandomState(4)
    num_cls, width = 4, 0.125
    meta = {"num_cls": num_cls, "width": width, "lr": 0.01, "momentum": 0.9, "wd": 5e-4,
            "steps": 3, "warmup_iters": 2, "dropout": 0.0}
    batch = two_device_batch(rng, num_cls)
    infer = make_batch(rng, 2, num_cls, 48)
    params = make_params(rng, num_cls, width, batch)
    contexts = [mx.cpu(0), mx.cpu(1)]
    write_bundle(str(tmp_path), meta, params, batch, infer, contexts)
    bundle = read_bundle(str(tmp_path))
    for step in range(3):   # the checkpoint's mean is not the store: the test tells them apart
        assert not np.allclose(bundle.expected[f"train/step{step}/aux:{RESIGN}"],
                               bundle.expected[f"train/step{step}/store:{RESIGN}"])
    errors = check_bundle(str(tmp_path), contexts)
    names = {e.name for e in errors}
    assert {f"train/step{k}/{kind}:{RESIGN}" for k in range(3) for kind in ("aux", "store")} \
        <= names
    assert len(errors) == 3 * (3 + 43 + 1) + 4
    assert all(e.ok for e in errors), worst(errors)
    with pytest.raises(ValueError, match="recorded on 2 device"):
        check_bundle(str(tmp_path), [mx.cpu(0)])


def test_each_device_keeps_its_pull_and_the_checkpoint_averages_them():
    """Release: each device's sign-flip aux holds what it pulled right after its own push, and
    the checkpoint holds the average of the devices' copies (icd.checkpoint.gather)."""
    rng = np.random.RandomState(5)
    batch = two_device_batch(rng)
    params = make_params(rng, 4, 0.125, batch)
    meta = {"num_cls": 4, "dropout": 0.0}
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = build_from_params(params, meta, "params", contexts)
    trainer = make_trainer(net, 0.01, 0.9, 5e-4)
    parts = split_batch({k: mx.nd.array(v) for k, v in batch.items()}, contexts)
    store = share_moving_mean(net.share_key, mx.nd.array(params[f"aux:{RESIGN}"]), contexts)
    try:
        train_step(net, trainer, parts, 1.0, contexts)
    finally:
        unshare_moving_mean(net.share_key)
    copies = [c.asnumpy() for c in net.icd_accum_resign_moving_mean.list_data()]
    start, final = params[f"aux:{RESIGN}"], store.master.asnumpy()
    np.testing.assert_array_equal(copies[1], final)              # device 1 pushed last
    np.testing.assert_array_equal(copies[0][3], start[3])        # class 3 absent: kept
    np.testing.assert_array_equal(copies[0][2], start[2])        # class 2 is on device 1 only
    assert not np.allclose(copies[0][:2], start[:2]) and not np.allclose(copies[0], final)
    np.testing.assert_allclose(gather(net)[f"aux:{RESIGN}"].asnumpy(),
                               (copies[0] + copies[1]) / 2, rtol=1e-6)


def test_momentum_is_loaded_into_the_trainer(small_bundle):
    """One SGD step from a loaded momentum: w1 = w0 + 0.9 mom0 - lr (g / B + wd w0)."""
    bundle = read_bundle(small_bundle)
    net = build_from_params(state_before(bundle, 1), bundle.meta, "state", [mx.cpu()])
    trainer = make_trainer(net, 0.0, 0.9, 0.0)   # lr 0: the step is 0.9 times the momentum
    rng = np.random.RandomState(0)
    momentum = {f"arg:{p.name}": rng.randn(*p.shape).astype(np.float32)
                for p in trainer._params}
    load_momentum(trainer, momentum)
    before = {k: v.asnumpy() for k, v in gather(net).items()}
    parts = [{k: mx.nd.array(v) for k, v in bundle.batch.items()}]
    train_step(net, trainer, parts, 1.0, [mx.cpu()])
    after = {k: v.asnumpy() for k, v in gather(net).items()}
    for key in ("arg:icd_bu_weight", "arg:conv1_1_weight", "arg:fc8_bias"):
        np.testing.assert_allclose(after[key] - before[key], 0.9 * momentum[key], rtol=1e-4,
                                   atol=1e-6)


def test_our_checkpoint_runs_in_the_release_graph(tiny_config, tiny_voc):
    cfg = tiny_config(num_epoch=1)
    net = train(cfg)["net"]
    params = {k: v.asnumpy() for k, v in read_params(checkpoint_path(cfg, 0)).items()}
    rng = np.random.RandomState(0)
    batch = make_batch(rng, 2, cfg.num_cls, 48)
    meta = {"num_cls": cfg.num_cls, "width": cfg.width, "dropout": 0.0}
    ref = run_reference_infer(params, batch, meta)
    ours = replay_infer(net, batch, mx.cpu())
    for key, value in ref.items():
        scale = max(np.abs(value).max(), 1e-6)
        assert np.abs(ours[key] - value).max() / scale < 1e-4, key
