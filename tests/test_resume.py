"""What a run is (icd.runs, icd.checkpoint): checkpoints complete or absent, --resume auto, a
resume with other settings refused naming each unless --allow-changes starts a run chained to
the old one."""
import dataclasses
import errno
import os
import shutil

import pytest

import icd.engine.hooks
from icd import runs
from icd.commands import train as train_command
from icd.io import read_json, write_json
from icd.runs import checkpoint_path, complete_checkpoints, last_complete_epoch
from icd.tasks import train

from helpers import copy_of, epochs, error_line, icd_flags


# ---------------------------------------------------------------------------------------------
# Auto-resume: the last complete checkpoint of the same run


def _checkpoint(cfg, epoch, suffixes=("params", "states", "json"), **record):
    os.makedirs(cfg.snapshot, exist_ok=True)
    for suffix in suffixes:
        path = checkpoint_path(cfg, epoch, suffix)
        if suffix == "json":
            write_json(path, dict(run="r1", epoch=epoch, seed=cfg.seed,
                                  config=dict(dataclasses.asdict(cfg), **record)))
        else:
            open(path, "wb").close()


def test_resume_auto_starts_fresh_then_continues_the_last_complete_checkpoint(tiny_config):
    cfg = tiny_config(num_epoch=5)
    assert runs.resume_auto(cfg).begin_epoch == 0                    # nothing there: fresh
    _checkpoint(cfg, 0)
    _checkpoint(cfg, 1)
    _checkpoint(cfg, 2, ("states", "json"))                           # no .params: incomplete
    assert runs.resume_auto(cfg).begin_epoch == 2
    assert runs.resume_auto(dataclasses.replace(cfg, overwrite=True)).begin_epoch == 0
    # loader processes are not the run's identity; the devices are (they split the batch)
    assert runs.resume_auto(dataclasses.replace(cfg, num_workers=3)).begin_epoch == 2
    with pytest.raises(FileExistsError, match="checkpoint of another run"):
        runs.resume_auto(dataclasses.replace(cfg, cpus=2))
    _checkpoint(cfg, 3, ("params", "states"))                         # the release's: no record
    with pytest.raises(FileExistsError, match="without a run record.*--begin-epoch 4"):
        runs.resume_auto(cfg)


def test_resume_auto_refuses_another_runs_checkpoint(tiny_config):
    cfg = tiny_config(num_epoch=5)
    _checkpoint(cfg, 0, learning_rate=0.01)
    with pytest.raises(FileExistsError, match=r"vgg16_icd-0000\.json: checkpoint of another "
                                              r"run \(learning_rate 0\.01"):
        runs.resume_auto(cfg)


def test_icd_train_resume_auto_on_a_finished_run_trains_nothing(tiny_config, capsys):
    cfg = tiny_config(num_epoch=2)
    _checkpoint(cfg, 1)
    assert train_command.checked_train(cfg, "auto") == 0
    assert "the run is finished" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--resume: auto finds the epoch itself"):
        train_command.checked_train(dataclasses.replace(cfg, begin_epoch=1), "auto")


# ---------------------------------------------------------------------------------------------
# Checkpoints complete or absent

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


def test_a_job_killed_once_its_checkpoint_is_complete_has_logged_the_epoch(tiny_config,
                                                                          monkeypatch):
    """A kill right after checkpoint 0's .params (here: the rotation that follows fails) leaves
    epoch 0 in the JSON log, so a resume from it logs every epoch once (the two-worker kill
    test's race: the log was written after the .params)."""
    cfg = tiny_config(num_epoch=2, model="vgg16_cam")

    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(icd.engine.hooks, "rotate_checkpoints", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    monkeypatch.undo()
    assert complete_checkpoints(cfg) == [0]
    assert [r["epoch"] for r in read_json(runs.log_path(cfg))] == [0]
    train(tiny_config(num_epoch=2, model="vgg16_cam", begin_epoch=1))
    log = read_json(runs.log_path(cfg))
    assert [r["epoch"] for r in log] == [0, 1] and len({r["run"] for r in log}) == 1


def test_params_without_states_advise_no_resume(tiny_config):
    """A .params alone (e.g. copied for inference) cannot be resumed: the errors say so."""
    cfg = tiny_config(model="vgg16_cam", num_epoch=1)
    train(cfg)
    os.remove(checkpoint_path(cfg, 0, "states"))
    assert last_complete_epoch(cfg) is None
    with pytest.raises(FileExistsError) as error:
        train(cfg)
    assert "--begin-epoch" not in str(error.value) and "--overwrite" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Resume with other settings

@pytest.mark.parametrize("flags, changed", [
    (["--learning-rate", "0.003"], "--learning-rate 0.001 in the run, 0.003 now"),
    (["--image-size", "40"], "--image-size 32 in the run, 40 now"),
    (["--batch-size", "2"], "global batch (--batch-size x workers) 4 in the run, 2 now"),
    (["--cpus", "2"], "devices (--gpus / --cpus, x workers) '1 CPU' in the run, '2 CPUs' now"),
    (["--seed", "1", "--dropout", "0"],
     "--dropout 0.5 in the run, 0.0 now; --seed 0 in the run, 1 now"),
])
def test_resume_with_other_settings_is_refused_naming_each(trained_snapshot, tiny_voc,
                                                           class_lists, tmp_path, capsys, flags,
                                                           changed):
    snapshot = copy_of(trained_snapshot, tmp_path)
    resume = icd_flags(tiny_voc, snapshot, class_lists["six"]) + ["--num-epoch", "2",
                                                                  "--begin-epoch", "1"]
    assert train_command.main(resume + flags) == 1
    record = read_json(os.path.join(snapshot, "vgg16_icd-0000.json"))
    assert error_line(capsys) == (
        f"error: {os.path.join(snapshot, 'vgg16_icd-0000.json')}: run {record['run']} was "
        f"trained with other settings ({changed}); resume with the run's settings for a "
        f"continuation bit for bit, or pass --allow-changes to start a new run from this "
        f"checkpoint (its records name this one as previous_run)")
    assert epochs(snapshot) == ["vgg16_icd-0000.params"]


def test_allow_changes_starts_a_new_run_chained_to_the_old_one(trained_snapshot, tiny_voc,
                                                               class_lists, tmp_path):
    snapshot = copy_of(trained_snapshot, tmp_path)
    flags = icd_flags(tiny_voc, snapshot, class_lists["six"])
    old = read_json(os.path.join(snapshot, "vgg16_icd-0000.json"))
    # settings that do not change the run: the same run continues
    same = str(tmp_path / "same")
    shutil.copytree(snapshot, same)
    assert train_command.main(icd_flags(tiny_voc, same, class_lists["six"]) + [
        "--num-epoch", "2", "--begin-epoch", "1", "--num-save", "3", "--log-frequency", "2",
        "--infer-size", "48"]) == 0
    assert read_json(os.path.join(same, "vgg16_icd-0001.json"))["run"] == old["run"]
    # other settings with --allow-changes: a new run whose records name the old one
    assert train_command.main(flags + ["--num-epoch", "2", "--begin-epoch", "1",
                                       "--learning-rate", "0.003", "--allow-changes"]) == 0
    new = read_json(os.path.join(snapshot, "vgg16_icd-0001.json"))
    assert new["run"] != old["run"] and new["previous_run"] == old["run"]
    assert new["config"]["learning_rate"] == 0.003 and old["previous_run"] is None
    log = read_json(os.path.join(snapshot, "vgg16_icd-log.json"))
    assert [(r["epoch"], r["run"]) for r in log] == [(0, old["run"]), (1, new["run"])]
    assert log[1]["lr"] == pytest.approx(0.003 * 0.5 ** 0.9)
    # the new run continues as itself (still chained) with its own settings
    assert train_command.main(flags + ["--num-epoch", "3", "--begin-epoch", "2",
                                       "--learning-rate", "0.003"]) == 0
    last = read_json(os.path.join(snapshot, "vgg16_icd-0002.json"))
    assert last["run"] == new["run"] and last["previous_run"] == old["run"]
