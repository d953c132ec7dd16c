"""icd-run keeps what it did not write and never presents stale results as current: a step
removes only the files it wrote, an --out holding the run's inputs is refused, inputs are
fingerprinted by content, a finished step's missing outputs are remade, a moved run folder is
the same run, steps of a larger --repeat are forgotten, one run per folder."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from icd.io import read_json
from icd.pipeline import paper, settings as pipeline_settings, steps as pipeline

from helpers import icd_run, last_error, run_config


@pytest.fixture
def voc_copy(tiny_voc, tmp_path):
    """A copy of tiny_voc (its folder holds the user's own superpixels/ of train and val)."""
    root = str(tmp_path / "data")
    shutil.copytree(tiny_voc["root"], root)
    return {k: (os.path.join(root, os.path.relpath(v, tiny_voc["root"]))
                if isinstance(v, str) and v.startswith(tiny_voc["root"]) else v)
            for k, v in tiny_voc.items()}


def _names(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Only what the step wrote is removed

def test_overwrite_with_out_the_data_folder_keeps_the_users_files(voc_copy, tmp_path, caplog):
    out = voc_copy["root"]
    config = run_config(tmp_path, voc_copy, 1)
    superpixels = os.path.join(out, "superpixels")
    train = _names(voc_copy["data_list"])
    for name in train:                     # the step makes the train maps; val's are the user's
        os.remove(os.path.join(superpixels, name + ".png"))
    val = sorted(n for n in os.listdir(superpixels) if n.endswith(".png"))
    assert val
    with open(os.path.join(superpixels, "NOTES.txt"), "w") as f:
        f.write("mine")
    os.makedirs(os.path.join(superpixels, "extra"))
    with open(os.path.join(superpixels, "extra", "x.txt"), "w") as f:
        f.write("mine too")
    assert icd_run(config, out, "--steps", "superpixels") == 0
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert icd_run(config, out, "--steps", "superpixels", "--overwrite") == 0
    assert open(os.path.join(superpixels, "NOTES.txt")).read() == "mine"
    assert open(os.path.join(superpixels, "extra", "x.txt")).read() == "mine too"
    assert all(os.path.isfile(os.path.join(superpixels, n)) for n in val)
    assert all(os.path.isfile(os.path.join(superpixels, n + ".png")) for n in train)
    assert f"step superpixels: kept {len(val) + 2} files it did not write" in caplog.text
    marker = read_json(os.path.join(out, "steps", "superpixels.json"))
    assert sorted(marker["wrote"]) == sorted(
        os.path.join("superpixels", n + ".png") for n in train)


def test_a_rerun_with_out_dot_keeps_a_users_file(voc_copy, tmp_path, monkeypatch):
    config = run_config(tmp_path, voc_copy, 1)
    work = tmp_path / "work"
    (work / "superpixels").mkdir(parents=True)
    (work / "superpixels" / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert icd_run(config, ".", "--steps", "superpixels") == 0
    assert icd_run(config, ".", "--steps", "superpixels", "--overwrite") == 0
    assert (work / "superpixels" / "mine.txt").read_text() == "mine"
    assert len(list((work / "superpixels").glob("*.png"))) == 8


def test_a_changed_setting_removes_the_steps_files_and_emptied_folders_only(tmp_path):
    root = str(tmp_path)
    calls = []

    def write(run):
        calls.append(1)
        os.makedirs(os.path.join(root, "a", "made"), exist_ok=True)
        open(os.path.join(root, "a", "made", f"out{len(calls)}.txt"), "w").close()
        return {}

    def steps(n):
        return [pipeline.Step("a", write, folders=(os.path.join(root, "a"),),
                              settings={"n": n})]

    os.makedirs(os.path.join(root, "a", "empty_of_mine"))
    open(os.path.join(root, "a", "mine.txt"), "w").close()
    pipeline.Run(steps(1), os.path.join(root, "steps"), progress_every=0).execute()
    pipeline.Run(steps(2), os.path.join(root, "steps"), progress_every=0).execute()
    assert sorted(os.listdir(os.path.join(root, "a"))) == ["empty_of_mine", "made", "mine.txt"]
    assert os.listdir(os.path.join(root, "a", "made")) == ["out2.txt"]   # out1 was the step's


def test_an_out_that_holds_the_runs_inputs_is_refused(voc_copy, tmp_path, capsys):
    config = run_config(tmp_path, voc_copy, 1)
    before = open(voc_copy["data_list"]).read()
    assert icd_run(config, voc_copy["data_list"]) == 1
    assert last_error(capsys) == f"error: --out {voc_copy['data_list']}: is a file; the run " \
                                 f"folder must be a folder of its own"
    assert open(voc_copy["data_list"]).read() == before
    # a class list inside a folder that a step writes (<out>/tables)
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    classes = out / "tables" / "classes.txt"
    shutil.copy(voc_copy["classes"], classes)
    text = open(config).read().replace(f"classes: {voc_copy['classes']}", f"classes: {classes}")
    with open(config, "w") as f:
        f.write(text)
    assert icd_run(config, str(out)) == 1
    assert last_error(capsys) == (f"error: --out {out}: {config}: classes {classes} lies in "
                                  f"{out / 'tables'}, which step tables writes; choose another "
                                  f"--out")
    assert not os.path.exists(out / "superpixels")


# ---------------------------------------------------------------------------------------------
# Stale results

def test_a_list_edited_in_place_reruns_the_step(voc_copy, tmp_path):
    config, out = run_config(tmp_path, voc_copy, 1), str(tmp_path / "out")
    settings = pipeline_settings.PaperSettings(config, out, devices=dict(cpus=1, gpus=""))
    assert paper.run_paper(settings, ["superpixels"], progress_every=0)[
        "superpixels"]["action"] == "run"
    assert paper.run_paper(settings, ["superpixels"], progress_every=0)[
        "superpixels"]["action"] == "skip"
    names = _names(voc_copy["data_list"])
    with open(voc_copy["data_list"], "w") as f:
        f.write("\n".join(names[:6]) + "\n")
    summary = paper.run_paper(settings, ["superpixels"], progress_every=0)
    assert summary["superpixels"]["action"] == "rerun" and summary["superpixels"]["written"] == 6
    assert sorted(os.listdir(os.path.join(out, "superpixels"))) == sorted(
        n + ".png" for n in names[:6])


def test_a_deleted_output_is_remade_not_skipped(voc_copy, tmp_path, caplog):
    config, out = run_config(tmp_path, voc_copy, 1), str(tmp_path / "out")
    settings = pipeline_settings.PaperSettings(config, out, devices=dict(cpus=1, gpus=""))
    paper.run_paper(settings, ["superpixels"], progress_every=0)
    folder = os.path.join(out, "superpixels")
    gone, other = sorted(os.listdir(folder))[:2]
    kept_time = os.stat(os.path.join(folder, other)).st_mtime_ns
    os.remove(os.path.join(folder, gone))
    with caplog.at_level(logging.INFO):
        summary = paper.run_paper(settings, ["superpixels"], progress_every=0)
    assert summary["superpixels"]["action"] == "resume"
    assert summary["superpixels"]["written"] == 1           # only the missing image
    assert os.path.isfile(os.path.join(folder, gone))
    assert os.stat(os.path.join(folder, other)).st_mtime_ns == kept_time
    assert f"1 files it wrote are missing (superpixels/{gone}): remaking them" in caplog.text


def _file_steps(root, calls, settings):
    def step(run):
        calls.append(1)
        os.makedirs(os.path.join(root, "a"), exist_ok=True)
        open(os.path.join(root, "a", "out.txt"), "w").close()
        return {}
    return [pipeline.Step("a", step, folders=(os.path.join(root, "a"),), settings=settings)]


def test_files_the_settings_name_count_by_content_and_run_paths_are_relative(tmp_path):
    root = str(tmp_path / "run")
    os.makedirs(root)
    weights = tmp_path / "weights.params"
    weights.write_bytes(b"1234")
    calls = []

    def execute(run_root):
        settings = {"nested": {"pretrained": str(weights)},
                    "label_root": os.path.join(run_root, "results", "seeds")}
        return pipeline.Run(_file_steps(run_root, calls, settings),
                            os.path.join(run_root, "steps"), progress_every=0).execute()

    assert execute(root)["a"]["action"] == "run"
    marker = read_json(os.path.join(root, "steps", "a.json"))
    assert marker["fingerprint"]["settings"]["label_root"] == "<out>/results/seeds"
    assert marker["fingerprint"]["files"] == {
        str(weights): "4:03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"}
    assert execute(root)["a"]["action"] == "skip"
    weights.write_bytes(b"5678")                                   # same size, new content
    assert execute(root)["a"]["action"] == "rerun"
    moved = str(tmp_path / "moved")
    os.rename(root, moved)                                          # the whole run folder moved
    assert execute(moved)["a"]["action"] == "skip"


def _done_marker(out, name, folder, files):
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(out, folder, rel)), exist_ok=True)
        open(os.path.join(out, folder, rel), "w").close()
    os.makedirs(os.path.join(out, "steps"), exist_ok=True)
    with open(os.path.join(out, "steps", name + ".json"), "w") as f:
        json.dump({"status": "done", "fingerprint": {}, "folders": [folder], "kept": {},
                   "wrote": [os.path.join(folder, rel) for rel in files]}, f)


def test_a_smaller_repeat_removes_what_the_dropped_seeds_wrote(voc_copy, tmp_path, caplog):
    config, out = run_config(tmp_path, voc_copy, 1), str(tmp_path / "out")
    # what --repeat 2 left: seed1's training and the two-seed comparison
    _done_marker(out, "train_icd.s1", os.path.join("seed1", "snapshot_icd"),
                 ["vgg16_icd-0000.params"])
    _done_marker(out, "compare", "compare", ["compare.md", "compare.json"])
    open(os.path.join(out, "seed1", "snapshot_icd", "notes.txt"), "w").close()   # the user's
    settings = pipeline_settings.PaperSettings(config, out, devices=dict(cpus=1, gpus=""), repeat=1)
    with caplog.at_level(logging.INFO):
        paper.run_paper(settings, ["superpixels"], progress_every=0)
    assert not os.path.exists(os.path.join(out, "compare"))
    assert os.listdir(os.path.join(out, "seed1", "snapshot_icd")) == ["notes.txt"]
    os.remove(os.path.join(out, "seed1", "snapshot_icd", "notes.txt"))
    _done_marker(out, "infer.s2", os.path.join("seed2", "results_icd"), ["train/a.npy"])
    paper.run_paper(settings, ["superpixels"], progress_every=0)
    assert not os.path.exists(os.path.join(out, "seed2"))     # emptied: gone with its parents
    assert sorted(os.listdir(os.path.join(out, "steps"))) == ["input-digests.cache",
                                                             "superpixels.json"]
    assert "step compare is no longer in this run: removing the files it wrote in compare" \
        in caplog.text


def test_two_runs_on_one_out_are_refused(voc_copy, tmp_path, capsys):
    config, out = run_config(tmp_path, voc_copy, 1), str(tmp_path / "out")
    lock = os.path.join(out, "steps", "run.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from icd.io import exclusive_lock\n"
         f"with exclusive_lock({lock!r}, {out!r}):\n"
         "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert icd_run(config, out, "--steps", "superpixels") == 1
        error = last_error(capsys)
        assert error.startswith(f"error: {os.path.abspath(out)}: in use by another run (pid "
                                f"{holder.pid} "), error
        assert not os.path.exists(os.path.join(out, "superpixels"))
    finally:
        holder.kill()
        holder.wait()
