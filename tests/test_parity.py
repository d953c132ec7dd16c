"""Our Gluon ICDNet against the release's graph (symbols/) through parity bundles."""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from icd.checkpoint import read_params
from icd.parity import (build_from_params, check_bundle, compare, replay_infer, replay_steps,
                        summary)
from icd.train import checkpoint_path, train
from symbols.bundle import (make_batch, make_bundle, make_params, run_reference_infer,
                            run_reference_steps)

from conftest import REPO

# (width, train size, infer size, classes, steps, warm-up iterations, seed, lr); lr large enough that every
# parameter's change is far above float32 resolution (at lr 1e-3 the top-down layers move by a
# few ulps during the warm-up, and a relative error of such a change is rounding noise).
LR_321 = 0.001
BUNDLES = {
    "small": (0.125, 96, 80, 6, 4, 3, 1, 0.01),
    "321-513": (0.0625, 321, 513, 5, 2, 0, 0, 0.003),
    "full-width": (1.0, 32, 40, 20, 2, 1, 0, 0.01),
}


def bundle_meta(folder):
    with open(os.path.join(folder, "meta.json")) as f:
        return json.load(f)


def write_bundle(tmp_path_factory, name):
    width, size, infer_size, num_cls, steps, warmup, seed, lr = BUNDLES[name]
    folder = str(tmp_path_factory.mktemp(f"bundle_{name}"))
    make_bundle(folder, num_cls=num_cls, width=width, size=size, infer_size=infer_size,
                steps=steps, warmup_iters=warmup, lr=lr, seed=seed)
    return folder


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def bundle(request, tmp_path_factory):
    return write_bundle(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory, "small")


def test_bundle_is_well_conditioned(bundle):
    """The reference itself, started from parameters perturbed by 1e-7 (relative), stays within
    the tolerances: otherwise the bundle sits on a discontinuity (a flip of a sign, mask or
    argmax) and cannot judge an independent implementation."""
    meta = bundle_meta(bundle)
    params = read_params(os.path.join(bundle, "params.params"))
    rng = np.random.RandomState(0)
    perturbed = {k: v * (1 + mx.nd.array(rng.randn(*v.shape) * 1e-7))
                 if k.startswith("arg:") and k != "arg:feat_bn_gamma"   # reset to 1 by fix_gamma
                 else v for k, v in params.items()}
    batch = dict(np.load(os.path.join(bundle, "batch.npz")))
    expected = dict(np.load(os.path.join(bundle, "expected.npz")))
    again = run_reference_steps(perturbed, batch, meta)
    start = {k: v.asnumpy() for k, v in params.items()}
    for name in again:   # parameter changes are measured from each run's own start
        key = name.rsplit("/", 1)[-1]
        if key in start:
            again[name] = again[name] - perturbed[key].asnumpy() + start[key]
    train_keys = {k: v for k, v in expected.items() if k.startswith("train/")}
    errors = compare(again, train_keys, start)
    assert summary(errors).endswith("PASS"), summary(errors)


def test_gluon_model_matches_release_graph(bundle):
    errors = check_bundle(bundle)
    meta = bundle_meta(bundle)
    assert len(errors) == meta["steps"] * (3 + 43) + 4
    assert summary(errors).endswith("PASS"), "\n".join(
        f"{e.name} {e.error:.3g}" for e in sorted(errors, key=lambda e: -e.error)[:10])


def test_checker_cli_passes_and_fails(small_bundle, tmp_path):
    bundle = small_bundle
    tool = os.path.join(REPO, "tools", "check_parity.py")
    ok = subprocess.run([sys.executable, tool, bundle], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("parity: 188 tensors, worst ") and last.endswith(": PASS")
    # a bundle whose reference moved icd_bu_weight differently must fail, naming the tensor
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(bundle):
        (bad / name).write_bytes(open(os.path.join(bundle, name), "rb").read())
    expected = dict(np.load(bad / "expected.npz"))
    expected["train/step1/arg:icd_bu_weight"] = expected["train/step1/arg:icd_bu_weight"] * 1.01
    np.savez(bad / "expected.npz", **expected)
    fail = subprocess.run([sys.executable, tool, str(bad)], capture_output=True, text=True)
    assert fail.returncode == 1
    assert fail.stdout.strip().splitlines()[-1].endswith(
        "at train/step1/arg:icd_bu_weight: FAIL")


def swap_halves(array):
    half = array.shape[0] // 2
    return np.concatenate([array[half:], array[:half]])


def test_two_devices_match_the_release_on_two_devices():
    """Data-parallel over cpu(0), cpu(1): gradients summed, rescaled by the whole batch, BN per
    device, one sign-flip store updated once per device. The release's store takes the devices'
    updates in whichever order they arrive, so we compare with the reference run in the order our
    run took (the reference goes in slice order: swapping the halves puts device 1 first)."""
    rng = np.random.RandomState(4)
    num_cls, width = 4, 0.125
    meta = {"num_cls": num_cls, "width": width, "lr": 0.01, "momentum": 0.9, "wd": 5e-4,
            "steps": 3, "warmup_iters": 2, "dropout": 0.0}
    batch = make_batch(rng, 4, num_cls, 64)
    batch["label"][:] = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]]  # shared 0, 1
    params = make_params(rng, num_cls, width, batch)
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = build_from_params({k: mx.nd.array(v) for k, v in params.items()}, meta, "params",
                            contexts)
    orders = []
    ours = replay_steps(net, batch, meta, contexts, on_step=lambda order: orders.append(order))
    assert all(sorted(order) == [0, 1] for order in orders), orders   # one update per device
    assert len(set(map(tuple, orders))) == 1, f"device order changed between steps: {orders}"
    if orders[0] == [0, 1]:
        ref = run_reference_steps(params, batch, meta, contexts)
    else:
        ref = run_reference_steps(params, {k: swap_halves(v) for k, v in batch.items()}, meta,
                                  contexts)
        ref = {k: swap_halves(v) if not k.rsplit("/", 1)[-1].startswith(("arg:", "aux:")) else v
               for k, v in ref.items()}
    errors = compare(ours, ref, params)
    assert summary(errors).endswith("PASS"), summary(errors)
    store = "aux:icd_accum_resign_moving_mean"
    assert not np.allclose(ours[f"train/step0/{store}"], params[store])


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
