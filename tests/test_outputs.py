"""What a stage deletes and who writes a folder: --overwrite never follows a link out of the
results and keeps files the stage does not write, an output folder that is an input is refused,
one run per folder (OS advisory locks)."""
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys

import mxnet as mx
import pytest

from icd.commands import infer_seg, seeds, superpixels
from icd.data.voc import read_list, read_mask
from icd.infer import infer
from icd.io import FolderInUse, exclusive_lock
from icd.provenance import ProvenanceError, lock_path, producing
from icd.runs import checkpoint_path, complete_checkpoints, snapshot_lock
from icd.tasks import train


def test_overwrite_never_follows_a_link_out_of_the_results(trained, tmp_path):
    results = tmp_path / "results"
    user = tmp_path / "user_files"
    user.mkdir()
    (user / "thesis.npy").write_bytes(b"mine")
    results.mkdir()
    os.symlink(user, results / "scores_icd")
    overwrite = dataclasses.replace(trained, overwrite=True)
    with pytest.raises(ProvenanceError, match=r"scores_icd: is a symbolic link to .*user_files, "
                                              r"outside .*results; refusing"):
        infer(overwrite, checkpoint_path(trained, 0), str(results), [mx.cpu()])
    assert (user / "thesis.npy").read_bytes() == b"mine"


def test_overwrite_keeps_files_the_stage_does_not_write(trained, tmp_path, monkeypatch, caplog):
    """Issue 30 item 1: `icd-seeds --out . --overwrite` deleted the user's holiday.png (not in
    the list, never written by a stage). Only `<id>.png` of this run's ids and of the ids its
    record lists are removed, and a log line names what was kept."""
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 0), results, [mx.cpu()])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "scores.npy").write_bytes(b"keep me too")
    (out / "holiday.png").write_bytes(b"my photo")
    (out / "extra").mkdir()
    monkeypatch.chdir(out)
    argv = ["--results", results, "--image-root", trained.image_root, "--annotation-root",
            trained.annotation_root, "--data-list", trained.data_list, "--no-crf", "--out", ".",
            "--workers", "1"]
    names = read_list(trained.data_list)
    (out / f"{names[0]}.png").write_bytes(b"an old seed")
    with caplog.at_level(logging.INFO, logger="icd.provenance"):
        assert seeds.main(argv + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "scores.npy").read_bytes() == b"keep me too"
    assert (out / "holiday.png").read_bytes() == b"my photo" and (out / "extra").is_dir()
    assert read_mask(str(out / f"{names[0]}.png")).ndim == 2   # rewritten
    assert ("kept 4 files the seeds stage did not write: extra/, holiday.png, notes.txt, "
            "scores.npy") in caplog.text
    assert json.loads((tmp_path / "mine.provenance.json").read_text())["state"] == "complete"
    # files of the ids the record lists are the stage's, even when the list no longer names them
    shorter = tmp_path / "shorter.txt"
    shorter.write_text(names[1] + "\n")
    assert seeds.main(argv[:-6] + [str(shorter), "--no-crf", "--out", ".", "--overwrite"]) == 0
    assert set(os.listdir(out)) == {"extra", "holiday.png", f"{names[1]}.png", "notes.txt",
                                    "scores.npy"}


def test_an_output_folder_that_is_an_input_is_refused(trained, tmp_path, capsys):
    """Issue 30: `icd-seeds --out` equal to the scores folder it reads replaced that folder's
    provenance record; now an error naming both flags, before anything is written."""
    results = str(tmp_path / "results")
    infer(trained, checkpoint_path(trained, 0), results, [mx.cpu()])
    scores = os.path.join(results, "scores_icd")
    record = open(scores + ".provenance.json").read()
    argv = ["--results", results, "--image-root", trained.image_root, "--annotation-root",
            trained.annotation_root, "--data-list", trained.data_list, "--no-crf"]
    assert seeds.main(argv + ["--out", scores + "/"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --out {scores}/: is the folder the stage reads as --results/--icd-scores "
        f"{scores}; a stage never writes into its input, choose another --out")
    assert open(scores + ".provenance.json").read() == record
    assert seeds.main(argv + ["--out", trained.image_root]) == 1
    assert "reads as --image-root" in capsys.readouterr().err
    gt = tmp_path / "segmentation" / "pred"   # predictions over the ground truth they are scored on
    assert infer_seg.main(["--model", "vgg16_largefov", "--image-root", trained.image_root,
                           "--data-list", trained.data_list, "--params", "none.params",
                           "--gt-root", str(gt), "--out", str(gt.parent)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --out/pred {gt}: is the folder the stage reads as --gt-root {gt}; a stage never "
        f"writes into its input, choose another --out")
    out = str(tmp_path / "sp")
    assert superpixels.main(["--image-root", out, "--data-list", trained.data_list, "--out",
                             out, "--features", "colour"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}: is the folder the stage reads as --image-root {out}; a stage never "
        f"writes into its input, choose another --out")


# ---------------------------------------------------------------------------------------------
# One run per folder: OS advisory locks

HOLD = """
import sys, time
from icd.io import exclusive_lock
with exclusive_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder():
    """Start a process holding a lock (bounded: it ends by itself after 60 s, and is killed)."""
    started = []

    def start(path, folder):
        process = subprocess.Popen([sys.executable, "-c", HOLD, path, folder],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_a_second_training_into_the_snapshot_refuses_naming_the_first(tiny_config, holder,
                                                                       caplog):
    cfg = tiny_config(model="vgg16_cam", num_epoch=1)
    lock = os.path.join(cfg.snapshot, f"{cfg.model}.lock")
    process = holder(lock, cfg.snapshot)
    with pytest.raises(FolderInUse, match=rf"snapshot \(vgg16_cam\): in use by another run \(pid "
                                          rf"{process.pid} on host .* since .*; lock {lock}\)"):
        train(cfg)
    assert not os.path.exists(checkpoint_path(cfg, 0))
    process.send_signal(signal.SIGKILL)                  # gone without releasing: stale
    process.wait(timeout=30)
    train(cfg)
    assert f"pid {process.pid}" in caplog.text and "taking over the lock" in caplog.text
    assert complete_checkpoints(cfg) == [0]
    assert not os.path.exists(lock)                      # released on exit
    with snapshot_lock(cfg):                             # and free again
        pass


def test_result_folders_are_locked_while_written(tmp_path, holder):
    folder = str(tmp_path / "results" / "seeds" / "crf")
    process = holder(lock_path(folder), folder)
    with pytest.raises(FolderInUse, match=rf"crf: in use by another run \(pid {process.pid}"):
        with producing([folder], "seeds", {"a": 1}):
            pass
    assert not os.path.exists(folder)
    process.terminate()
    process.wait(timeout=30)
    with producing([folder], "seeds", {"a": 1}):
        with exclusive_lock(lock_path(folder), folder):   # re-entrant in the holding process
            assert os.path.isfile(lock_path(folder))
        assert os.path.isfile(lock_path(folder))
    assert not os.path.exists(lock_path(folder))


def test_a_second_evaluation_into_a_report_folder_refuses(tmp_path, tiny_voc, holder, capsys):
    from icd.commands import evaluate as evaluate_command
    results = tmp_path / "results"
    results.mkdir()
    out = str(results / "eval")
    process = holder(lock_path(out), out)
    assert evaluate_command.main(["--results", str(results), "--gt-root", tiny_voc["gt_root"],
                                  "--data-list", tiny_voc["data_list"]]) == 1
    assert f"error: {out}: in use by another run (pid {process.pid} " in capsys.readouterr().err
