"""The end-to-end demo on the built-in synthetic dataset: one small step per stage (IRN-style).

    data -> superpixels -> pretrain -> train_cam, train_icd -> infer -> seeds -> evaluate
         -> segment -> report

    python tools/demo.py                        # everything, about 11 minutes on 2 CPU cores
    python tools/demo.py --quick --out /tmp/q   # the reduced run of the test (numbers meaningless)
    python tools/demo.py --steps seeds evaluate report   # a subset; finished steps are skipped

Every step writes named folders under the output folder (default ./demo_output) and a marker
`steps/<step>.json` (icd.pipeline): a finished step with the same settings and inputs is skipped,
an interrupted one resumes (superpixels and seeds skip finished files, training continues from
its last checkpoint), a changed one or any with --overwrite clears its folders and reruns. The
console shows each step's and the whole run's elapsed time and time left.

Folders:
  data/                     synthetic VOC (JPEGImages, Annotations, SegmentationClass, ImageSets,
                            classes.txt: training, seeds, evaluation and report follow it)
  superpixels/              id-encoded PNGs (colour features: no pretrained network exists here)
  snapshot_pretrain/        classification (CAM-only) pre-training: the ImageNet stand-in
  snapshot_cam/             the CAM-only baseline, initialised from snapshot_pretrain
  snapshot_icd/             ICD, initialised from snapshot_pretrain
  results_cam/{train,val}/  scores_cam, seeds/{crf,nocrf}_cam, eval/   (release layout)
  results_icd/{train,val}/  scores_{cam,icd,icd_bu,icd_bu_sp}, seeds/..., eval/
  snapshot_segment_{icd,cam,gt}/  DeepLab-LargeFOV trained on the ICD seeds, the CAM-baseline
                            seeds and the ground truth of the train split (from the stand-in)
  segmentation/{icd,cam,gt}/ its val-split predictions pred/ (index PNGs), overlay/, eval.json
  report/                   report.md, report.json, figures/   (icd.report)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from .amp import PRECISIONS
from .checkpoint import checkpoint_path, load_checkpoint, write_imagenet_part
from .devices import parse_devices
from .config import Config, load_config
from .data.classes import read_classes
from .features import make_feature_factory
from .data.superpixels import make_superpixels
from .data.synthetic import make_synthetic_voc
from .data.voc import read_list
from .evaluate import THRESHOLDS, evaluate
from .infer import infer
from .model import model_from_config
from .paper import train_to_the_end
from .pipeline import Run, Step, select_steps
from .report import CAM_SEEDS, SPLITS, TABLE3, ReportInputs, write_report
from .seeds import make_seeds
from .segment import evaluate_predictions, segment

log = logging.getLogger(__name__)

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")
STEPS = ("data", "superpixels", "pretrain", "train_cam", "train_icd", "infer", "seeds",
         "evaluate", "segment", "report")
COMPARED = ("cam", "icd")   # the CAM-only baseline and ICD, whose scores and seeds are compared
# --quick: the reduced run of the test (about 20 s on 2 cores); numbers are meaningless
QUICK = dict(num_train=24, num_val=8, size=56, width=0.125, crop=48, batch_size=8, epochs=2,
             pretrain_epochs=2, segment_epochs=2)
# The segmentation step (Tables 7-8 analogue): DeepLab-LargeFOV trained on each label source of
# the train split, evaluated on the val split. (name, label, folder under results_<model>/train/
# seeds, or None for the ground-truth masks: the fully-supervised upper bound)
SEGMENTATION_SOURCES = (("icd", "ICD seeds + CRF", TABLE3[-1][1]),
                        ("cam", "CAM-baseline seeds + CRF", CAM_SEEDS[-1][1]),
                        ("gt", "ground-truth masks (upper bound)", None))
# Expected seconds per step on 2 CPU cores until a finished run's markers give real times.
# quick: measured (one --quick run). full: the step times of the README's run A
# (DNNL_MAX_CPU_ISA=AVX2 on this 2-core machine, otherwise idle).
ESTIMATES = {
    "quick": dict(data=0.5, superpixels=0.5, pretrain=2.1, train_cam=0.5, train_icd=0.7,
                  infer=1.6, seeds=2.5, evaluate=6.8, segment=6.0, report=6.0),
    "full": dict(data=4, superpixels=7, pretrain=101, train_cam=93, train_icd=145, infer=21,
                 seeds=42, evaluate=40, segment=172, report=23)}


@dataclass
class DemoSettings:
    """Everything the demo needs; None in a training field keeps the YAML file's value."""
    out: str = "./demo_output"
    # dataset (icd.data.synthetic.make_synthetic_voc); 6 classes
    num_train: int = 240
    num_val: int = 40
    size: int = 160
    data_seed: int = 0
    # training configs (experiments/*.yaml); the flags below override all three
    icd_config: str = os.path.join(EXPERIMENTS, "synthetic_demo.yaml")
    cam_config: str = os.path.join(EXPERIMENTS, "synthetic_demo_cam.yaml")
    pretrain_config: Optional[str] = os.path.join(EXPERIMENTS, "synthetic_pretrain.yaml")
    segment_config: str = os.path.join(EXPERIMENTS, "synthetic_deeplab.yaml")
    width: Optional[float] = None
    crop: Optional[int] = None          # Config.image_size
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    epochs: Optional[int] = None        # num_epoch of the CAM baseline and ICD
    pretrain_epochs: Optional[int] = None
    segment_epochs: Optional[int] = None  # num_epoch of the three DeepLab trainings
    # devices and processes
    cpus: int = 2
    gpus: str = ""
    workers: int = 2                    # superpixel / seed / evaluation processes
    amp: str = "off"                    # precision of training and inference (icd.amp)
    loader_workers: Optional[int] = None  # training data loader processes (None: the YAML's)
    # running
    steps: Sequence[str] = STEPS
    overwrite: bool = False
    thresholds: Sequence[float] = THRESHOLDS
    quick: bool = False                 # the QUICK sizes (picks the ESTIMATES of a first run)
    progress_every: float = 30.0        # seconds between progress lines while a step runs

    def __post_init__(self):
        if self.pretrain_config in ("", "none", "None"):
            self.pretrain_config = None    # no pre-training: CAM and ICD from a random He init
        self.steps = select_steps(STEPS, self.steps)

    def folder(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)


def quick_settings(**overrides) -> DemoSettings:
    """The reduced demo (tests): QUICK sizes, explicit `overrides` on top."""
    values = dict(QUICK, quick=True)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DemoSettings(**values)


# ---------------------------------------------------------------------------------------------
# Training configurations

TRAINING_FIELDS = ("model", "pretrained", "width", "dropout", "optimizer",
                   "bottom_up_features",
                   "bottom_up_loss", "top_down", "image_size", "batch_size", "learning_rate",
                   "momentum", "wd", "num_epoch", "warmup_epochs", "seed", "amp")
ICD_ONLY = ("bottom_up_features", "bottom_up_loss", "top_down", "warmup_epochs")


def config_file(settings: DemoSettings, which: str) -> Optional[str]:
    """The YAML file of "pretrain", "cam" or "icd" (None: no pre-training)."""
    return {"pretrain": settings.pretrain_config, "cam": settings.cam_config,
            "icd": settings.icd_config}[which]


def trained_models(settings: DemoSettings) -> List[str]:
    """The models the demo trains, in order."""
    return (["pretrain"] if settings.pretrain_config is not None else []) + list(COMPARED)


def class_list(settings: DemoSettings) -> str:
    """The data's class-list file (written by the data step; the mask ids 1..C follow it)."""
    return settings.folder("data", "classes.txt")


def training_config(settings: DemoSettings, which: str, data_classes: bool = True) -> Config:
    """Config of "pretrain", "cam" or "icd": the YAML, the demo's paths and size flags, over the
    data's class list (`data_classes` False: the YAML's own, for the fingerprint taken before
    the data step writes the list)."""
    data = settings.folder("data")
    epochs = settings.pretrain_epochs if which == "pretrain" else settings.epochs
    pretrained = None
    if which != "pretrain" and settings.pretrain_config is not None:
        pretrained = stand_in_weights(settings)
    overrides = dict(
        image_root=os.path.join(data, "JPEGImages"),
        annotation_root=os.path.join(data, "Annotations"),
        superpixel_root=settings.folder("superpixels"),
        data_list=os.path.join(data, "ImageSets", "Segmentation", "train.txt"),
        snapshot=settings.folder(f"snapshot_{which}"), pretrained=pretrained,
        width=settings.width, image_size=settings.crop, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, num_epoch=epochs,
        num_workers=settings.loader_workers, amp=settings.amp)
    if data_classes:
        overrides.update(classes=class_list(settings))
    if settings.gpus:
        overrides.update(gpus=settings.gpus, cpus=0)
    else:
        overrides.update(cpus=settings.cpus, gpus="")
    return load_config(config_file(settings, which), **overrides)


def segmentation_config(settings: DemoSettings, source: str,
                        data_classes: bool = True) -> Config:
    """Config of the DeepLab trained on `source` ("icd", "cam" or "gt", SEGMENTATION_SOURCES):
    the segment YAML, the demo's paths, and the ICD model's width, crop, class list and
    initialisation (the stand-in for vgg16_20M.params gives backbone, fc6 and fc7, as ImageNet
    weights would); `data_classes` as for `training_config`."""
    data = settings.folder("data")
    icd = training_config(settings, "icd", data_classes)
    folder = dict((name, seeds) for name, _, seeds in SEGMENTATION_SOURCES)[source]
    labels = (os.path.join(data, "SegmentationClass") if folder is None else
              os.path.join(results_dir(settings, source, "train"), "seeds", folder))
    return load_config(settings.segment_config, image_root=icd.image_root,
                       annotation_root=icd.annotation_root, data_list=icd.data_list,
                       label_root=labels, snapshot=settings.folder(f"snapshot_segment_{source}"),
                       pretrained=icd.pretrained, width=icd.width, image_size=icd.image_size,
                       num_epoch=settings.segment_epochs, num_workers=settings.loader_workers,
                       gpus=icd.gpus, cpus=icd.cpus, amp=icd.amp,
                       classes=class_list(settings) if data_classes else None)


def final_checkpoint(cfg: Config) -> str:
    return checkpoint_path(cfg, cfg.num_epoch - 1)


def stand_in_weights(settings: DemoSettings) -> str:
    """The pre-trained stand-in in the shape of `vgg16_20M.params` (backbone, fc6, fc7 only)."""
    return settings.folder("snapshot_pretrain", "vgg16_stand_in.params")


def step_settings(settings: DemoSettings, step: str) -> Dict:
    """The settings a step's outputs depend on (devices and process counts excluded)."""
    if step == "data":
        return dict(num_train=settings.num_train, num_val=settings.num_val, size=settings.size,
                    seed=settings.data_seed)
    if step == "superpixels":
        return dict(features="colour")
    if step in ("pretrain", "train_cam", "train_icd"):
        which = {"pretrain": "pretrain", "train_cam": "cam", "train_icd": "icd"}[step]
        if which == "pretrain" and settings.pretrain_config is None:
            return dict(skipped=True)
        # the class list is the data step's (an input of every training step, through the
        # superpixels), not in the fingerprint: classes.txt does not exist before it runs
        cfg = training_config(settings, which, data_classes=False)
        values = {k: getattr(cfg, k) for k in TRAINING_FIELDS}
        if which == "pretrain":
            values["export"] = "backbone, fc6, fc7"   # stand_in_weights
        if values["pretrained"]:
            values["pretrained"] = os.path.relpath(values["pretrained"], settings.out)
        return values
    if step == "evaluate":
        return dict(thresholds=[float(t) for t in settings.thresholds])
    if step == "segment":
        configs = {s: segmentation_config(settings, s, data_classes=False)
                   for s, _, _ in SEGMENTATION_SOURCES}
        return {s: dict({k: getattr(cfg, k) for k in TRAINING_FIELDS if k not in ICD_ONLY},
                        label_root=os.path.relpath(cfg.label_root, settings.out),
                        pretrained=cfg.pretrained and os.path.relpath(cfg.pretrained, settings.out),
                        scales=list(cfg.scales), flip=cfg.flip, crf=cfg.crf)
                for s, cfg in configs.items()}
    return {}


# ---------------------------------------------------------------------------------------------
# Steps: step_<name>(settings, run) -> a JSON-able summary kept in the step's marker

def _list(settings: DemoSettings, split: str) -> str:
    return settings.folder("data", "ImageSets", "Segmentation", f"{split}.txt")


def results_dir(settings: DemoSettings, model: str, split: str) -> str:
    return settings.folder(f"results_{model}", split)


def step_data(settings: DemoSettings, run: Run) -> Dict:
    names = make_synthetic_voc(settings.folder("data"), num_train=settings.num_train,
                               num_val=settings.num_val, size=settings.size,
                               seed=settings.data_seed)
    return {split: len(v) for split, v in names.items()}


def step_superpixels(settings: DemoSettings, run: Run) -> Dict:
    written = 0
    for split in SPLITS:
        written += len(make_superpixels(settings.folder("data", "JPEGImages"),
                                        _list(settings, split), settings.folder("superpixels"),
                                        feature_factory=make_feature_factory(None),
                                        workers=settings.workers if settings.workers > 1 else 0))
    return {"written": written}


def _train(settings: DemoSettings, which: str) -> Dict:
    """Train "pretrain", "cam" or "icd" to the end, continuing its run (icd.paper)."""
    return {"checkpoint": train_to_the_end(training_config(settings, which))}


def step_pretrain(settings: DemoSettings, run: Run) -> Dict:
    if settings.pretrain_config is None:
        return {"skipped": "no pretrain config: CAM and ICD start from a random He init"}
    result = _train(settings, "pretrain")
    # like the release's ImageNet file: no classifier, so fc8 starts as a new layer (weight
    # N(0, 0.01), bias 0: icd.model.backbone.new_parameter)
    write_imagenet_part(result["checkpoint"], stand_in_weights(settings))
    return dict(result, stand_in=stand_in_weights(settings))


def step_train_cam(settings: DemoSettings, run: Run) -> Dict:
    return _train(settings, "cam")


def step_train_icd(settings: DemoSettings, run: Run) -> Dict:
    return _train(settings, "icd")


def infer_size_for(image_root: str, names: Sequence[str]) -> int:
    """The smallest 8k+1 (the release's 513 = 8*64+1 pattern) >= every image side."""
    side = 1
    for name in names:
        with Image.open(os.path.join(image_root, name + ".jpg")) as im:
            side = max(side, *im.size)
    return 8 * -(-(side - 1) // 8) + 1


def demo_infer_size(settings: DemoSettings) -> int:
    names = [n for split in SPLITS for n in read_list(_list(settings, split))]
    return infer_size_for(settings.folder("data", "JPEGImages"), names)


def step_infer(settings: DemoSettings, run: Run) -> Dict:
    size = demo_infer_size(settings)
    counts = {}
    for model in COMPARED:
        cfg = training_config(settings, model)
        contexts = parse_devices(cfg.gpus, cfg.cpus)
        for split in SPLITS:
            cfg_split = dataclasses.replace(cfg, data_list=_list(settings, split),
                                            infer_size=size)
            log.info("infer %s model on the %s split (infer_size %d)", model, split, size)
            counts[f"{model}/{split}"] = len(infer(cfg_split, final_checkpoint(cfg),
                                                   results_dir(settings, model, split),
                                                   contexts))
    return {"infer_size": size, "images": counts}


def step_seeds(settings: DemoSettings, run: Run) -> Dict:
    size = demo_infer_size(settings)
    data = settings.folder("data")
    common = dict(image_root=os.path.join(data, "JPEGImages"),
                  annotation_root=os.path.join(data, "Annotations"), infer_size=size,
                  workers=settings.workers, classes=read_classes(class_list(settings)))
    for split in SPLITS:
        icd_results = results_dir(settings, "icd", split)
        for _, folder, scores, crf in TABLE3:
            make_seeds(icd_results, data_list=_list(settings, split), crf=crf, icd_folder=scores,
                       out_dir=os.path.join(icd_results, "seeds", folder), **common)
        cam_results = results_dir(settings, "cam", split)
        for _, folder, crf in CAM_SEEDS:
            make_seeds(cam_results, data_list=_list(settings, split), crf=crf,
                       icd_folder="scores_cam", cam_folder="scores_cam",
                       out_dir=os.path.join(cam_results, "seeds", folder), **common)
    return {}


def step_evaluate(settings: DemoSettings, run: Run) -> Dict:
    size = demo_infer_size(settings)
    data = settings.folder("data")
    for split in SPLITS:
        common = dict(gt_root=os.path.join(data, "SegmentationClass"),
                      data_list=_list(settings, split),
                      annotation_root=os.path.join(data, "Annotations"),
                      image_root=os.path.join(data, "JPEGImages"), infer_size=size,
                      thresholds=tuple(settings.thresholds), workers=settings.workers,
                      classes=read_classes(class_list(settings)))
        evaluate(results_dir(settings, "icd", split),
                 seed_dirs=[os.path.join("seeds", f) for _, f, _, _ in TABLE3],
                 folders={"cam": "scores_cam", "icd": "scores_icd"}, **common)
        # the CAM baseline: its CAM maps are both inputs (the "CAM" column of Table 2)
        evaluate(results_dir(settings, "cam", split),
                 seed_dirs=[os.path.join("seeds", f) for _, f, _ in CAM_SEEDS],
                 folders={"cam": "scores_cam", "icd": "scores_cam"}, **common)
    return {}


def segmentation_dir(settings: DemoSettings, source: str) -> str:
    return settings.folder("segmentation", source)


def step_segment(settings: DemoSettings, run: Run) -> Dict:
    """DeepLab-LargeFOV on each label source of the train split, predicted and evaluated on the
    val split (single scale, no flip or CRF unless the segment YAML says so)."""
    data = settings.folder("data")
    summary = {}
    for source, label, _ in SEGMENTATION_SOURCES:
        cfg = segmentation_config(settings, source)
        log.info("segmentation on %s", label)
        train_to_the_end(cfg)
        contexts = parse_devices(cfg.gpus, cfg.cpus)
        net = model_from_config(cfg)
        load_checkpoint(net, final_checkpoint(cfg), contexts)
        net.hybridize(static_alloc=True)
        out = segmentation_dir(settings, source)
        segment(net, cfg.image_root, _list(settings, "val"), out, contexts, cfg.scales, cfg.flip,
                cfg.crf, demo_infer_size(settings), cfg.infer_batch_size, overwrite=True,
                classes=cfg.class_names)
        result = evaluate_predictions(out, os.path.join(data, "SegmentationClass"),
                                      _list(settings, "val"), cfg.model, workers=settings.workers,
                                      classes=cfg.class_names)
        summary[source] = {"miou": result["miou"]}
    return summary


def report_inputs(settings: DemoSettings) -> ReportInputs:
    """The report's view of this demo: its folders and the settings actually used."""
    return ReportInputs(
        out=settings.out, data=settings.folder("data"),
        classes=read_classes(class_list(settings)),
        lists={split: _list(settings, split) for split in SPLITS},
        results={m: {split: results_dir(settings, m, split) for split in SPLITS}
                 for m in COMPARED},
        trainings={w: training_config(settings, w) for w in trained_models(settings)},
        config_files={w: config_file(settings, w) for w in trained_models(settings)},
        dataset=dict(num_train=settings.num_train, num_val=settings.num_val,
                     size=settings.size, seed=settings.data_seed),
        infer_size=demo_infer_size(settings), workers=settings.workers,
        segmentation={label: (segmentation_dir(settings, source),
                              segmentation_config(settings, source))
                      for source, label, _ in SEGMENTATION_SOURCES})


def step_report(settings: DemoSettings, run: Run) -> Dict:
    return {"report": write_report(report_inputs(settings), run)}


STEP_FUNCTIONS = {"data": step_data, "superpixels": step_superpixels, "pretrain": step_pretrain,
                  "train_cam": step_train_cam, "train_icd": step_train_icd, "infer": step_infer,
                  "seeds": step_seeds, "evaluate": step_evaluate, "segment": step_segment,
                  "report": step_report}


def step_inputs(settings: DemoSettings, step: str) -> Tuple[str, ...]:
    """The steps whose outputs `step` reads (its marker fingerprint holds their finish times)."""
    trained_from = ("pretrain",) if settings.pretrain_config is not None else ("superpixels",)
    return {"data": (), "superpixels": ("data",), "pretrain": ("superpixels",),
            "train_cam": trained_from, "train_icd": trained_from,
            "infer": ("train_cam", "train_icd"), "seeds": ("infer",), "evaluate": ("seeds",),
            "segment": ("seeds",), "report": ("evaluate", "segment")}[step]


def step_folders(settings: DemoSettings, step: str) -> List[str]:
    """The folders a step owns (cleared before a rerun)."""
    return {"data": [settings.folder("data")],
            "superpixels": [settings.folder("superpixels")],
            "pretrain": [settings.folder("snapshot_pretrain")],
            "train_cam": [settings.folder("snapshot_cam")],
            "train_icd": [settings.folder("snapshot_icd")],
            "infer": [settings.folder(f"results_{m}") for m in COMPARED],
            "seeds": [os.path.join(results_dir(settings, m, s), "seeds")
                      for m in COMPARED for s in SPLITS],
            "evaluate": [os.path.join(results_dir(settings, m, s), "eval")
                         for m in COMPARED for s in SPLITS],
            "segment": [settings.folder("segmentation")]
            + [settings.folder(f"snapshot_segment_{s}") for s, _, _ in SEGMENTATION_SOURCES],
            "report": [settings.folder("report")]}[step]


def demo_steps(settings: DemoSettings) -> List[Step]:
    """The demo as pipeline steps (the report reruns every time)."""
    estimates = ESTIMATES["quick" if settings.quick else "full"]
    return [Step(name, functools.partial(STEP_FUNCTIONS[name], settings),
                 inputs=step_inputs(settings, name), folders=tuple(step_folders(settings, name)),
                 settings=step_settings(settings, name), estimate=estimates[name],
                 always=name == "report")
            for name in STEPS]


def run(settings: DemoSettings) -> Dict[str, Dict]:
    """Run the selected steps in order; returns {step: {"action", "seconds", ...}}."""
    return Run(demo_steps(settings), settings.folder("steps"), selected=settings.steps,
               overwrite=settings.overwrite, progress_every=settings.progress_every).execute()


# ---------------------------------------------------------------------------------------------
# Command line (icd-demo, tools/demo.py)

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the demo's flags, run it, print the report's path."""
    defaults = DemoSettings()
    lines = __doc__.splitlines()
    parser = argparse.ArgumentParser(description=lines[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(lines[1:]))
    parser.add_argument("--out", default=defaults.out, help="output folder (default %(default)s)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), metavar="STEP",
                        help=f"steps to run, any of: {' '.join(STEPS)} (default: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rerun the selected steps from scratch even if done")
    parser.add_argument("--quick", action="store_true",
                        help=f"reduced sizes for a smoke test: {QUICK}")
    parser.add_argument("--progress-every", type=float, default=None, metavar="SECONDS",
                        help=f"a progress line every SECONDS while a step runs "
                             f"(default {defaults.progress_every:g}; 0: only between steps)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--cpus", type=int, default=None,
                         help=f"CPU contexts (default {defaults.cpus}: the multi-device path)")
    devices.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes for superpixels, seeds, evaluation "
                             f"(default {defaults.workers})")
    parser.add_argument("--amp", choices=PRECISIONS, default=None,
                        help="mixed precision of every training and inference: bf16 on CPUs "
                             "with avx512_bf16 or AMX, fp16 on GPUs (default: off, float32)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="training data-loader processes (default: the YAML's num_workers)")
    sizes = parser.add_argument_group("sizes (override the defaults / --quick)")
    for flag, kind in (("num-train", int), ("num-val", int), ("size", int), ("data-seed", int),
                       ("width", float), ("crop", int), ("batch-size", int),
                       ("learning-rate", float), ("epochs", int), ("pretrain-epochs", int),
                       ("segment-epochs", int)):
        sizes.add_argument("--" + flag, type=kind, default=None)
    configs = parser.add_argument_group("training configs")
    configs.add_argument("--icd-config", default=None, help=f"default {defaults.icd_config}")
    configs.add_argument("--cam-config", default=None, help=f"default {defaults.cam_config}")
    configs.add_argument("--segment-config", default=None,
                         help=f"default {defaults.segment_config}")
    configs.add_argument("--pretrain-config", default=None,
                         help=f"default {defaults.pretrain_config}; 'none': no pre-training "
                              "(CAM and ICD from a random He init)")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quick = args.pop("quick")
    if args["gpus"]:
        args["cpus"] = 0
    values = {k: v for k, v in args.items() if v is not None}
    settings = quick_settings(**values) if quick else DemoSettings(**values)
    summary = run(settings)
    report = summary.get("report", {}).get("report")
    if report:
        print(f"report: {os.path.abspath(report)}")
    return 0
