"""icd-run checks its whole configuration before the first step, each error naming the file
and key (or the flag) that gave the bad value; one YAML reader (base: chains, keys given twice)
serves icd-run and the training commands (issue #30, item 8)."""
import os

import pytest

from icd.pipeline import settings as pipeline_settings
from icd.commands import run as run_command
from icd.config import load_config, read_config_file

from test_run import _config


def _run(config, out, *extra):
    return run_command.main(["--config", config, "--out", out, "--cpus", "1", "--workers", "1",
                             "--progress-every", "0", *extra])


def _error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def _with(config, text):
    """`config` with `text` added before its pipeline: section."""
    with open(config) as f:
        lines = f.read()
    with open(config, "w") as f:
        f.write(lines.replace("pipeline:\n", text + "pipeline:\n", 1))
    return config


@pytest.mark.parametrize("key, value", [("top_down", "z"), ("optimizer", "adamw"),
                                        ("bottom_up_loss", "foo"), ("model", "nonexistent"),
                                        ("amp", "fp32")])
def test_a_bad_choice_in_the_yaml_is_named_by_file_and_key_before_any_step(
        tiny_voc, tmp_path, capsys, key, value):
    config = _with(_config(tmp_path, tiny_voc, 1), f"{key}: {value}\n")
    out = str(tmp_path / "out")
    assert _run(config, out) == 1
    error = _error(capsys)
    assert error.startswith(f"error: {config}: {key}: must be one of "), error
    assert repr(value) in error and "--" not in error
    assert not os.path.exists(os.path.join(out, "superpixels"))
    assert not os.path.exists(os.path.join(out, "steps", "superpixels.json"))


def test_load_config_enforces_choices_naming_the_file_of_the_base_chain(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("amp: fp32\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nseed: 3\n")
    with pytest.raises(ValueError, match=rf"^{base}: amp: must be one of off, bf16, fp16, "
                                         rf"got 'fp32'$"):
        load_config(str(child))
    base.write_text("top_down: z\n")
    with pytest.raises(ValueError, match=rf"^{base}: top_down: must be one of a, b, c, d"):
        load_config(str(child))


def test_a_set_override_is_named_as_given(tiny_voc, tmp_path, capsys):
    config = _config(tmp_path, tiny_voc, 1)
    assert _run(config, str(tmp_path / "out"), "--set", "train.width=abc") == 1
    assert _error(capsys) == "error: --set train.width: must be a number, got 'abc'"
    assert _run(config, str(tmp_path / "out"), "--set", "cam.top_down=q") == 1
    assert _error(capsys) == ("error: --set cam.top_down: must be one of a, b, c, d, got 'q'")


def test_a_key_given_twice_in_one_yaml_names_file_key_and_both_lines(tiny_voc, tmp_path,
                                                                     capsys):
    config = _with(_config(tmp_path, tiny_voc, 1), "learning_rate: 0.1\n")
    with open(config) as f:
        lines = f.read().splitlines()
    first = lines.index("learning_rate: 0.1") + 1
    with open(config, "a") as f:
        f.write("learning_rate: 0.5\n")
    assert _run(config, str(tmp_path / "out")) == 1
    assert _error(capsys) == (f"error: {config}: learning_rate: given twice, on lines {first} "
                              f"and {len(lines) + 1}; keep one")
    nested = tmp_path / "nested.yaml"
    nested.write_text("pipeline:\n  seeds: {rows: [crf]}\n  gt_root: a\n  gt_root: b\n")
    with pytest.raises(ValueError, match=rf"^{nested}: gt_root: given twice, on lines 3 and 4"):
        read_config_file(str(nested)).pipeline


def test_a_base_cycle_in_an_icd_run_config_is_named(tmp_path, capsys):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("base: two.yaml\npipeline:\n  gt_root: gt\n")
    two.write_text("base: one.yaml\n")
    assert _run(str(one), str(tmp_path / "out")) == 1
    error = _error(capsys)
    assert error.startswith(f"error: {two}: base 'one.yaml' includes {one} again"), error


def test_pipeline_keys_are_checked_naming_the_file_that_gave_them(tiny_voc, tmp_path, capsys):
    config = _config(tmp_path, tiny_voc, 1)
    text = open(config).read()
    for bad, expected in (
            ("  seeds: {rows: [nocrf, crf]}\n", "  seeds: {rowz: [crf]}\n"),
            ("  seeds: {rows: [nocrf, crf]}\n", "  superpixels: {features: grey}\n"),
            ("  evaluate: {thresholds: [0.0, 0.3]}\n", "  evaluate: {thresholds: [3]}\n")):
        with open(config, "w") as f:
            f.write(text.replace(bad, expected))
        assert _run(config, str(tmp_path / "out")) == 1
        error = _error(capsys)
        key = expected.split(":")[0].strip() + ": " + expected.split("{")[1].split(":")[0]
        assert error.startswith(f"error: {config}: pipeline: {key}: "), error


def test_a_missing_gt_root_is_named_before_the_first_step(tiny_voc, tmp_path, capsys):
    config = _config(tmp_path, tiny_voc, 1)
    with open(config) as f:
        text = f.read()
    missing = str(tmp_path / "no_such_gt")
    with open(config, "w") as f:
        f.write(text.replace(f"gt_root: {tiny_voc['gt_root']}", f"gt_root: {missing}"))
    out = str(tmp_path / "out")
    assert _run(config, out) == 1
    assert _error(capsys) == f"error: {config}: pipeline: gt_root: {missing}: not found"
    assert not os.path.exists(os.path.join(out, "superpixels"))
    # a step that does not read it runs (the superpixels read only the images and lists)
    settings = pipeline_settings.PaperSettings(config, out)
    settings.check_paths({"superpixels"})
    with pytest.raises(FileNotFoundError, match="pipeline: gt_root"):
        settings.check_paths({"evaluate"})


def test_fp16_on_cpus_is_refused_before_the_superpixels(tiny_voc, tmp_path, capsys):
    config, out = _config(tmp_path, tiny_voc, 1), str(tmp_path / "out")
    assert _run(config, out, "--amp", "fp16") == 1
    error = _error(capsys)
    assert error.startswith("error: --amp: fp16 cannot run on these devices: float16 needs "
                            "GPUs"), error
    assert not os.path.exists(os.path.join(out, "superpixels"))


@pytest.mark.parametrize("old, new, key", [
    ("  segment: {config: null}\n", "  segment: {config: nowhere.yaml}\n", "segment: config"),
    ("pipeline:\n", "pipeline:\n  cam: nowhere.yaml\n", "cam")])
def test_a_missing_stage_config_names_the_setting(tiny_voc, tmp_path, capsys, old, new, key):
    config = _config(tmp_path, tiny_voc, 1)
    text = open(config).read()
    with open(config, "w") as f:
        f.write(text.replace(old, new, 1))
    assert _run(config, str(tmp_path / "out")) == 1
    assert _error(capsys).startswith(f"error: {config}: pipeline: {key}: ")
