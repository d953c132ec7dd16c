"""icd-run (icd.paper), auto-resume, icd-compare and the two-level bootstrap (icd.stats), the
commands' --config and flag lists (issue #23)."""
import dataclasses
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from icd import runs, stats
from icd.config import read_config_file
from icd.pipeline import paper, sections as pipeline_sections, segment as segment_step, \
    settings as pipeline_settings, superpixels as superpixel_step
from icd.commands import compare as compare_command
from icd.commands import evaluate as eval_command
from icd.commands import infer as infer_command
from icd.commands import run as run_command
from icd.commands import seeds as seeds_command
from icd.commands import superpixels as superpixels_command
from icd.commands import train as train_command
from icd.commands.options import fill_from_config
from icd.io import write_json
from icd.runs import checkpoint_path, last_complete_epoch

from conftest import REPO


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
# Config: the pipeline section, --set, per-command flags, --config for every command

def test_pipeline_section_merges_its_base_and_set_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: vgg16_icd\npipeline:\n  cam: {model: vgg16_cam}\n"
                    "  seeds: {rows: [nocrf, crf]}\n  gt_root: gt\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nlearning_rate: 0.01\npipeline:\n  seeds: {rows: [crf]}\n")
    section = read_config_file(str(child)).pipeline
    assert section == {"cam": {"model": "vgg16_cam"}, "seeds": {"rows": ["crf"]},
                       "gt_root": "gt"}
    settings = pipeline_settings.PaperSettings(str(child), str(tmp_path / "out"),
                                   sets=pipeline_sections.parse_sets(["train.num_epoch=3",
                                                          "cam.learning_rate=0.5",
                                                          "seeds.rows=[nocrf]"]))
    assert settings.icd.learning_rate == 0.01 and settings.icd.num_epoch == 3
    assert settings.cam.model == "vgg16_cam" and settings.cam.learning_rate == 0.5
    assert settings.cam.num_epoch == 3 and settings.pipeline.seeds.rows == ("nocrf",)
    assert settings.icd.snapshot == str(tmp_path / "out" / "snapshot_icd")
    with pytest.raises(ValueError, match="--set: unknown stage 'sedes'"):
        pipeline_settings.PaperSettings(str(child), "o", sets=pipeline_sections.parse_sets(["sedes.rows=[crf]"]))
    with pytest.raises(ValueError, match=r"--set: seeds: unknown keys \['crf'\]"):
        pipeline_settings.PaperSettings(str(child), "o", sets=pipeline_sections.parse_sets(["seeds.crf=false"]))
    with pytest.raises(ValueError, match="--set: expected stage.key=value"):
        pipeline_sections.parse_sets(["rows=[crf]"])


def test_repeat_runs_the_steps_after_superpixels_per_training_seed(tiny_voc, tmp_path):
    settings = pipeline_settings.PaperSettings(_config(tmp_path, tiny_voc, 2), str(tmp_path), repeat=2)
    names = [s.name for s in paper.paper_steps(settings)]
    assert names == ["superpixels"] + [f"{b}.s{k}" for k in (0, 1) for b in (
        "train_icd", "train_cam", "infer", "seeds", "evaluate", "segment", "tables")] + \
        ["compare"]
    assert settings.training("icd", 1).seed == 1
    assert settings.training("icd", 1).snapshot == str(tmp_path / "seed1" / "snapshot_icd")
    assert paper.select(paper.paper_steps(settings), ["train"]) == \
        ["train_icd.s0", "train_cam.s0", "train_icd.s1", "train_cam.s1"]


def test_segment_labels_train_deeplab_on_each_source_in_its_own_folders(tiny_voc, tmp_path):
    config = _config(tmp_path, tiny_voc, 2)
    val = tiny_voc["data_list"].replace("train.txt", "val.txt")
    sets = ["segment.config=synthetic_deeplab.yaml", f"segment.list={val}",
            f"run.splits={{train: {tiny_voc['data_list']}, val: {val}}}"]
    one = pipeline_settings.PaperSettings(config, str(tmp_path / "one"), sets=pipeline_sections.parse_sets(sets))
    assert one.segmentation_dirs(0, "icd") == (str(tmp_path / "one" / "snapshot_segment"),
                                               str(tmp_path / "one" / "segmentation"))
    assert one.segmentation(0).label_root == os.path.join(one.results(0, "icd", "train"),
                                                          "seeds", "crf")
    # superpixels for the training list and every split's (val's scores are refined by them)
    assert superpixel_step.superpixel_lists(one) == [tiny_voc["data_list"], val]
    three = pipeline_settings.PaperSettings(config, str(tmp_path / "three"), sets=pipeline_sections.parse_sets(
        sets + ["segment.labels=[icd, cam, gt]", "segment.width=0.25"]))
    out = str(tmp_path / "three")
    assert three.segmentation(0, "cam").label_root == os.path.join(
        three.results(0, "cam", "train"), "seeds", "crf_cam")
    assert three.segmentation(0, "gt").label_root == tiny_voc["gt_root"]
    assert three.segmentation(0, "gt").snapshot == os.path.join(out, "snapshot_segment_gt")
    assert three.segmentation(0, "gt").width == 0.25
    assert three.segmentation_dirs(0, "cam")[1] == os.path.join(out, "segmentation", "cam")
    segment = {s.name: s for s in paper.paper_steps(three)}["segment"]
    assert set(segment.settings) >= {"icd", "cam", "gt"} and len(segment.folders) == 4
    with pytest.raises(ValueError, match="--set segment.labels: cam needs the baseline"):
        pipeline_settings.PaperSettings(config, out, sets=pipeline_sections.parse_sets(
            sets + ["segment.labels=[cam]", "run.cam=null"]))


def test_each_command_lists_only_the_flags_it_uses(capsys):
    for command, absent, present in ((train_command, ("--crf", "--flip", "--scales",
                                                      "--infer-size"), ("--learning-rate",)),
                                     (infer_command, ("--learning-rate", "--crf", "--momentum"),
                                      ("--infer-size",))):
        assert command.main(["--help"]) == 0
        text = capsys.readouterr().out
        assert all(flag not in text for flag in absent)
        assert all(flag in text for flag in present)


@pytest.mark.parametrize("command", [run_command, compare_command],
                         ids=["icd-run", "icd-compare"])
def test_icd_run_and_icd_compare_document_every_flag(command, capsys):
    from test_cli import test_help_documents_every_flag
    test_help_documents_every_flag(command, capsys)


def test_seeds_eval_and_superpixels_read_their_paths_from_config(capsys):
    args = seeds_command.build_parser().parse_args(["--config", "voc_vgg16"])
    fill_from_config(args, seeds_command.CONFIG_PATHS, ("results",))
    assert (args.results, args.data_list, args.image_root) == (
        "./snapshot/icd/results", "./data/VOC2012/ImageSets/Segmentation/train_aug.txt",
        "./data/VOC2012/JPEGImages")
    args = eval_command.build_parser().parse_args(["--config", "voc_vgg16"])
    fill_from_config(args, eval_command.CONFIG_PATHS)
    assert args.gt_root == "./data/VOC2012/SegmentationClassAug"
    assert args.data_list == "./data/VOC2012/ImageSets/Segmentation/train_aug.txt"
    args = superpixels_command.build_parser().parse_args(["--config", "voc_vgg16"])
    fill_from_config(args, superpixels_command.CONFIG_PATHS)
    assert args.out == "./data/superpixels"
    assert seeds_command.main(["--image-root", "x"]) == 1     # no --config: named flag
    assert "error: --results: required (or a --config that gives it)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The two-level bootstrap

def _confusions(rng, num_images, hits):
    """(N, 3, 3) confusions of images with 100 pixels of labels 0..2, `hits` of them right."""
    out = np.zeros((num_images, 3, 3))
    for i in range(num_images):
        for c in range(3):
            right = rng.binomial(100, hits)
            out[i, c, c] = right
            out[i, c, (c + 1) % 3] = 100 - right
    return out


def test_one_model_per_side_is_the_image_bootstrap():
    rng = np.random.default_rng(0)
    a, b = _confusions(rng, 12, 0.8), _confusions(rng, 12, 0.7)
    classes = [0, 1, 2]
    result = stats.compare_runs([a], [b], classes, resamples=200, seed=5)
    reference = stats.compare(stats.miou_statistic(a, classes), stats.miou_statistic(b, classes),
                              stats.resample_weights(12, 200, 5))
    for key in ("value", "reference", "difference", "low", "high"):
        assert result[key] == pytest.approx(reference[key])
    assert result["verdict"] == reference["verdict"] == "PASS"
    assert result["levels"]["training seeds"]["share"] == pytest.approx(0.0, abs=1e-12)
    assert result["levels"]["images"]["share"] == pytest.approx(1.0)


def test_spread_over_training_seeds_widens_the_interval():
    rng = np.random.default_rng(1)
    images_only = [_confusions(np.random.default_rng(2), 20, 0.75)]
    spread = [_confusions(rng, 20, h) for h in (0.6, 0.75, 0.9)]
    reference = [_confusions(rng, 20, 0.7)]
    narrow = stats.compare_runs(images_only, reference, [0, 1, 2], resamples=300)
    wide = stats.compare_runs(spread, reference, [0, 1, 2], resamples=300)
    assert wide["high"] - wide["low"] > 2 * (narrow["high"] - narrow["low"])
    assert wide["levels"]["training seeds"]["share"] > 0.5
    assert wide["value"] == pytest.approx(np.mean(wide["per_model"]["better"]))
    with pytest.raises(ValueError, match="different image sets"):
        stats.compare_runs(spread, [_confusions(rng, 5, 0.7)], [0, 1, 2])


# ---------------------------------------------------------------------------------------------
# End to end on the synthetic data with a VOC-like config (not the demo)

def _config(tmp_path, voc, epochs):
    path = tmp_path / "run.yaml"
    path.write_text(f"""base: {os.path.join(REPO, "experiments", "synthetic_run.yaml")}
image_root: {voc["image_root"]}
annotation_root: {voc["annotation_root"]}
data_list: {voc["data_list"]}
classes: {voc["classes"]}
width: 0.0625
image_size: 32
batch_size: 4
num_epoch: {epochs}
warmup_epochs: 1
num_workers: 0
num_save: 0
infer_size: 65
pipeline:
  gt_root: {voc["gt_root"]}
  splits: {{train: {voc["data_list"]}}}
  seeds: {{rows: [nocrf, crf]}}
  evaluate: {{thresholds: [0.0, 0.3]}}
  segment: {{config: null}}
""")
    return str(path)


def _icd_run(config, out, *extra):
    return [sys.executable, "-c", "import sys; from icd.commands.run import main; "
            "sys.exit(main(sys.argv[1:]))", "--config", config, "--out", out, "--cpus", "1",
            "--workers", "1", "--progress-every", "0", *extra]


def _actions(out):
    return {name[:-5]: json.load(open(os.path.join(out, "steps", name)))["status"]
            for name in os.listdir(os.path.join(out, "steps")) if name.endswith(".json")}


@pytest.mark.slow
def test_icd_run_resumes_a_killed_training_and_reruns_only_what_a_seed_setting_changes(
        tiny_voc, tmp_path, capsys):
    epochs = 8
    config = _config(tmp_path, tiny_voc, epochs)
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    # killed during the ICD training, once its first checkpoint is complete
    process = subprocess.Popen(_icd_run(config, killed), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # the .params is written last (README: a checkpoint is complete or absent)
    record = os.path.join(killed, "snapshot_icd", "vgg16_icd-0000.params")
    deadline = time.time() + 300
    while not os.path.isfile(record) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    cfg = pipeline_settings.PaperSettings(config, killed).training("icd")
    done = last_complete_epoch(cfg)
    assert 0 <= done < epochs - 1, "killed too late to test the resume"
    assert _actions(killed)["train_icd"] == "running"
    # rerun, no flag: training continues after the last complete checkpoint
    assert run_command.main(["--config", config, "--out", killed, "--cpus", "1",
                             "--workers", "1", "--progress-every", "0"]) == 0
    log = json.load(open(os.path.join(killed, "snapshot_icd", "vgg16_icd-log.json")))
    assert [r["epoch"] for r in log] == list(range(epochs))
    assert len({r["run"] for r in log}) == 1                      # one run, continued
    # an uninterrupted run gives the same seeds, file for file
    assert subprocess.run(_icd_run(config, clean), stdout=subprocess.DEVNULL).returncode == 0
    for model, folder in (("icd", "crf"), ("icd", "nocrf"), ("cam", "crf_cam")):
        a = os.path.join(killed, f"results_{model}", "train", "seeds", folder)
        b = os.path.join(clean, f"results_{model}", "train", "seeds", folder)
        names = sorted(n for n in os.listdir(b) if n.endswith(".png"))
        assert names and sorted(n for n in os.listdir(a) if n.endswith(".png")) == names
        match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        assert not mismatch and not errors, (folder, mismatch)
    assert os.path.isfile(os.path.join(clean, "tables", "tables.md"))
    # a seed setting changed: seeds and what follows rerun, nothing before them
    before = {s: json.load(open(os.path.join(clean, "steps", f"{s}.json")))["finished"]
              for s in ("superpixels", "train_icd", "train_cam", "infer", "seeds", "evaluate")}
    capsys.readouterr()
    summary = paper.run_paper(pipeline_settings.PaperSettings(
        config, clean, sets=pipeline_sections.parse_sets(["seeds.rows=[crf]"]),
        devices=dict(cpus=1, gpus="")), progress_every=0)
    assert {s: r["action"] for s, r in summary.items()} == dict(
        superpixels="skip", train_icd="skip", train_cam="skip", infer="skip", seeds="rerun",
        evaluate="rerun", segment="rerun", tables="rerun")
    assert not os.path.isdir(os.path.join(clean, "results_icd", "train", "seeds", "nocrf"))
    after = json.load(open(os.path.join(clean, "steps", "infer.json")))["finished"]
    assert after == before["infer"]
    # icd-compare on two folders the tools made
    assert compare_command.main([os.path.join(clean, "results_icd"),
                                 os.path.join(clean, "results_cam"), "--config", config,
                                 "--workers", "1", "--resamples", "100",
                                 "--out", str(tmp_path / "c.json")]) == 0
    result = json.load(open(tmp_path / "c.json"))
    tables = json.load(open(os.path.join(clean, "tables", "tables.json")))
    assert result["value"] == pytest.approx(
        tables["train"]["icd"]["seeds"]["seeds/crf"]["miou"])
    assert result["reference"] == pytest.approx(
        tables["train"]["cam"]["seeds"]["seeds/crf_cam"]["miou"])
    assert "A vs B: mIoU" in capsys.readouterr().out


@pytest.mark.slow
def test_icd_run_trains_on_two_workers_on_one_machine(tiny_voc, tmp_path):
    """`--kvstore dist_device_sync` under icd-launch (127.0.0.1): the training step of icd-run
    runs as a two-worker job, bounded in time, and leaves its checkpoint and done marker."""
    from test_distributed import environment, launch
    config, out = _config(tmp_path, tiny_voc, 1), str(tmp_path / "run")
    paper.run_paper(pipeline_settings.PaperSettings(config, out, devices=dict(cpus=1, gpus="")),
                    ["superpixels"], progress_every=0)
    script = tmp_path / "icd_run.py"   # the launcher passes the command through a shell
    script.write_text("import sys\nfrom icd.commands.run import main\nsys.exit(main())\n")
    command = [sys.executable, str(script)] + _icd_run(config, out, "--steps", "train_icd",
                                                      "--kvstore", "dist_device_sync", "--set",
                                                      "train.batch_size=2")[3:]
    status, log = launch(2, command, environment(), timeout=300)
    assert status == 0, log
    assert os.path.isfile(os.path.join(out, "snapshot_icd", "vgg16_icd-0000.params"))
    record = json.load(open(os.path.join(out, "snapshot_icd", "vgg16_icd-0000.json")))
    assert record["config"]["kvstore"] == "dist_device_sync" and len(
        next(iter(record["device_states"].values()))) == 2           # one device per worker
    assert _actions(out) == {"superpixels": "done", "train_icd": "done"}


def test_icd_run_segments_as_icd_infer_seg_after_a_training_of_another_process(
        tiny_voc, tmp_path, monkeypatch):
    """icd-run's segment step, its DeepLab trained by an earlier process: the precision of the
    run is enabled on the run's devices before the network is built, cuDNN autotune is off
    while it infers (and as before after it: the process trains on), and the CRF runs in
    --workers processes, as icd-infer-seg's for the same settings (the CRF pool is a thread
    pool here; bf16 itself needs a CPU with avx512_bf16: icd.amp.enable records its call)."""
    import concurrent.futures
    import mxnet as mx
    from icd import amp, infer as infer_module, segment as segment_module
    from icd.checkpoint import save_checkpoint
    from icd.model.pretrained import initialize
    from icd.commands import infer_seg
    from icd.data.voc import read_list
    from icd.model import model_from_config
    monkeypatch.setattr(pipeline_settings, "unsupported_reason", lambda precision, contexts: None)
    events = []
    monkeypatch.setattr(amp, "enable", lambda precision, contexts, flag="--amp": events.append(
        ("amp", precision, [str(c) for c in contexts])))
    val = tiny_voc["val_list"]
    settings = pipeline_settings.PaperSettings(_config(tmp_path, tiny_voc, 1), str(tmp_path / "run"),
                                   sets=pipeline_sections.parse_sets([
                                       "segment.config=synthetic_deeplab.yaml",
                                       f"segment.list={val}", "segment.width=0.0625",
                                       "segment.infer_size=49", "segment.crf=true"]),
                                   devices=dict(cpus=2, gpus="", amp="bf16"), workers=3)
    net = model_from_config(settings.segmentation(0))
    initialize(net, [mx.cpu()])
    params = str(tmp_path / "deeplab.params")
    save_checkpoint(net, params)
    monkeypatch.setattr(segment_step, "train_to_the_end", lambda cfg: params)   # trained before
    monkeypatch.delenv("MXNET_CUDNN_AUTOTUNE_DEFAULT", raising=False)

    def crf_pool(max_workers, mp_context=None):
        events.append(("crf", max_workers, os.environ.get("MXNET_CUDNN_AUTOTUNE_DEFAULT")))
        return concurrent.futures.ThreadPoolExecutor(max_workers)
    monkeypatch.setattr(segment_module, "ProcessPoolExecutor", crf_pool)
    monkeypatch.setattr(infer_module, "model_from_config",
                        lambda cfg: events.append(("build", cfg.model)) or model_from_config(cfg)
                        )   # the inference's own network (icd-run built another)
    segment_step.step_segment(settings, 0, None)
    assert events == [("amp", "bf16", ["cpu(0)", "cpu(1)"]), ("build", "vgg16_largefov"),
                      ("crf", 3, "0")]
    assert "MXNET_CUDNN_AUTOTUNE_DEFAULT" not in os.environ
    assert len(os.listdir(tmp_path / "run" / "segmentation" / "pred")) == len(read_list(val))
    # icd-infer-seg, same settings
    del events[:]
    assert infer_seg.main(["--config", settings.segment_config_file(), "--classes",
                           tiny_voc["classes"], "--image-root", tiny_voc["image_root"],
                           "--data-list", val, "--width", "0.0625", "--infer-size", "49",
                           "--crf", "--cpus", "2", "--amp", "bf16", "--params", params,
                           "--out", str(tmp_path / "seg"), "--workers", "3"]) == 0
    assert events == [("amp", "bf16", ["cpu(0)", "cpu(1)"]), ("build", "vgg16_largefov"),
                      ("crf", 3, "0")]
