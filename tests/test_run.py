"""icd-run end to end on tiny_voc (icd.pipeline.paper): a killed training resumed and only what a
seed setting changes rerun, a training on two workers, the segmentation as icd-infer-seg's."""
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from icd import infer as infer_module
from icd.commands import compare as compare_command, run as run_command
from icd.pipeline import (paper, sections as pipeline_sections, segment as segment_step,
                          settings as pipeline_settings)
from icd.runs import last_complete_epoch

from helpers import environment, icd_run_argv, launch, run_config, step_statuses


@pytest.mark.slow
def test_icd_run_resumes_a_killed_training_and_reruns_only_what_a_seed_setting_changes(
        tiny_voc, tmp_path, capsys):
    epochs = 8
    config = run_config(tmp_path, tiny_voc, epochs)
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    # killed during the ICD training, once its first checkpoint is complete
    process = subprocess.Popen(icd_run_argv(config, killed), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # the .params is written last (docs/troubleshooting.md: a checkpoint is complete or absent)
    record = os.path.join(killed, "snapshot_icd", "vgg16_icd-0000.params")
    deadline = time.time() + 300
    while not os.path.isfile(record) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    cfg = pipeline_settings.PaperSettings(config, killed).training("icd")
    done = last_complete_epoch(cfg)
    assert 0 <= done < epochs - 1, "killed too late to test the resume"
    assert step_statuses(killed)["train_icd"] == "running"
    # rerun, no flag: training continues after the last complete checkpoint
    assert run_command.main(["--config", config, "--out", killed, "--cpus", "1",
                             "--workers", "1", "--progress-every", "0"]) == 0
    log = json.load(open(os.path.join(killed, "snapshot_icd", "vgg16_icd-log.json")))
    assert [r["epoch"] for r in log] == list(range(epochs))
    assert len({r["run"] for r in log}) == 1                      # one run, continued
    # an uninterrupted run gives the same seeds, file for file
    assert subprocess.run(icd_run_argv(config, clean), stdout=subprocess.DEVNULL).returncode == 0
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
    config, out = run_config(tmp_path, tiny_voc, 1), str(tmp_path / "run")
    paper.run_paper(pipeline_settings.PaperSettings(config, out, devices=dict(cpus=1, gpus="")),
                    ["superpixels"], progress_every=0)
    script = tmp_path / "icd_run.py"   # the launcher passes the command through a shell
    script.write_text("import sys\nfrom icd.commands.run import main\nsys.exit(main())\n")
    command = [sys.executable, str(script)] + icd_run_argv(config, out, "--steps", "train_icd",
                                                      "--kvstore", "dist_device_sync", "--set",
                                                      "train.batch_size=2")[3:]
    status, log = launch(2, command, environment(), timeout=300)
    assert status == 0, log
    assert os.path.isfile(os.path.join(out, "snapshot_icd", "vgg16_icd-0000.params"))
    record = json.load(open(os.path.join(out, "snapshot_icd", "vgg16_icd-0000.json")))
    assert record["config"]["kvstore"] == "dist_device_sync" and len(
        next(iter(record["device_states"].values()))) == 2           # one device per worker
    assert step_statuses(out) == {"superpixels": "done", "train_icd": "done"}


def test_icd_run_segments_as_icd_infer_seg_after_a_training_of_another_process(
        tiny_voc, tmp_path, monkeypatch):
    """icd-run's segment step, its DeepLab trained by an earlier process: the precision of the
    run is enabled on the run's devices before the network is built, cuDNN autotune is off
    while it infers (and as before after it: the process trains on), and the CRF runs in
    --workers processes, as icd-infer-seg's for the same settings (the CRF pool is a thread
    pool here; bf16 itself needs a CPU with avx512_bf16: icd.amp.enable records its call)."""
    import concurrent.futures
    import mxnet as mx
    from icd import amp, segment as segment_module
    from icd.model.pretrained import initialize
    from icd.checkpoint import save_checkpoint
    from icd.commands import infer_seg
    from icd.data.voc import read_list
    from icd.model import model_from_config
    monkeypatch.setattr(pipeline_settings, "unsupported_reason", lambda precision, contexts: None)
    events = []
    monkeypatch.setattr(amp, "enable", lambda precision, contexts, flag="--amp": events.append(
        ("amp", precision, [str(c) for c in contexts])))
    val = tiny_voc["val_list"]
    settings = pipeline_settings.PaperSettings(run_config(tmp_path, tiny_voc, 1), str(tmp_path / "run"),
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
