"""icd-bench on a tiny network: the report's rows, the mixed-precision rows, and a profiler that
leaves the machine's files alone (the timings themselves are not asserted: a benchmark)."""
import json
import os
import stat
import subprocess
import sys

import mxnet as mx
import pytest

from icd import amp
from icd.bench import (build_step, config_memory, custom_and_loss_share, loader_throughput,
                       memory_per_image)
from icd.config import find_config


TINY = ["--width", "0.0625", "--size", "32", "--infer-size", "48", "--repeats", "1",
        "--loader-size", "64", "--loader-workers", "0", "--no-memory"]


def test_the_profiled_share_is_a_fraction_and_dev_null_stays_a_device():
    step = build_step("icd", mx.cpu(), 32, 48, 2, 0.0625, 20)
    share = custom_and_loss_share(step, repeats=1)
    assert 0 < share < 1
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)   # MXNet's profiler deletes its file


@pytest.mark.skipif(amp.unsupported_reason("bf16", [mx.cpu()]) is not None,
                    reason=f"bfloat16 cannot run here: "
                           f"{amp.unsupported_reason('bf16', [mx.cpu()])}")
def test_bf16_rows_are_timed_beside_float32_in_one_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-c", "import sys; from icd.commands.bench import "
                             "main; sys.exit(main(sys.argv[1:]))", *TINY, "--amp", "bf16",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--amp bf16: supported on cpu(0)" in result.stdout
    assert "--amp fp16: not supported: float16 needs GPUs" in result.stdout
    report = json.loads(out.read_text())
    assert report["amp"] == "bf16"
    assert set(report["networks"]) == {"icd", "cam", "reference", "infer", "deeplab",
                                       "icd_bf16", "infer_bf16"}
    for name in ("icd", "infer"):
        ratio = report[f"{name}_float32_over_bf16_time"]
        assert ratio == pytest.approx(report["networks"][name]["step_seconds_median"] /
                                      report["networks"][f"{name}_bf16"]["step_seconds_median"])
        assert report["networks"][f"{name}_bf16"]["macs_per_image"] == \
            report["networks"][name]["macs_per_image"]


def test_fp16_is_refused_on_a_cpu_with_the_reason_before_anything_is_timed(monkeypatch, tmp_path,
                                                                           capsys):
    from icd.commands import bench as bench_command

    def timed(*args, **kwargs):
        raise AssertionError("timed before refusing")
    monkeypatch.setattr(bench_command, "bench_run", timed)
    out = tmp_path / "bench.json"
    assert bench_command.main([*TINY, "--amp", "fp16", "--out", str(out)]) == 1
    assert "--amp fp16: float16 needs GPUs" in capsys.readouterr().err
    assert not out.exists()


def test_each_shipped_config_gets_its_memory_per_device_from_the_per_image_figures():
    figures = {"vgg16_icd": {"size": 321, "width": 1.0, "fixed_mb": 1000.0,
                             "per_image_mb": 500.0},
               "resnet101_largefov": {"size": 321, "width": 1.0, "fixed_mb": 800.0,
                                      "per_image_mb": 700.0}}
    estimates = config_memory(figures)
    shipped = {os.path.splitext(f)[0] for f in os.listdir(os.path.dirname(
        find_config("voc_vgg16")))}
    assert set(estimates) == shipped
    assert estimates["voc_vgg16"]["per_device_mb"] == {"1": 1000 + 500 * 32,
                                                       "2": 1000 + 500 * 16}
    assert estimates["table6_a"]["per_device_mb"] == estimates["voc_vgg16"]["per_device_mb"]
    # resnet101_largefov inherits batch 20 from deeplab_largefov_vgg16.yaml: 10 per device
    assert estimates["deeplab_largefov_resnet101"]["batch_size"] == 20
    assert estimates["deeplab_largefov_resnet101"]["per_device_mb"]["2"] == 800 + 700 * 10
    assert estimates["synthetic_demo"]["per_device_mb"] == {"1": None, "2": None}   # width 1/4
    assert estimates["voc_vgg16_cam"]["per_device_mb"]["1"] is None   # no figures for it


def test_the_memory_per_image_is_measured_from_steps_of_one_and_two_images():
    figures = memory_per_image("vgg16_icd", "cpu(0)", 64, 0.125, 20)
    assert figures["size"] == 64 and figures["width"] == 0.125
    assert 0 < figures["params_mb"] < 10 and figures["per_image_mb"] >= 0
    assert figures["fixed_mb"] >= 2 * figures["params_mb"]


def test_bench_measures_the_loaders_throughput_in_uint8_batches():
    figures = loader_throughput(32, 2, workers=0, batches=2, image_size=48)
    assert figures["images"] == 4 and figures["images_per_s"] > 0 and figures["workers"] == 0
    num_classes = 6    # labels over the synthetic set's own 6 classes (its classes.txt)
    assert figures["bytes_per_batch"] == 2 * (3 * 32 * 32 + 32 * 32) + 2 * num_classes * 4
