"""Our Gluon ICDNet against the release's graph (symbols/) through parity bundles, teacher-forced:
every step is judged from the reference's state before it, so no test depends on how a chaotic
multi-step trajectory is conditioned (docs/release.md section 11)."""
import os
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

import symbols.ops
from icd.checkpoint import gather, read_params
from icd.devices import split_batch
from icd.engine import make_trainer
from icd.io import write_json
from icd.model.ops import share_moving_mean, unshare_moving_mean
from icd.parity import (NOISE_CAP, NOISE_FACTOR, build_from_params, check_bundle, load_momentum,
                        read_bundle, replay_infer, replay_step, state_before, summary)
from icd.runs import checkpoint_path
from icd.tasks import train
from symbols.bundle import make_batch, make_bundle, make_params, run_reference_infer, write_bundle

from helpers import REPO


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
# SSE41, so none of their tensors is unjudgeable. Many seeds are not: "small" at seed 1 sits
# 2e-7 from a ReLU kink of conv3_1 in step 0 (a 1e-7 perturbation moves conv3_1_weight's change
# by 2.7e-3). The larger bundles all have a threshold (ReLU, top-down mask, superpixel argmax)
# within 1e-7 on some ISA: at 32 px (4x4 feature maps) one draw moves fc7_ft_weight's step-1
# change by 1.4e-2 under SSE41, at 321 -> 513 up to 1.6e-3 (lr 1e-2): the checker reports such
# tensors unjudgeable, and how many is this CPU's rounding, not our model, so not asserted.
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


def worst(errors, key=lambda e: e.error / e.bound, n=8):
    return "\n".join(f"{e.name} error {e.error:.3g} noise {e.noise} (tol {e.tolerance:.0e}, "
                     f"bound {e.bound:.3g})" for e in sorted(errors, key=key)[-n:])


def test_gluon_model_matches_release_graph(bundle, request):
    """The default, noise-aware check passes on every bundle; on the well-conditioned ones
    every tensor is judged and within its fixed tolerance as well (no step sits on a
    discontinuity, a ReLU, sign, mask or argmax flip, that another CPU's rounding could cross)."""
    errors = check_bundle(bundle)
    steps = read_bundle(bundle).steps
    assert len(errors) == steps * (3 + 43) + 4   # outputs, 40 args + 3 aux, inference
    assert all(e.noise is not None and e.bound >= e.tolerance for e in errors)
    assert all(e.ok for e in errors if e.judged), worst(errors)
    assert summary(errors).endswith("PASS")
    if request.node.callspec.params["bundle"] in WELL_CONDITIONED:
        assert all(e.judged and e.error <= e.tolerance for e in errors), \
            worst(errors, key=lambda e: e.noise)


def copy_bundle(source, target):
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes(open(os.path.join(source, name), "rb").read())
    return target


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True)


def changed_update(source, target, key, step, factor):
    """A copy of bundle `source` whose reference update of `key` in `step` is `factor` larger;
    the later states move with it (teacher-forced, only `step`'s change differs)."""
    bad = copy_bundle(source, target)
    expected = dict(np.load(bad / "expected.npz"))
    before = expected[f"train/step{step - 1}/{key}"]
    shift = factor * (expected[f"train/step{step}/{key}"] - before)
    for k in range(step, read_bundle(str(bad)).steps):
        expected[f"train/step{k}/{key}"] = expected[f"train/step{k}/{key}"] + shift
    np.savez(bad / "expected.npz", **expected)
    return bad


LINE = re.compile(r"(\S+) +error (\S+) tol (\S+) noise (\S+) bound (\S+) (ok|FAIL|unjudgeable)")


def test_checker_cli_prints_noise_and_bound(small_bundle):
    ok = run_tool(small_bundle)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 189
    for line in lines[:-1]:
        name, error, tol, noise, bound, status = LINE.fullmatch(line).groups()
        assert float(bound) == pytest.approx(max(float(tol), NOISE_FACTOR * float(noise)),
                                             rel=1e-3)
        assert status == "ok" and float(error) <= float(bound) and float(noise) <= NOISE_CAP
    assert sum(float(LINE.fullmatch(line).group(4)) > 0 for line in lines[:-1]) > 150
    assert re.fullmatch(r"parity: 188 tensors, 0 unjudgeable \(noise > 0.001\), worst \S+ "
                        r"\(bound \S+\) at \S+: PASS", lines[-1])
    strict = run_tool(small_bundle, "--strict")
    assert strict.returncode == 0 and " noise " not in strict.stdout
    assert re.fullmatch(r"parity: 188 tensors, worst \S+ \(bound 0.001\) at \S+: PASS",
                        strict.stdout.strip().splitlines()[-1])


def test_the_noise_includes_the_other_kernels_rounding(small_bundle, monkeypatch):
    """The kernel replays run in a process under the named oneDNN cap and return every tensor of
    the bundle; their movement from our own replay is part of each tensor's noise."""
    import icd.parity as parity
    sse41 = parity.replay_under_isa(small_bundle, 1, False, "SSE41")
    ours = parity.replay(parity.read_bundle(small_bundle), [mx.cpu(0)])
    assert sorted(sse41) == sorted(ours)
    for key, value in ours.items():   # the same model: within float32 rounding of each other
        assert np.abs(sse41[key] - value).max() <= 1e-3 * max(np.abs(value).max(), 1e-3), key
    caps, name = [], "infer/cam"

    def moved(folder, num_devices, free_running, isa):   # a kernel that rounds one tensor off
        caps.append(isa)
        shifted = dict(ours)
        shifted[name] = ours[name] + 2 * NOISE_CAP * np.abs(ours[name]).max()
        return shifted
    monkeypatch.setattr(parity, "replay_under_isa", moved)
    errors = {e.name: e for e in check_bundle(small_bundle, runs=0)}
    assert caps == list(parity.KERNEL_CAPS)
    assert not errors[name].judged and errors[name].noise > NOISE_CAP
    assert all(e.noise == 0 for n, e in errors.items() if n != name)
    assert check_bundle(small_bundle, runs=0, kernels=False)[0].noise == 0


@pytest.mark.parametrize("factor", [0.01, 0.005])
def test_checker_cli_fails_on_one_update_changed_by(factor, small_bundle, tmp_path):
    """The reference's step-1 update of icd_bu_weight made 1% / 0.5% larger: step 1 of that
    tensor fails, with its noise printed, and no other tensor does."""
    key = "arg:icd_bu_weight"
    fail = run_tool(changed_update(small_bundle, tmp_path / "bad", key, 1, factor))
    assert fail.returncode == 1, fail.stdout[-2000:] + fail.stderr[-2000:]
    lines = fail.stdout.strip().splitlines()
    assert lines[-1].startswith("parity: 188 tensors, 0 unjudgeable")
    assert lines[-1].endswith(f"at train/step1/{key}: FAIL")
    failed = [LINE.fullmatch(line).groups() for line in lines[:-1] if line.endswith("FAIL")]
    assert [groups[0] for groups in failed] == [f"train/step1/{key}"]
    assert float(failed[0][1]) == pytest.approx(factor, rel=0.05)


def test_full_width_bundle_fails_on_updates_changed_by_one_and_half_percent(tmp_path_factory,
                                                                            tmp_path):
    """Full-width VGG16: conv3_1's step-1 update (the tensor the issue's real bundle failed on
    at a fixed 1e-3) made 0.5% larger and conv4_2's 1%: both fail, named, and no other training
    tensor does (the inference outputs, computed from the changed final state, may)."""
    source = write_named_bundle(tmp_path_factory, "full-width-lr1e-3")
    bad = changed_update(source, tmp_path / "half", "arg:conv3_1_weight", 1, 0.005)
    bad = changed_update(bad, tmp_path / "both", "arg:conv4_2_weight", 1, 0.01)
    errors = check_bundle(str(bad))
    failed = {e.name for e in errors if e.judged and not e.ok and e.name.startswith("train/")}
    assert sorted(failed) == ["train/step1/arg:conv3_1_weight", "train/step1/arg:conv4_2_weight"]
    assert summary(errors).endswith(": FAIL")


@pytest.mark.slow
def test_a_full_width_bundle_recorded_under_another_isa_passes(tmp_path):
    """A full-width bundle recorded by symbols/ with oneDNN capped at SSE4.1 (other kernels, other
    rounding than this process's ISA) passes the default check here: the ISA's rounding is
    within the noise bounds (under .ci/run's SSE41 pass both sides use SSE4.1: then AVX2)."""
    isa = "AVX2" if os.environ.get("DNNL_MAX_CPU_ISA", "").upper() == "SSE41" else "SSE41"
    width, size, infer_size, num_cls, steps, warmup, seed, lr = BUNDLES["full-width-lr1e-3"]
    record = subprocess.run(
        [sys.executable, "-m", "symbols.bundle", str(tmp_path), "--width", str(width),
         "--size", str(size), "--infer-size", str(infer_size), "--num-cls", str(num_cls),
         "--steps", str(steps), "--warmup-iters", str(warmup), "--seed", str(seed),
         "--lr", str(lr)], cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, DNNL_MAX_CPU_ISA=isa))
    assert record.returncode == 0, record.stderr[-2000:]
    errors = check_bundle(str(tmp_path))
    assert summary(errors).endswith("PASS"), worst(errors)
    assert sum(e.judged for e in errors) >= 0.9 * len(errors)


def test_free_running_reports_noise(small_bundle):
    run = run_tool(small_bundle, "--free-running")
    assert run.returncode in (0, 1), run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    tensors = [LINE.fullmatch(line) for line in lines[:-1]]
    assert len(tensors) == 188 and all(tensors)
    unjudgeable = sum(t.group(6) == "unjudgeable" for t in tensors)
    assert unjudgeable == sum(float(t.group(4)) > NOISE_CAP for t in tensors)
    assert re.fullmatch(rf"parity: 188 tensors, {unjudgeable} unjudgeable \(noise > 0.001\), "
                        r"worst \S+ \(bound \S+\) at \S+: (PASS|FAIL)", lines[-1])


IMPORT_WATCH = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "mxnet":
            print({k: os.environ.get(k) for k in DETERMINISM_NAMES})
            sys.meta_path.remove(self)
        return None
DETERMINISM_NAMES = ("MXNET_ENFORCE_DETERMINISM", "MXNET_CUDNN_AUTOTUNE_DEFAULT",
                     "NVIDIA_TF32_OVERRIDE")
sys.meta_path.insert(0, Watch())
import icd.commands.parity
"""


def test_icd_parity_sets_the_determinism_variables_before_mxnet_loads():
    """docs/gpus.md: deterministic kernels, no cuDNN autotune, no TF32, set by
    icd-parity before MXNet is imported (MXNet reads them when it loads)."""
    env = {k: v for k, v in os.environ.items() if k not in
           ("MXNET_ENFORCE_DETERMINISM", "MXNET_CUDNN_AUTOTUNE_DEFAULT", "NVIDIA_TF32_OVERRIDE")}
    run = subprocess.run([sys.executable, "-c", IMPORT_WATCH], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str({"MXNET_ENFORCE_DETERMINISM": "1",
                                      "MXNET_CUDNN_AUTOTUNE_DEFAULT": "0",
                                      "NVIDIA_TF32_OVERRIDE": "0"})


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


def write_two_device_bundle(folder, order):
    rng = np.random.RandomState(4)
    num_cls, width = 4, 0.125
    meta = {"num_cls": num_cls, "width": width, "lr": 0.01, "momentum": 0.9, "wd": 5e-4,
            "steps": 3, "warmup_iters": 2, "dropout": 0.0}
    batch = two_device_batch(rng, num_cls)
    infer = make_batch(rng, 2, num_cls, 48)
    params = make_params(rng, num_cls, width, batch)
    write_bundle(folder, meta, params, batch, infer, [mx.cpu(0), mx.cpu(1)], order)
    return read_bundle(folder)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_devices_match_the_release_on_two_devices(order, tmp_path):
    """Data-parallel over cpu(0), cpu(1), teacher-forced, the devices in either order of the
    release's race: gradients summed and rescaled by the whole batch, BN per device, one
    sign-flip store updated once per device (started from the bundle's store: key), each
    device pushing its own copy (devices: key) for the classes absent from its slice, and the
    checkpoint (icd.checkpoint.gather) against the release's, whose aux states are the devices'
    averages."""
    bundle = write_two_device_bundle(str(tmp_path), order)
    assert bundle.device_order == list(order)
    for step in range(3):   # the checkpoint's mean is not the store: the test tells them apart
        assert not np.allclose(bundle.expected[f"train/step{step}/aux:{RESIGN}"],
                               bundle.expected[f"train/step{step}/store:{RESIGN}"])
    errors = check_bundle(str(tmp_path))
    names = {e.name for e in errors}
    assert {f"train/step{k}/{kind}:{RESIGN}" for k in range(3)
            for kind in ("aux", "store", "devices")} <= names
    assert len(errors) == 3 * (3 + 43 + 2) + 4
    assert all(e.ok and e.judged for e in errors), worst(errors)
    with pytest.raises(ValueError, match="recorded on 2 device"):
        check_bundle(str(tmp_path), [mx.cpu(0)])


def test_the_old_absent_class_rule_fails(tmp_path, monkeypatch):
    """A two-device bundle recorded with the former reading of section 3.2 (a class absent from
    a device's slice leaves the store unchanged, instead of pulling it 10% toward that device's
    own copy) fails on the sign flip's mean, named."""
    update = symbols.ops.accum_resign_update
    monkeypatch.setattr(symbols.ops, "accum_resign_update",
                        lambda stored, *args, own=None, **kw: update(stored, *args, **kw))
    write_two_device_bundle(str(tmp_path), (0, 1))
    monkeypatch.undo()
    errors = check_bundle(str(tmp_path))
    failed = {e.name for e in errors if e.judged and not e.ok}
    assert f"train/step0/store:{RESIGN}" in failed and f"train/step0/devices:{RESIGN}" in failed
    assert all(RESIGN in name for name in failed if "/step0/" in name), failed
    assert summary(errors).endswith(": FAIL")


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_an_absent_class_pushes_the_devices_own_copy(order):
    """Release section 3.2 on two devices, in either order: class 1 is on device 0 only, class 2
    on device 1 only, class 3 on neither. A device pushes its own copy (here: the start) for a
    class absent from its slice, so a class present only on the first device ends at
    0.9 x that device's pull + 0.1 x the second device's copy; each device's aux holds its pull
    and the checkpoint their average."""
    rng = np.random.RandomState(5)
    batch = two_device_batch(rng)
    params = make_params(rng, 4, 0.125, batch)
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = build_from_params(params, {"num_cls": 4, "dropout": 0.0}, "params", contexts)
    trainer = make_trainer(net, 0.01, 0.9, 5e-4)
    parts = split_batch({k: mx.nd.array(v) for k, v in batch.items()}, contexts)
    start = params[f"aux:{RESIGN}"]
    store = share_moving_mean(net.share_key, mx.nd.array(start), contexts)
    try:
        replay_step(net, trainer, parts, 1.0, contexts, order)
    finally:
        unshare_moving_mean(net.share_key)
    copies = [c.asnumpy() for c in net.icd_accum_resign_moving_mean.list_data()]
    final = store.master.asnumpy()
    first, last = order
    only_first = 1 + first          # class 1 is on device 0 only, class 2 on device 1 only
    assert list(store.order) == list(order)
    np.testing.assert_array_equal(copies[last], final)            # the last device pushed last
    np.testing.assert_allclose(final[only_first], 0.9 * copies[first][only_first] +
                               0.1 * start[only_first], rtol=1e-6)
    assert np.abs(final[only_first] - copies[first][only_first]).max() > 1e-3
    np.testing.assert_allclose(copies[first][2 - first], start[2 - first], rtol=1e-6)
    np.testing.assert_allclose(final[3], start[3], rtol=1e-6)     # absent everywhere: kept
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
    replay_step(net, trainer, parts, 1.0, [mx.cpu()])
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
