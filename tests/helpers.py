"""Helpers shared by the test modules (plain functions and constants; fixtures live in
conftest.py): the checkout's path, command-line flags and error lines, class lists, a hand-made
results folder, icd-run configs, local multi-worker jobs, and a recorder of queued batches."""
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np

from icd.checkpoint import read_params
from icd.commands import run as run_command
from icd.data.dataset import DataPaths
from icd.data.synthetic import DEFAULT_CLASSES
from icd.data.voc import VOC_CLASSES, write_mask
from icd.seeds import SeedSettings, make_seeds


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEVICES = [mx.cpu(1), mx.cpu(2)]


# ---------------------------------------------------------------------------------------------
# Commands: data flags, the one error line

def data_flags(voc):
    return ["--image-root", voc["image_root"], "--annotation-root", voc["annotation_root"],
            "--superpixel-root", voc["superpixel_root"], "--data-list", voc["data_list"]]


def tiny_train_flags(voc, snapshot):
    """A 1/16-width, 32 px, batch-4 training of `voc` from a random init, loading in-process."""
    return data_flags(voc) + ["--pretrained", "", "--width", "0.0625", "--image-size", "32",
                              "--batch-size", "4", "--num-epoch", "2", "--num-workers", "0",
                              "--snapshot", snapshot]


def error_line(capsys, alone=True):
    """The one line a failed command printed on stderr (and nothing on stdout); with
    `alone=False`, the one `error: ` line among other lines (progress bars) on stderr."""
    out, err = capsys.readouterr()
    if not alone:
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, lines
        return lines[0]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def params_of(path):
    return {k: v.asnumpy() for k, v in read_params(path).items()}


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Class lists and an ICD training of tiny_voc through icd-train

SIX = DEFAULT_CLASSES                            # tiny_voc's names: aeroplane, bird, car, ...
REORDERED = (SIX[1], SIX[0]) + SIX[2:]           # the same six, two swapped
THREE = ("kettle", "traffic light", "zebra")
SEG_CONFIG = os.path.join(REPO, "experiments", "synthetic_deeplab.yaml")


def shown(classes):
    """How a message shows a class list (icd.data.classes.show_classes)."""
    more = ", ..." if len(classes) > 8 else ""
    return f"{len(classes)} classes [{', '.join(classes[:8])}{more}]"


def icd_flags(voc, snapshot, classes):
    """A 1/16-width, 32 px, batch-4 ICD training of tiny_voc with the class list `classes`."""
    return data_flags(voc) + ["--classes", classes, "--pretrained", "", "--width", "0.0625",
                              "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
                              "--snapshot", snapshot, "--infer-size", "64",
                              "--infer-batch-size", "4"]


def copy_of(trained, tmp_path):
    snapshot = str(tmp_path / "snapshot")
    shutil.copytree(trained, snapshot)
    return snapshot


def epochs(snapshot):
    return sorted(f for f in os.listdir(snapshot) if f.endswith(".params"))


# ---------------------------------------------------------------------------------------------
# A tiny results folder: hand-made images, ground truth and score maps

NAMES = ("img_a", "img_b", "img_c")
LABELS = {"img_a": [0], "img_b": [0, 14], "img_c": [11]}
H, W, S, FEAT = 20, 24, 32, 8


def _xml(classes):
    objects = "".join(f"<object><name>{VOC_CLASSES[c]}</name><difficult>0</difficult></object>"
                      for c in classes)
    return f"<annotation>{objects}</annotation>"


def build_results(root):
    """VOC-like tiny dataset and results folder under `root`; returns a dict of paths.

    Each class owns a rectangle of the image; scores are +1 inside it and -1 outside at feature
    resolution (FEAT×FEAT over the S×S padded canvas); the CAM is the ICD score halved.
    """
    paths = {k: os.path.join(root, k) for k in ("images", "annotations", "gt", "results")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    rng = np.random.default_rng(0)
    boxes = [(slice(0, 10), slice(0, 12)), (slice(8, 20), slice(12, 24))]
    for name in NAMES:
        labels = LABELS[name]
        gt = np.zeros((H, W), np.uint8)
        image = np.full((H, W, 3), 40, np.uint8)
        icd = np.full((len(labels), FEAT, FEAT), -1, np.float32)
        for i, c in enumerate(labels):
            ys, xs = boxes[i]
            gt[ys, xs] = c + 1
            image[ys, xs] = (200, 60 + 60 * i, 30)
            canvas = np.full((S, S), -1, np.float32)
            canvas[ys, xs] = 1
            icd[i] = cv2.resize(canvas, (FEAT, FEAT), interpolation=cv2.INTER_AREA)
        gt[0, 0] = 255
        image = np.clip(image + rng.integers(0, 8, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(paths["images"], name + ".jpg"), image[:, :, ::-1])
        write_mask(os.path.join(paths["gt"], name + ".png"), gt)
        with open(os.path.join(paths["annotations"], name + ".xml"), "w") as f:
            f.write(_xml(labels))
        for folder, scores in (("scores_icd", icd), ("scores_cam", icd / 2 - 0.1)):
            os.makedirs(os.path.join(paths["results"], folder), exist_ok=True)
            np.save(os.path.join(paths["results"], folder, name + ".npy"), scores)
        sal = (gt > 0).astype(np.uint8) * 255
        os.makedirs(os.path.join(root, "saliency"), exist_ok=True)
        cv2.imwrite(os.path.join(root, "saliency", name + ".png"), sal)
    paths["saliency"] = os.path.join(root, "saliency")
    paths["list"] = os.path.join(root, "train.txt")
    with open(paths["list"], "w") as f:
        f.write("".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in NAMES))
    return paths


def results_seeds(paths, workers=1, out_dir=None, overwrite=False, shard=(0, 1), **settings):
    return make_seeds(paths["results"],
                      DataPaths(paths["images"], paths["annotations"], paths["list"]),
                      SeedSettings(infer_size=S, **settings), out_dir=out_dir, workers=workers,
                      overwrite=overwrite, shard=shard)


# ---------------------------------------------------------------------------------------------
# icd-run on tiny_voc

def run_config(tmp_path, voc, epochs, pipeline=None, **keys):
    """`run.yaml` in `tmp_path`: experiments/synthetic_run.yaml on `voc`, CPU-sized. `keys` (YAML
    text values) replace top-level keys or add them, `pipeline` the pipeline: section's."""
    top = dict(base=os.path.join(REPO, "experiments", "synthetic_run.yaml"),
               image_root=voc["image_root"], annotation_root=voc["annotation_root"],
               data_list=voc["data_list"], classes=voc["classes"], width=0.0625, image_size=32,
               batch_size=4, num_epoch=epochs, warmup_epochs=1, num_workers=0, num_save=0,
               infer_size=65)
    top.update(keys)
    sections = {"gt_root": voc["gt_root"], "splits": f"{{train: {voc['data_list']}}}",
                "seeds": "{rows: [nocrf, crf]}", "evaluate": "{thresholds: [0.0, 0.3]}",
                "segment": "{config: null}", **(pipeline or {})}
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in top.items()) + "pipeline:\n"
                    + "".join(f"  {key}: {value}\n" for key, value in sections.items()))
    return str(path)


def icd_run_argv(config, out, *extra):
    return [sys.executable, "-c", "import sys; from icd.commands.run import main; "
            "sys.exit(main(sys.argv[1:]))", "--config", config, "--out", out, "--cpus", "1",
            "--workers", "1", "--progress-every", "0", *extra]


def step_statuses(out):
    return {name[:-5]: json.load(open(os.path.join(out, "steps", name)))["status"]
            for name in os.listdir(os.path.join(out, "steps")) if name.endswith(".json")}


def icd_run(config, out, *extra):
    return run_command.main(["--config", config, "--out", out, "--cpus", "1", "--workers", "1",
                             "--progress-every", "0", *extra])


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Jobs on 127.0.0.1: every launched job runs in its own process group, killed in a finally

LAUNCH = os.path.join(REPO, "tools", "launch.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, DMLC_PS_ROOT_URI="127.0.0.1",
               DMLC_PS_ROOT_PORT=str(free_port()), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@contextlib.contextmanager
def started(cmd, env):
    """A process in its own group; the whole group is killed when the block ends."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def run_job(cmd, env, timeout=300):
    with started(cmd, env) as proc:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out


def launch(workers, command, env, timeout=300):
    return run_job([sys.executable, LAUNCH, "-n", str(workers), "-s", "1", "--launcher",
                    "local", "--"] + command, env, timeout)


# ---------------------------------------------------------------------------------------------
# The order of queued batches and host read-backs

class QueueOrder:
    """Records, in order, each call of `module.name` (queueing batch t's forward: ("queue", t))
    and each host read-back of an array it returned (("read", t))."""

    def __init__(self, monkeypatch, module, name, arrays_of):
        self.events, self.tags = [], {}
        queue, read = getattr(module, name), mx.nd.NDArray.asnumpy

        def queued(*args, **kwargs):
            result = queue(*args, **kwargs)
            t = sum(kind == "queue" for kind, _ in self.events)
            self.events.append(("queue", t))
            self.tags.update({id(a): (t, a) for a in arrays_of(result)})
            return result

        def asnumpy(array):
            if id(array) in self.tags:
                self.events.append(("read", self.tags[id(array)][0]))
            return read(array)

        monkeypatch.setattr(module, name, queued)
        monkeypatch.setattr(mx.nd.NDArray, "asnumpy", asnumpy)

    def assert_overlapped(self, batches):
        """Batch t+1's forward was queued before anything of batch t was read back."""
        assert [t for kind, t in self.events if kind == "queue"] == list(range(batches))
        for t in range(batches - 1):
            assert self.events.index(("queue", t + 1)) < self.events.index(("read", t)), \
                self.events
