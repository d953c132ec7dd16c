"""Training on several workers (MXNet's parameter server on 127.0.0.1) and sharded stages.

Every launched job runs in its own process group, bounded by a timeout and killed in a finally."""
import os
import shutil
import signal
import sys
import time

import mxnet as mx
import numpy as np
import pytest

from icd.checkpoint import read_params
from icd.commands import infer_seg, seeds, superpixels
from icd.commands.runner import UsageError
from icd.data.dataset import EpochShuffleSampler
from icd.data.voc import read_list, read_mask
from icd.devices import shard_names
from icd.distributed import ordered_moving_mean
from icd.io import read_json, write_json
from icd.model import ops
from icd.parity import compare, summary
from icd.provenance import ProvenanceError, producing, read_record, record_path, require_complete

from helpers import (LAUNCH, NAMES, REPO, build_results, environment, launch, results_seeds,
                     run_job, started)


TRAIN = os.path.join(REPO, "tools", "train_icd.py")


def train_flags(tiny_voc, snapshot, **options):
    values = dict(image_root=tiny_voc["image_root"], annotation_root=tiny_voc["annotation_root"],
                  superpixel_root=tiny_voc["superpixel_root"], data_list=tiny_voc["data_list"],
                  pretrained="", width=0.0625, image_size=32, num_workers=0, dropout=0.0,
                  log_frequency=1, snapshot=snapshot)
    values.update(options)
    return [sys.executable, TRAIN] + [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


# ---------------------------------------------------------------------------------------------
# Pieces, in this process

def test_shards_of_the_epoch_make_the_single_machine_global_batches():
    whole = list(EpochShuffleSampler(11, seed=5, block=1))
    shards = [list(EpochShuffleSampler(11, seed=5, shard=(r, 2), block=2)) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]   # 11 // (2 * 2) global batches of 2 x 2
    for b in range(2):   # global batch b = worker 0's block, then worker 1's
        assert shards[0][2 * b:2 * b + 2] + shards[1][2 * b:2 * b + 2] == whole[4 * b:4 * b + 4]


def test_shard_names_split_the_list():
    names = [f"n{i}" for i in range(7)]
    parts = [shard_names(names, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == names and parts[0] == ["n0", "n3", "n6"]
    with pytest.raises(ValueError, match="--shard 3/3"):
        shard_names(names, (3, 3))


@pytest.mark.parametrize("command", [superpixels, seeds, infer_seg])
def test_shard_flag_parses_and_says_what_is_wrong(command, capsys):
    parser = command.build_parser()
    required = {superpixels: ["--image-root=i", "--data-list=l", "--out=o", "--features=colour"],
                seeds: ["--results=r", "--image-root=i", "--annotation-root=a",
                        "--data-list=l"], infer_seg: []}[command]
    assert parser.parse_args(required + ["--shard", "1/3"]).shard == (1, 3)
    assert parser.parse_args(required).shard == (0, 1)
    for bad in ("3/2", "2/2", "1", "a/2", "-1/2"):
        with pytest.raises(UsageError) as error:
            parser.parse_args(required + [f"--shard={bad}"])
        assert str(error.value) == f"--shard: expected I/N with 0 <= I < N, got {bad!r}"
    assert command.main(required + ["--shard", "3/2"]) == 2
    assert "error: --shard: expected I/N with 0 <= I < N, got '3/2'" in capsys.readouterr().err


def test_a_shard_is_not_evaluated_alone(capsys):
    assert infer_seg.main(["--model=vgg16_largefov", "--shard=0/2", "--gt-root=gt"]) == 1
    err = capsys.readouterr().err
    assert "--gt-root: shard 0/2" in err and "without --shard" in err


def test_ordered_moving_mean_is_the_shared_store_in_that_order():
    """The exchange's rule applied to the contributions gives what one store updated by the
    devices one after another holds (the release's rule with a fixed order)."""
    rng = np.random.default_rng(0)
    start = mx.nd.array(rng.normal(size=(4, 2)))
    store = ops.SharedMovingMean(start, [mx.cpu(0), mx.cpu(1)])
    pushed = [mx.nd.array(rng.normal(size=(4, 2))) for _ in range(2)]
    for d in (1, 0):
        store.update(pushed[d], mx.cpu(d))
    values = ordered_moving_mean(start, list(store.contributions))
    np.testing.assert_array_equal(values[-1].asnumpy(), store.master.asnumpy())
    # every class moves 10% toward what each device pushed (release section 3.2)
    np.testing.assert_allclose(values[0].asnumpy(), 0.9 * start.asnumpy() + 0.1 *
                               pushed[1].asnumpy(), rtol=1e-6)
    assert list(store.order) == [1, 0]


def test_sharded_seeds_equal_the_unsharded_seeds_file_for_file(tmp_path):
    paths = build_results(str(tmp_path / "data"))
    whole = results_seeds(paths, crf=False, out_dir=str(tmp_path / "whole"))
    sharded = str(tmp_path / "sharded")
    written = [results_seeds(paths, crf=False, out_dir=sharded, shard=(0, 2))["written"]]
    with pytest.raises(ProvenanceError, match="shards 1/2 not complete"):
        require_complete(sharded, "make_seeds.py")   # the first shard done is not the folder
    written.append(results_seeds(paths, crf=False, out_dir=sharded, shard=(1, 2))["written"])
    assert written == [2, 1]
    assert require_complete(sharded, "make_seeds.py")["shards"] == {"0/2": "complete",
                                                                     "1/2": "complete"}
    assert not os.path.exists(record_path(sharded))
    assert sorted(os.listdir(tmp_path / "sharded")) == sorted(os.listdir(whole["out_dir"]))
    for name in NAMES:
        np.testing.assert_array_equal(
            read_mask(os.path.join(tmp_path, "sharded", name + ".png")),
            read_mask(os.path.join(whole["out_dir"], name + ".png")))


def test_shard_records_merge_states_and_notes(tmp_path):
    folder = str(tmp_path / "scores")
    settings = {"infer_size": 64}
    with producing([folder], "infer", settings, shard=(1, 2)) as notes:
        notes["cropped"] = {"b": {"size": [80, 70]}}
        assert read_record(folder)["state"] == "running"
    with pytest.raises(ValueError):
        with producing([folder], "infer", settings, shard=(0, 2)) as notes:
            notes["cropped"] = {"a": {"size": [90, 60]}}
            raise ValueError("disk full")
    record = read_record(folder)
    assert record["state"] == "failed" and "shard 0/2: ValueError: disk full" in record["error"]
    with pytest.raises(ProvenanceError, match="shard 0/2: ValueError: disk full"):
        require_complete(folder, "infer_scores.py")
    with producing([folder], "infer", settings, shard=(0, 2)):   # the shard again: continues
        pass
    record = read_record(folder)
    assert record["state"] == "complete" and set(record["notes"]["cropped"]) == {"a", "b"}
    assert read_json(record_path(folder, (1, 2)))["notes"] == {"cropped": {"b": {
        "size": [80, 70]}}}   # each shard its own record
    open(os.path.join(folder, "a.npy"), "wb").close()
    with pytest.raises(ProvenanceError, match="changed: infer_size 64 -> 32"):
        with producing([folder], "infer", {"infer_size": 32}, shard=(0, 2), names=["a"]):
            pass


def test_overwrite_is_refused_for_a_shard_and_splits_replace_each_other(tmp_path):
    folder = tmp_path / "seeds"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    with pytest.raises(ProvenanceError, match=r"--overwrite with --shard 1/2 would clear"):
        with producing([str(folder)], "seeds", {"crf": True}, overwrite=True, shard=(1, 2)):
            pass
    assert os.listdir(folder) == ["a.png"] and read_record(str(folder)) is None
    with producing([str(folder)], "seeds", {"crf": True}, overwrite=True, names=["a"]):
        pass   # an unsharded --overwrite clears the folder
    assert os.listdir(folder) == []
    other = folder / ".b.abcdefgh.tmp.png"   # another shard's write in progress
    other.write_bytes(b"x")
    with producing([str(folder)], "seeds", {"crf": True}, shard=(1, 3)):
        pass
    assert other.exists() and not os.path.exists(record_path(str(folder)))
    assert read_record(str(folder))["state"] == "running"   # 0/3 and 2/3 not run
    with producing([str(folder)], "seeds", {"crf": True}):   # the whole list, unsharded
        pass
    assert not other.exists() and not os.path.exists(record_path(str(folder), (1, 3)))
    assert read_record(str(folder))["state"] == "complete"


# ---------------------------------------------------------------------------------------------
# Jobs on 127.0.0.1

@pytest.mark.slow
def test_a_dead_worker_ends_the_job_with_its_status(tmp_path):
    """Worker 1 crashes while worker 0 waits for it in the store: the launcher ends the job
    and exits with the crashed worker's status (MXNet's tracker would wait for ever)."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, mxnet as mx\n"
        "kv = mx.kv.create('dist_sync')\n"
        "kv.init(3, mx.nd.zeros((2,)))\n"
        "if kv.rank == 1:\n"
        "    os._exit(7)\n"
        "kv.push(3, mx.nd.ones((2,)))\n"
        "out = mx.nd.zeros((2,))\n"
        "kv.pull(3, out=out)\n"
        "print(out.asnumpy())\n")
    started_at = time.time()
    status, out = launch(2, [sys.executable, str(script)], environment(), timeout=120)
    assert status == 7, out
    assert time.time() - started_at < 120


@pytest.mark.slow
def test_two_workers_step_equals_one_worker_with_two_devices(tiny_voc, tmp_path):
    """One step from the same state: 2 workers x 1 CPU (batch 2 each, dist_sync_device) and
    1 worker x cpu(0), cpu(1) (batch 4) give the same parameters, BatchNorm statistics and
    sign-flip store. NaiveEngine makes the one-machine devices reach the store in device order,
    the order (rank, device) of the workers."""
    data_list = tmp_path / "four.txt"
    data_list.write_text("".join(n + "\n" for n in read_list(tiny_voc["data_list"])[:4]))
    naive = environment(MXNET_ENGINE_TYPE="NaiveEngine")
    start = str(tmp_path / "start")
    one_machine = dict(data_list=data_list, cpus=2, batch_size=4)
    status, out = run_job(train_flags(tiny_voc, start, num_epoch=1, **one_machine), naive)
    assert status == 0, out
    # a batch-start mean that one batch cannot overturn, so that every device reads the same
    # signs in both runs (a device of rank 1 does not see rank 0's update of the same batch)
    record = read_json(os.path.join(start, "vgg16_icd-0000.json"))
    record["sign_flip_store"] = [[100.0, 0.0] if c % 2 else [0.0, 100.0] for c in range(20)]
    write_json(os.path.join(start, "vgg16_icd-0000.json"), record)
    for name in ("ref", "dist"):
        shutil.copytree(start, tmp_path / name)
    resume = dict(num_epoch=2, begin_epoch=1)
    status, out = run_job(train_flags(tiny_voc, str(tmp_path / "ref"), **one_machine, **resume),
                          naive)
    assert status == 0, out
    status, out = launch(2, train_flags(tiny_voc, str(tmp_path / "dist"), data_list=data_list,
                                        cpus=1, batch_size=2, kvstore="dist_device_sync",
                                        **resume), environment())
    assert status == 0, out

    def result(folder):
        params = {k: v.asnumpy() for k, v in
                  read_params(os.path.join(folder, "vgg16_icd-0001.params")).items()}
        return params, read_json(os.path.join(folder, "vgg16_icd-0001.json"))
    before = {k: v.asnumpy() for k, v in
              read_params(os.path.join(start, "vgg16_icd-0000.params")).items()}
    (ref, ref_record), (dist, dist_record) = result(tmp_path / "ref"), result(tmp_path / "dist")
    # feat_bn_gamma is ignored by the forward (fix_gamma), which writes 1 into the device's copy
    # (docs/release.md section 11): its stored value depends on where the update runs (the
    # one-machine store's copy vs the workers' own), not on the training
    ignored = "arg:feat_bn_gamma"
    errors = compare({k: v for k, v in dist.items() if k != ignored},
                     {k: v for k, v in ref.items() if k != ignored}, before.get)
    assert summary(errors).endswith("PASS"), summary(errors)
    assert max(e.error for e in errors) < 1e-6   # in fact the same numbers
    store = np.array(dist_record["sign_flip_store"])
    np.testing.assert_allclose(store, np.array(ref_record["sign_flip_store"]), rtol=1e-6)
    assert np.abs(store - np.array(record["sign_flip_store"])).max() > 1   # it moved
    for name, copies in ref_record["device_states"].items():   # per device, rank-major
        np.testing.assert_allclose(np.array(dist_record["device_states"][name]),
                                   np.array(copies), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_worker_run_is_killed_resumes_and_finishes(tiny_voc, tmp_path):
    snapshot = str(tmp_path / "snapshot")
    flags = train_flags(tiny_voc, snapshot, batch_size=2, cpus=1, kvstore="dist_sync_device",
                        num_epoch=12, image_size=64, num_save=20)
    env = environment()
    cmd = [sys.executable, LAUNCH, "-n", "2", "-s", "1", "--launcher", "local", "--"] + flags
    # the loop writes a checkpoint's .states and run record first, its .params last
    first = os.path.join(snapshot, "vgg16_icd-0000.params")
    last = os.path.join(snapshot, "vgg16_icd-0011.json")
    with started(cmd, env) as proc:
        deadline = time.time() + 300
        while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(first), proc.communicate(timeout=60)[0]
        os.killpg(proc.pid, signal.SIGKILL)   # the whole job, as a lost machine would
    assert not os.path.exists(last), "the job ended before it could be killed"
    done = [e for e in range(12) if os.path.exists(os.path.join(snapshot,
                                                                f"vgg16_icd-{e:04d}.params"))]
    status, out = run_job(cmd + [f"--begin-epoch={done[-1] + 1}", "--overwrite"], env)
    assert status == 0, out
    log = read_json(os.path.join(snapshot, "vgg16_icd-log.json"))
    assert [r["epoch"] for r in log] == list(range(12))
    assert len({r["run"] for r in log}) == 1   # rank 0's run, continued
    record = read_json(last)
    assert all(len(copies) == 2 for copies in record["device_states"].values())
    assert not [f for f in os.listdir(snapshot) if f.startswith(".") or "tmp" in f]
