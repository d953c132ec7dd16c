"""Superpixels on the run's devices and workers: conv5 features reduced per region on the device
equal the per-pixel ones, each pool worker builds its extractor on its device of the list, the
worker plan (network copies per GPU, threads per core) and the workers' thread caps."""
import multiprocessing
import os

import cv2
import mxnet as mx
import numpy as np
import pytest

from icd.checkpoint import gather
from icd.commands import superpixels as superpixels_command
from icd.data import superpixels as sp
from icd.data.superpixels import colour_position_features
from icd.data.voc import read_image, read_list
from icd.features import cell_shares, conv5_feature_extractor, make_feature_factory
from icd.model.icd_net import ICDNet
from icd.model.pretrained import initialize

from helpers import DEVICES, run_config


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    net = ICDNet(num_classes=3, width=0.0625)
    initialize(net, [mx.cpu()])
    path = str(tmp_path_factory.mktemp("backbone") / "vgg16.params")
    mx.nd.save(path, gather(net))
    return path


def textured(h, w, seed):
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8), (w, h))
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(120, 90), (70, 130)])
def test_region_means_on_the_device_equal_the_per_pixel_ones(backbone_file, size):
    """conv5 x cell shares on cpu(1) = the region means of the upsampled per-pixel map (to
    float32 rounding), hence the same superpixels; the shares of a region sum to its size."""
    features = conv5_feature_extractor(backbone_file, mx.cpu(1), input_size=100)
    image = textured(*size, seed=size[0])
    labels = sp.initial_regions(image)
    expected, expected_sizes = sp.region_means(labels, features(image))
    means, sizes = features.region_means(image, labels)
    np.testing.assert_array_equal(sizes, expected_sizes)
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 0.1
    shares = cell_shares(labels, (max(100, size[0]), max(100, size[1])), (13, 17))
    np.testing.assert_allclose(shares.sum(axis=1), sizes, rtol=1e-5)
    np.testing.assert_array_equal(sp.compute_superpixels(image, features(image), 8),
                                  sp.compute_superpixels(image, features, 8))


def test_superpixel_features_run_on_the_devices_they_are_given(backbone_file, monkeypatch):
    """The feature network and its conv5 live on the device passed; the
    factory a worker calls builds on its device of the list (k mod D in pool worker k)."""
    features = conv5_feature_extractor(backbone_file, mx.cpu(2), input_size=64)
    assert {ctx for p in features.net.collect_params().values() for ctx in p.list_ctx()} == \
        {mx.cpu(2)}
    image = textured(40, 50, seed=1)
    assert features._conv5(image)[0].context == mx.cpu(2)
    devices = ["cpu(2)", "cpu(1)"]
    assert make_feature_factory(backbone_file, devices)().ctx == mx.cpu(2)   # no pool worker
    for worker, ctx in ((1, mx.cpu(2)), (2, mx.cpu(1)), (3, mx.cpu(2))):
        monkeypatch.setattr(multiprocessing.current_process(), "_identity", (worker,))
        assert make_feature_factory(backbone_file, devices)().ctx == ctx


def test_superpixels_command_on_two_devices_writes_the_single_device_maps(backbone_file,
                                                                         tiny_voc, tmp_path,
                                                                         capsys):
    out = tmp_path / "sp"
    command = ["--image-root", tiny_voc["image_root"], "--data-list", tiny_voc["val_list"],
               "--out", str(out), "--pretrained", backbone_file]
    assert superpixels_command.main(command + ["--cpus", "2", "--workers", "2"]) == 0
    features = conv5_feature_extractor(backbone_file, mx.cpu(0))   # the former per-pixel path
    for name in read_list(tiny_voc["val_list"]):
        image = read_image(os.path.join(tiny_voc["image_root"], name + ".jpg"))
        expected = sp.compute_superpixels(image, features(image))
        np.testing.assert_array_equal(
            sp.read_superpixels(str(out / f"{name}.png"), image.shape[:2]), expected)
    assert superpixels_command.main(command + ["--gpus", "0", "--cpus", "2"]) != 0
    assert "error: --gpus, --cpus: give either GPUs or CPU contexts" in capsys.readouterr().err


def test_icd_run_builds_the_superpixel_features_on_the_runs_devices(backbone_file, tiny_voc,
                                                                    tmp_path, monkeypatch):
    """icd-run's superpixel step on the run's devices (cpu(1), cpu(2)): pool worker k builds
    its conv5_3 extractor, weights included, on device k mod 2; the pool has worker_plan's
    processes, each spawned capped at cores // processes threads (the pool is simulated in
    this process: worker k is the process whose multiprocessing identity is (k,))."""
    import multiprocessing
    from icd import features
    from icd.pipeline import settings as pipeline_settings, superpixels as superpixel_step
    config = run_config(tmp_path, tiny_voc, 1, pretrained=backbone_file,
                        pipeline=dict(cam="null", superpixels="{features: pretrained}"))
    monkeypatch.setattr(superpixel_step, "parse_devices", lambda gpus="", cpus=0: list(DEVICES))
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    built, pools = [], []
    build = features.build_feature_fn
    monkeypatch.setattr(features, "build_feature_fn",
                        lambda pretrained, ctx: built.append(build(pretrained, ctx)) or built[-1])
    process = multiprocessing.current_process()

    def pool(func, items, workers, desc, initializer=None, initargs=(), ordered=False,
             env=None):
        pools.append((workers, env))
        for k in range(1, workers + 1):
            monkeypatch.setattr(process, "_identity", (k,))
            initializer(*initargs)
        monkeypatch.setattr(process, "_identity", ())
        return iter([])
    monkeypatch.setattr(sp, "map_images", pool)
    settings = pipeline_settings.PaperSettings(config, str(tmp_path / "run"),
                                               devices=dict(cpus=2, gpus=""), workers=4)
    superpixel_step.step_superpixels(settings, settings.seeds[0], None)
    assert pools == [(4, {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"})]
    assert [extractor.ctx for extractor in built] == DEVICES * 2
    for extractor in built:
        assert {ctx for p in extractor.net.collect_params().values()
                for ctx in p.list_ctx()} == {extractor.ctx}


# ---------------------------------------------------------------------------------------------
# Worker processes and their threads

def _recording_colour_features(folder):
    """A feature factory for spawned workers: records the worker's thread settings in
    `folder`/<pid>.txt, then gives colour features."""
    with open(os.path.join(folder, f"{os.getpid()}.txt"), "w") as f:
        f.write(f"{os.environ.get('OMP_NUM_THREADS')} "
                f"{os.environ.get('MXNET_CPU_WORKER_NTHREADS')}")
    return colour_position_features


def test_spawned_superpixel_workers_run_with_the_thread_caps(small_images, monkeypatch):
    """worker_env reaches the spawned workers' environment (read by OpenMP and MXNet as they
    load), not this process's."""
    import functools
    from icd.features import thread_env
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    root, folder = small_images, small_images / "env"
    folder.mkdir()
    written = sp.make_superpixels(str(root / "img"), str(root / "list.txt"), str(root / "sp"),
                                  functools.partial(_recording_colour_features, str(folder)),
                                  workers=2, worker_env=thread_env(3))
    assert len(written) == 3
    records = {name: (folder / name).read_text() for name in os.listdir(folder)}
    assert records and set(records.values()) == {"3 1"}      # a pool worker may start late
    assert f"{os.getpid()}.txt" not in records
    assert "OMP_NUM_THREADS" not in os.environ


@pytest.mark.parametrize("workers, devices, pretrained, cores, plan", [
    (32, ["gpu(0)", "gpu(1)"], "vgg16.params", 32, (4, 8)),   # 2 network copies per GPU
    (3, ["gpu(0)", "gpu(1)"], "vgg16.params", 32, (3, 10)),
    (32, ["cpu(0)"], "vgg16.params", 8, (8, 1)),               # CPU: at most a process per core
    (2, ["cpu(1)", "cpu(2)"], "vgg16.params", 8, (2, 4)),
    (32, ["gpu(0)"], None, 16, (16, 1)),                       # colour features: no network
    (32, ["gpu(0)", "gpu(1)"], "vgg16.params", 3, (3, 1)),     # never more than the cores
    (0, ["cpu(0)"], None, 8, (0, 8))])                         # in this process
def test_superpixel_workers_are_capped_per_gpu_and_threads_per_core(workers, devices,
                                                                   pretrained, cores, plan):
    from icd.features import worker_plan
    assert worker_plan(workers, devices, pretrained, cores) == plan
    assert max(plan[0], 1) * plan[1] <= cores
