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
from icd.bench import build_step, custom_and_loss_share

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
