"""icd-demo is a command like the others (icd.commands.demo): a bad flag, value or step is one
line on stderr with the runner's exit status, --debug adds the traceback, and tools/demo.py and
the icd-demo entry point run the same main."""
import os
import subprocess
import sys

import pytest

from helpers import REPO
from icd.commands.demo import main
from icd.commands.runner import EXIT_ERROR, EXIT_USAGE


def one_line(capsys) -> str:
    """The command's stderr, which must be one line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--cpus", "0"], "--cpus: expected a positive integer, got '0'"),
    (["--repeat", "0"], "--repeat: expected a positive integer, got '0'"),
    (["--workers", "two"], "--workers: expected a positive integer, got 'two'"),
    (["--width", "-1"], "--width: expected a positive number, got '-1'"),
    (["--amp", "fp8"], "--amp: invalid choice: 'fp8'"),
    (["--cpus", "2", "--gpus", "0"], "--gpus: not allowed with argument --cpus"),
])
def test_bad_flags_are_one_line_with_the_usage_status(flags, message, capsys):
    assert main(flags) == EXIT_USAGE
    line = one_line(capsys)
    assert line.startswith(f"error: {message}") and line.endswith("(see icd-demo --help)")


def test_a_bad_step_or_missing_data_is_one_line_with_the_error_status(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["--quick", "--out", out, "--steps", "trian"]) == EXIT_ERROR
    assert one_line(capsys) == ("error: unknown steps ['trian']; choose from data, superpixels, "
                                "pretrain, train_icd, train_cam, infer, seeds, evaluate, "
                                "segment, report")
    assert main(["--quick", "--out", out, "--steps", "superpixels"]) == EXIT_ERROR
    assert one_line(capsys).startswith(
        f"error: {os.path.join(out, 'data', 'classes.txt')}: no data; run the demo's data step")
    assert not os.path.exists(os.path.join(out, "superpixels"))


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--steps", "trian", "--debug"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "select_steps" in err
    assert err.strip().splitlines()[-1].startswith("error: unknown steps ['trian']")


def test_tools_demo_and_the_entry_point_run_the_command():
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo.py"), "--cpus",
                             "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip().splitlines() == [
        "error: --cpus: expected a positive integer, got '0' (see icd-demo --help)"]
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        assert '"icd-demo = icd.commands.demo:main"' in f.read()
