"""The command-line tools: one-line errors and statuses, argument checks, --help, config flags,
and a prompt exit after an error (icd.commands, icd.config, icd.devices)."""
import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from icd.commands import (bench, compare as compare_command, evaluate, infer, parity,
                          run as run_command, seeds, superpixels, synthetic, train)
from icd.commands.options import fill_from_config
from icd.commands.runner import EXIT_USAGE
from icd.config import FIELDS, _TYPES, _as_field_type, find_config, load_config, option
from icd.data.classes import read_classes
from icd.data.superpixels import make_superpixels
from icd.data.synthetic import make_synthetic_voc
from icd.data.voc import read_list

from helpers import REPO, error_line, tiny_train_flags


COMMANDS = [train, infer, seeds, evaluate, superpixels, synthetic, parity, bench, run_command,
            compare_command]


# ---------------------------------------------------------------------------------------------
# Bad arguments: status 2, `error: --flag: problem`, before anything runs

@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size: must be positive, got 0"),
    (["--batch-size", "x"], "--batch-size: expected an integer, got 'x'"),
    (["--num-epoch", "1.9"], "--num-epoch: expected an integer, got '1.9'"),
    (["--num-epoch", "0"], "--num-epoch: must be positive, got 0"),
    (["--learning-rate", "nan"], "--learning-rate: must be finite, got nan"),
    (["--learning-rate", "inf"], "--learning-rate: must be finite, got inf"),
    (["--dropout", "1"], "--dropout: must be in [0, 1), got 1.0"),
    (["--cpus", "0"], "--cpus: must be at least 1, got '0'"),
    (["--model", "vgg19"], "--model: invalid choice: 'vgg19'"),
    (["--top-down", "e"], "--top-down: invalid choice: 'e'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_train_rejects_bad_flags_in_one_line(flags, message, capsys):
    assert train.main(flags) == EXIT_USAGE
    assert error_line(capsys).startswith(f"error: {message}")


@pytest.mark.parametrize("command, flags, message", [
    (evaluate, ["--results", "r", "--gt-root", "g", "--data-list", "l", "--thresholds", "2", "-1"],
     "--thresholds: expected a number in [0, 1), got '2'"),
    (seeds, ["--results", "r", "--image-root", "i", "--annotation-root", "a", "--data-list", "l",
             "--workers", "0"], "--workers: expected a positive integer, got '0'"),
    (superpixels, ["--image-root", "i", "--data-list", "l", "--out", "o"],
     "one of the arguments --pretrained --features is required"),
    (bench, ["--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
    (infer, ["--epoch", "-1"], "--epoch: expected an integer >= 0, got '-1'"),
])
def test_every_tool_rejects_bad_flags_in_one_line(command, flags, message, capsys):
    assert command.main(flags) == EXIT_USAGE
    assert message in error_line(capsys)


def test_evaluate_rejects_repeated_thresholds(capsys):
    flags = ["--results", "r", "--gt-root", "g", "--data-list", "l", "--thresholds", "0.1", "0.1"]
    assert evaluate.main(flags) == 1
    assert error_line(capsys) == "error: --thresholds: repeated values in [0.1, 0.1]"


# ---------------------------------------------------------------------------------------------
# Failures: status 1, `error: <file or flag>: problem`, nothing half-done

@pytest.mark.parametrize("command, flags", [
    (synthetic, ["--out", "o"]),
    (seeds, ["--results", "r", "--image-root", "i", "--annotation-root", "a", "--data-list", "l"]),
    (evaluate, ["--results", "r", "--gt-root", "g", "--data-list", "l"]),
])
def test_a_missing_class_list_is_named_before_anything_is_written(command, flags, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert command.main(flags + ["--classes", "missing.txt"]) == 1
    assert error_line(capsys) == "error: missing.txt: class-list file not found"
    assert os.listdir(tmp_path) == []


def test_nothing_to_train_is_an_error(tiny_voc, tmp_path, capsys):
    flags = tiny_train_flags(tiny_voc, str(tmp_path / "s"))
    assert train.main(flags + ["--begin-epoch", "2"]) == 1
    assert error_line(capsys) == ("error: --begin-epoch: 2 is not below --num-epoch 2: "
                                  "nothing to train")


def test_a_yaml_value_is_checked_and_the_file_named(tiny_voc, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("base: " + os.path.join(REPO, "experiments", "voc_vgg16.yaml") +
                      "\nnum_epoch: 1.9\n")
    flags = tiny_train_flags(tiny_voc, str(tmp_path / "s"))
    flags.remove("--num-epoch")
    flags.remove("2")
    assert train.main(flags + ["--config", str(config)]) == 1
    assert error_line(capsys) == f"error: {config}: num_epoch: must be an integer, got 1.9"
    config.write_text("top_down: e\n")
    assert train.main(flags + ["--config", str(config)]) == 1
    assert error_line(capsys) == f"error: {config}: top_down: must be one of a, b, c, d, got 'e'"


def test_missing_image_is_one_line_and_debug_shows_the_traceback(tiny_voc, tmp_path, capsys):
    voc = dict(tiny_voc, image_root=str(tmp_path / "images"))
    shutil.copytree(tiny_voc["image_root"], voc["image_root"])
    missing = os.path.join(voc["image_root"], read_list(voc["data_list"])[0] + ".jpg")
    os.remove(missing)
    flags = tiny_train_flags(voc, str(tmp_path / "s"))
    assert train.main(flags) == 1
    assert error_line(capsys) == f"error: {missing}: image not found"
    assert train.main(flags + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "read_image" in err
    assert err.strip().splitlines()[-1] == f"error: {missing}: image not found"


def _checkpoint_pair(tiny_config, tmp_path):
    """A snapshot with the epoch-0 checkpoint pair of a 1-epoch training."""
    from icd.tasks import train as train_loop
    cfg = tiny_config(num_epoch=1, snapshot=str(tmp_path / "s"), dropout=0.5)   # the flags'
    train_loop(cfg)
    return cfg.snapshot, os.path.join(cfg.snapshot, "vgg16_icd-0000.params"), \
        os.path.join(cfg.snapshot, "vgg16_icd-0000.states")


def test_a_bad_states_file_is_named(tiny_voc, tiny_config, tmp_path, capsys):
    snapshot, _, states = _checkpoint_pair(tiny_config, tmp_path)
    with open(states, "rb") as f:
        data = f.read()
    with open(states, "wb") as f:
        f.write(data[:len(data) // 2])
    capsys.readouterr()
    assert train.main(tiny_train_flags(tiny_voc, snapshot) + ["--begin-epoch", "1"]) == 1
    assert error_line(capsys).startswith(
        f"error: {states}: not a readable optimizer-state file (UnpicklingError: pickle data "
        "was truncated)")
    os.remove(states)
    assert train.main(tiny_train_flags(tiny_voc, snapshot) + ["--begin-epoch", "1"]) == 1
    assert error_line(capsys) == (f"error: {states}: checkpoint of epoch 0 to resume from "
                                  "(--begin-epoch 1) not found")


def test_a_bad_params_file_is_named_with_its_problem(tiny_voc, tiny_config, tmp_path, capsys):
    snapshot, params, _ = _checkpoint_pair(tiny_config, tmp_path)
    with open(params, "wb") as f:
        f.write(b"not a parameter file")
    capsys.readouterr()
    assert train.main(tiny_train_flags(tiny_voc, snapshot) + ["--begin-epoch", "1"]) == 1
    line = error_line(capsys)   # the run record's digest finds it first
    assert f"{params} differs from its digest" in line and "Traceback" not in line
    os.remove(params[:-len(".params")] + ".json")   # no run record: a release checkpoint
    assert train.main(tiny_train_flags(tiny_voc, snapshot) + ["--begin-epoch", "1"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: {params}: not an MXNet parameter file")
    assert "Traceback" not in line and "Invalid NDArray file format" in line


def test_a_broken_parity_bundle_is_one_line(tmp_path, capsys):
    for name in ("params.params", "batch.npz", "infer.npz", "expected.npz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "meta.json").write_text("{not json")
    assert parity.main([str(tmp_path)]) == 1
    error_line(capsys)


def test_a_list_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes("\ufeffa_1\r\nb_2\n\n".encode("utf-8"))
    assert read_list(str(path)) == ["a_1", "b_2"]


# ---------------------------------------------------------------------------------------------
# --help: every flag with its default or "required", choices, and only files of the checkout

@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.__name__.split(".")[-1])
def test_help_documents_every_flag(command, capsys):
    parser = command.build_parser()
    assert command.main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.help == argparse.SUPPRESS:
            continue   # accepted, not listed: a config flag the command does not use
        rendered = parser._get_formatter()._expand_help(action) if action.help else ""
        assert rendered, action.option_strings
        documented = ("default" in rendered or "required" in rendered or action.required or
                      isinstance(action, (argparse._StoreTrueAction,
                                          argparse.BooleanOptionalAction)))
        assert documented, (action.option_strings, rendered)
        if action.choices:
            assert all(str(c) in text for c in action.choices)
    for token in re.findall(r"[\w./-]+\.(?:py|yaml|md)\b", text):
        if token not in ("eval.md",):   # an output
            assert os.path.exists(os.path.join(REPO, token)), token


@pytest.mark.parametrize("command", ["train", "infer", "train_seg", "infer_seg"])
def test_each_config_field_is_defined_once_and_listed_by_the_commands_that_read_it(command):
    """icd.config.option: every field has help text, a default within its range and choices,
    and a command's --help lists exactly the fields whose `used_by` names it."""
    from icd.commands import infer_seg, train_seg
    from icd.commands.options import CHOICES
    module = {"train": train, "infer": infer, "train_seg": train_seg,
              "infer_seg": infer_seg}[command]
    listed_dests = {action.dest for action in module.build_parser()._actions
                    if action.help != argparse.SUPPRESS}
    for name, f in FIELDS.items():
        assert f.metadata["help"].strip(), name
        default = f.default if f.default is not dataclasses.MISSING else None
        assert _as_field_type(name, default) == default or default is None, name
        if name in CHOICES:
            assert default in CHOICES[name], name
        assert (name in listed_dests) == (command in f.metadata["used_by"]), (command, name)
    assert set(CHOICES) == {"model", "bottom_up_features", "bottom_up_loss", "top_down",
                            "optimizer", "kvstore", "amp"}
    with pytest.raises(ValueError, match="range 'huge'"):
        option(1, "a number", ("train",), range="huge")


def test_reading_a_config_loads_neither_mxnet_nor_the_training_loop():
    """The fields, their choices and ranges live in icd.config and icd.constants (a low floor):
    a YAML file is read and checked without MXNet."""
    code = ("import sys; from icd.config import load_config, command_fields; "
            "cfg = load_config('synthetic_demo', amp='bf16', kvstore='local'); "
            "assert command_fields('infer_seg'); "
            "print(sorted(m for m in ('mxnet', 'icd.engine', 'icd.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Config: types from the annotations, flags given vs not given, shipped configs by name

def test_config_types_come_from_the_annotations():
    assert _TYPES["batch_size"] == (int, False) and _TYPES["learning_rate"] == (float, False)
    assert _TYPES["log_frequency"] == (int, True) and _TYPES["pretrained"] == (str, True)
    assert set(_TYPES) == set(FIELDS)


def test_a_flag_can_clear_a_yaml_value(tmp_path):
    parser = train.build_parser()
    config = os.path.join(REPO, "experiments", "voc_vgg16.yaml")
    args = vars(parser.parse_args(["--config", config]))
    assert "pretrained" not in args and "batch_size" not in args   # not given: absent
    assert load_config(config, **{k: v for k, v in args.items() if k in FIELDS}).pretrained \
        == "./data/vgg16_20M.params"
    args = vars(parser.parse_args(["--config", config, "--pretrained", "",
                                   "--log-frequency", ""]))
    assert args["pretrained"] is None and args["log_frequency"] is None
    with_frequency = tmp_path / "f.yaml"
    with_frequency.write_text(f"base: {config}\nlog_frequency: 7\n")
    assert load_config(str(with_frequency)).log_frequency == 7
    cleared = load_config(str(with_frequency), pretrained=None, log_frequency=None)
    assert cleared.pretrained is None and cleared.log_frequency is None
    kept = load_config(str(with_frequency), batch_size=None, num_workers=None)  # cannot be None
    assert kept.batch_size == 32 and kept.num_workers == (os.cpu_count() or 1)


def test_config_values_are_checked():
    with pytest.raises(ValueError, match=r"^--num-epoch: must be an integer, got 1.9$"):
        load_config(num_epoch=1.9)
    assert load_config(num_epoch=3.0).num_epoch == 3
    with pytest.raises(ValueError, match="--learning-rate: must be finite"):
        load_config(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="--wd: must be >= 0"):
        load_config(wd=-1e-4)
    with pytest.raises(ValueError, match="--batch-size: must be a number, got True"):
        load_config(batch_size=True)


def test_yaml_exponent_without_a_dot_is_explained(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("learning_rate: 1e-3\n")
    with pytest.raises(ValueError, match=r"lr.yaml: learning_rate: must be a number, got '1e-3' "
                                         r"\(YAML reads 1e-3 as text: write 1.0e-3\)"):
        load_config(str(path))


def test_shipped_configs_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # not the checkout: found beside the package
    expected = os.path.join(REPO, "experiments", "synthetic_demo.yaml")
    for name in ("synthetic_demo", "synthetic_demo.yaml", "experiments/synthetic_demo.yaml"):
        assert os.path.samefile(find_config(name), expected)
    assert load_config("synthetic_demo").image_size == 96
    with pytest.raises(FileNotFoundError, match="nope.yaml: config file not found"):
        find_config("nope.yaml")


# ---------------------------------------------------------------------------------------------
# The data tools in-process

def test_synthetic_and_superpixel_tools(tmp_path, capsys):
    root = str(tmp_path / "voc")
    class_file = tmp_path / "pets.txt"
    class_file.write_text("cat\ndog\n")
    assert synthetic.main(["--out", root, "--num-train", "4", "--num-val", "1", "--size", "48",
                           "--classes", str(class_file)]) == 0
    assert capsys.readouterr().out.strip() == f"4 train, 1 val images in {root}"
    assert read_classes(os.path.join(root, "classes.txt")) == ("cat", "dog")
    data_list = os.path.join(root, "ImageSets", "Segmentation", "train.txt")
    out = str(tmp_path / "sp")
    flags = ["--image-root", os.path.join(root, "JPEGImages"), "--data-list", data_list,
             "--out", out, "--features", "colour"]
    assert superpixels.main(flags) == 0
    assert sorted(os.listdir(out)) == sorted(n + ".png" for n in read_list(data_list))
    assert superpixels.main(flags) == 0   # resumable: nothing rewritten
    assert "wrote 0 superpixel maps" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Prompt exit after an error (subprocess: the hang was in MXNet's shutdown at exit)

@pytest.fixture(scope="module")
def voc_missing_a_queued_image(tmp_path_factory):
    """16 images, minus the first image of the third batch of epoch 0: the loader fails while
    two steps of work are queued in MXNet's engine."""
    root = str(tmp_path_factory.mktemp("hang"))
    make_synthetic_voc(root, num_train=16, num_val=1, size=48, seed=3)
    data_list = os.path.join(root, "ImageSets", "Segmentation", "train.txt")
    make_superpixels(os.path.join(root, "JPEGImages"), data_list, os.path.join(root, "sp"))
    names = read_list(data_list)
    order = np.random.default_rng([0, 0]).permutation(len(names))   # EpochShuffleSampler, seed 0
    missing = os.path.join(root, "JPEGImages", names[order[8]] + ".jpg")
    os.remove(missing)
    return {"image_root": os.path.join(root, "JPEGImages"),
            "annotation_root": os.path.join(root, "Annotations"),
            "superpixel_root": os.path.join(root, "sp"), "data_list": data_list,
            "missing": missing}


@pytest.mark.slow
def test_training_exits_promptly_after_a_loader_error(voc_missing_a_queued_image, tmp_path):
    """Before the fix about 5 runs in 8 of this training hung at exit in MXNotifyShutdown."""
    voc = voc_missing_a_queued_image
    flags = tiny_train_flags(voc, str(tmp_path / "s"))
    flags[flags.index("--image-size") + 1] = "96"   # enough work queued to lose the race
    command = [sys.executable, os.path.join(REPO, "tools", "train_icd.py"), *flags, "--cpus", "2",
               "--classes", os.path.join(os.path.dirname(voc["image_root"]), "classes.txt")]
    for run in range(8):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run {run}: no exit within 60 s after the error")
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == f"error: {voc['missing']}: image not found"
        assert not glob.glob(os.path.join(tmp_path, "s", "*.params"))


def test_ctrl_c_during_training_is_one_line_naming_the_resume(tiny_voc, tmp_path, capsys,
                                                              monkeypatch):
    """The training loop raises TrainingInterrupted with the resume hint (tested in
    test_train.py); the command prints exactly that line and exits 130."""
    from icd.engine import TrainingInterrupted

    def interrupted(cfg):
        raise TrainingInterrupted("interrupted in epoch 1; last checkpoint X-0000.params; "
                                  "resume with --begin-epoch 1")
    monkeypatch.setattr(train, "train", interrupted)
    capsys.readouterr()
    assert train.main(tiny_train_flags(tiny_voc, str(tmp_path / "snap"))) == 130
    assert error_line(capsys) == ("error: interrupted in epoch 1; last checkpoint "
                                  "X-0000.params; resume with --begin-epoch 1")


def test_a_yaml_base_cycle_and_a_seed_above_2_32_are_named(tmp_path, capsys):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("base: one.yaml\nseed: 1\n")
    with pytest.raises(ValueError, match=rf"^{one}: base 'one.yaml' includes {one} again"):
        load_config(str(one))
    one.write_text("base: two.yaml\n")
    two.write_text("base: ./one.yaml\n")
    with pytest.raises(ValueError, match=rf"^{two}: base './one.yaml' includes .*one.yaml "
                                         rf"again"):
        load_config(str(one))
    two.write_text(f"seed: {2 ** 32}\n")
    with pytest.raises(ValueError, match=rf"^{two}: seed: must be < 2\*\*32"):
        load_config(str(one))
    assert load_config(seed=2 ** 32 - 1).seed == 2 ** 32 - 1
    assert train.main(["--seed", str(2 ** 32)]) == EXIT_USAGE
    assert "--seed: must be < 2**32" in capsys.readouterr().err


def test_launch_defaults_to_local_and_names_a_missing_command(capsys):
    from icd.commands import launch
    assert launch._argv(["-n", "2", "icd-train"])[:3] == ["--launcher", "local", "-n"]
    assert "--launcher" not in launch._argv(["-n", "2", "-H", "hosts", "icd-train"])   # ssh
    assert launch.main(["-n", "1", "-s", "1", "--", "icd-no-such-command", "--flag"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: icd-no-such-command: command not found (icd-launch starts "
                           "it on every worker)"), err


@pytest.mark.slow
def test_launch_reports_a_failed_worker_in_one_line(tmp_path):
    """A worker that fails ends the job with its status and one line naming it: no tracker
    traceback (which printed every environment variable)."""
    script = tmp_path / "worker.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['DMLC_ROLE'] == 'worker' and os.environ['DMLC_TASK_ID'] == "
                      "'1':\n    sys.exit(7)\ntime.sleep(2)\n")
    env = dict(os.environ, PYTHONPATH=REPO, DMLC_PS_ROOT_URI="127.0.0.1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "launch.py"), "-n", "2",
                           "-s", "1", sys.executable, str(script)], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.strip() == "error: worker: exited with status 7; the job was ended", \
        proc.stderr


# ---------------------------------------------------------------------------------------------
# Per-command flags, paths from --config

def test_each_command_lists_only_the_flags_it_uses(capsys):
    for command, absent, present in ((train, ("--crf", "--flip", "--scales", "--infer-size"),
                                      ("--learning-rate",)),
                                     (infer, ("--learning-rate", "--crf", "--momentum"),
                                      ("--infer-size",))):
        assert command.main(["--help"]) == 0
        text = capsys.readouterr().out
        assert all(flag not in text for flag in absent)
        assert all(flag in text for flag in present)


def test_seeds_eval_and_superpixels_read_their_paths_from_config(capsys):
    args = seeds.build_parser().parse_args(["--config", "voc_vgg16"])
    fill_from_config(args, seeds.CONFIG_PATHS, ("results",))
    assert (args.results, args.data_list, args.image_root) == (
        "./snapshot/icd/results", "./data/VOC2012/ImageSets/Segmentation/train_aug.txt",
        "./data/VOC2012/JPEGImages")
    args = evaluate.build_parser().parse_args(["--config", "voc_vgg16"])
    fill_from_config(args, evaluate.CONFIG_PATHS)
    assert args.gt_root == "./data/VOC2012/SegmentationClassAug"
    assert args.data_list == "./data/VOC2012/ImageSets/Segmentation/train_aug.txt"
    args = superpixels.build_parser().parse_args(["--config", "voc_vgg16"])
    fill_from_config(args, superpixels.CONFIG_PATHS)
    assert args.out == "./data/superpixels"
    assert seeds.main(["--image-root", "x"]) == 1     # no --config: named flag
    assert "error: --results: required (or a --config that gives it)" in capsys.readouterr().err
