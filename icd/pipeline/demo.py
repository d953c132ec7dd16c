"""The end-to-end demo on the built-in synthetic dataset: one small step per stage (IRN-style).

    data -> superpixels -> pretrain -> train_icd, train_cam -> infer -> seeds -> evaluate
         -> segment -> report

The demo is `icd-run` (icd.pipeline.paper) on experiments/synthetic_demo.yaml: its steps
superpixels, train_icd, train_cam, infer, seeds, evaluate and segment, with what only the demo
has around them: `data` (the synthetic dataset), `pretrain` (the ImageNet stand-in) and `report`
(icd.pipeline.report). Its command line, its folders and how it resumes: icd.commands.demo
(`icd-demo --help`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import mxnet as mx
from PIL import Image

from ..checkpoint import read_params
from ..config import Config, load_config
from ..data.classes import read_classes
from ..data.synthetic import make_synthetic_voc
from ..data.voc import read_list
from ..evaluate import THRESHOLDS
from ..io import atomic_path
from ..model.backbone import BACKBONE_BN, is_imagenet_key
from .paper import paper_steps
from .report import SPLITS, ReportInputs, write_report
from .settings import PaperSettings
from .steps import Run, Step, select_steps
from .tables import SEGMENT_LABELS
from .train import train_to_the_end, training_settings

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments")
STEPS = ("data", "superpixels", "pretrain", "train_icd", "train_cam", "infer", "seeds",
         "evaluate", "segment", "report")
DEMO_ONLY = ("data", "pretrain", "report")   # the others are icd-run's (icd.pipeline.paper)
COMPARED = ("cam", "icd")   # the CAM-only baseline and ICD, whose scores and seeds are compared
# --quick: the reduced run of the test (about 20 s on 2 cores); numbers are meaningless
QUICK = dict(num_train=24, num_val=8, size=56, width=0.125, crop=48, batch_size=8, epochs=2,
             pretrain_epochs=2, segment_epochs=2)
# The report's name of each DeepLab of the segment step (synthetic_demo.yaml's segment.labels)
SEGMENTATION_LABELS = {**SEGMENT_LABELS, "icd": "ICD seeds + CRF"}   # its segment.seeds: crf
RANKING = ("gt", "icd", "cam")   # the order Tables 7-8 imply, best first (the report checks it)
# Expected seconds per step on 2 CPU cores until a finished run's markers give real times.
# quick: measured (one --quick run). full: the step times of docs/demo.md's run A
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
    # the run config (icd-run's, with its pipeline: section) and the pre-training's; the
    # baseline's and DeepLab's default to the run config's pipeline: cam and segment.config
    icd_config: str = os.path.join(EXPERIMENTS, "synthetic_demo.yaml")
    cam_config: Optional[str] = None
    pretrain_config: Optional[str] = os.path.join(EXPERIMENTS, "synthetic_pretrain.yaml")
    segment_config: Optional[str] = None
    # the flags below override the training configs (width and crop DeepLab's too)
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
    repeat: int = 1                     # training seeds (icd-run's --repeat): CAM, ICD, DeepLab

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


def _given(**values) -> Dict:
    return {k: v for k, v in values.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# The data's folders

def _list(settings: DemoSettings, split: str) -> str:
    return settings.folder("data", "ImageSets", "Segmentation", f"{split}.txt")


def class_list(settings: DemoSettings) -> str:
    """The data's class-list file (written by the data step; the mask ids 1..C follow it)."""
    return settings.folder("data", "classes.txt")


def results_dir(settings: DemoSettings, model: str, split: str) -> str:
    """icd-run's results folder of one model and split (one training seed: the run folder's)."""
    return settings.folder(f"results_{model}", split)


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


# ---------------------------------------------------------------------------------------------
# Configurations: icd-run's on the demo's data, and the pre-training's

def _devices(settings: DemoSettings) -> Dict:
    """The devices and the precision of every training and inference."""
    devices = dict(gpus=settings.gpus, cpus=0) if settings.gpus else dict(cpus=settings.cpus,
                                                                             gpus="")
    return dict(devices, amp=settings.amp)


def paper_settings(settings: DemoSettings) -> PaperSettings:
    """icd-run on the run config, its paths set to the demo's data (which must exist: the class
    list and the inference size are the data's) and its sizes to the demo's flags."""
    if not os.path.isfile(class_list(settings)):
        raise RuntimeError(f"{class_list(settings)}: no data; run the demo's data step first "
                           f"(--steps data ...)")
    data, size = settings.folder("data"), demo_infer_size(settings)
    lists = {split: _list(settings, split) for split in SPLITS}
    train = _given(image_root=os.path.join(data, "JPEGImages"),
                   annotation_root=os.path.join(data, "Annotations"), data_list=lists["train"],
                   classes=class_list(settings), infer_size=size, width=settings.width,
                   image_size=settings.crop, batch_size=settings.batch_size,
                   learning_rate=settings.learning_rate, num_epoch=settings.epochs,
                   pretrained=stand_in_weights(settings) if settings.pretrain_config else None)
    segment = _given(config=settings.segment_config, list=lists["val"], infer_size=size,
                     width=settings.width, image_size=settings.crop,
                     num_epoch=settings.segment_epochs)
    sets = {"train": train, "segment": segment,
            "run": _given(cam=settings.cam_config, splits=lists,
                          gt_root=os.path.join(data, "SegmentationClass")),
            "evaluate": {"thresholds": [float(t) for t in settings.thresholds]}}
    return PaperSettings(settings.icd_config, settings.out, sets=sets,
                         devices=dict(_devices(settings), num_workers=settings.loader_workers),
                         repeat=settings.repeat, workers=settings.workers)


def pretrain_config(settings: DemoSettings) -> Config:
    """The stand-in's training: the pretrain YAML on the demo's train split, its size flags."""
    data = settings.folder("data")
    return load_config(settings.pretrain_config, image_root=os.path.join(data, "JPEGImages"),
                       annotation_root=os.path.join(data, "Annotations"),
                       superpixel_root=settings.folder("superpixels"),
                       data_list=_list(settings, "train"), classes=class_list(settings),
                       snapshot=settings.folder("snapshot_pretrain"),
                       **_given(width=settings.width, image_size=settings.crop,
                                batch_size=settings.batch_size,
                                learning_rate=settings.learning_rate,
                                num_epoch=settings.pretrain_epochs,
                                num_workers=settings.loader_workers),
                       **_devices(settings))


def stand_in_weights(settings: DemoSettings) -> str:
    """The pre-trained stand-in in the shape of `vgg16_20M.params` (backbone, fc6, fc7 only)."""
    return settings.folder("snapshot_pretrain", "vgg16_stand_in.params")


# ---------------------------------------------------------------------------------------------
# The ImageNet stand-in: the pre-trained classifier as a `vgg16_20M.params` file

BN_EPSILON = 1e-5   # Gluon BatchNorm's default


def fold_batch_norm(values: Dict[str, mx.nd.NDArray]) -> Dict[str, mx.nd.NDArray]:
    """A `vgg16_bn_cam` checkpoint as the plain VGG16 that computes the same in inference mode.

    Each `convB_I` followed by BatchNorm `convB_I_bn` (moving statistics m, v; gamma, beta)
    becomes one convolution: W' = W s, b' = (b - m) s + beta per output channel, with
    s = gamma / sqrt(v + eps). The BatchNorm keys are dropped; other keys pass unchanged.
    """
    out = {k: v for k, v in values.items() if not BACKBONE_BN.match(k[4:])}
    for key in values:
        if not (key.startswith("arg:") and BACKBONE_BN.match(key[4:]) and key.endswith("_gamma")):
            continue
        conv = key[4:-len("_bn_gamma")]
        bn = {part: values[f"{kind}:{conv}_bn_{part}"] for kind, part in (
            ("arg", "gamma"), ("arg", "beta"), ("aux", "moving_mean"), ("aux", "moving_var"))}
        scale = bn["gamma"] / mx.nd.sqrt(bn["moving_var"] + BN_EPSILON)
        weight = values[f"arg:{conv}_weight"]
        out[f"arg:{conv}_weight"] = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        out[f"arg:{conv}_bias"] = (values[f"arg:{conv}_bias"] - bn["moving_mean"]) * scale \
            + bn["beta"]
    return out


def write_imagenet_part(source: str, path: str) -> None:
    """Keep only the `vgg16_20M.params` part of checkpoint `source` (its backbone BatchNorms
    folded into the convolutions, `fold_batch_norm`) and write it to `path`."""
    values = {k: v for k, v in fold_batch_norm(read_params(source)).items()
              if is_imagenet_key(k)}
    with atomic_path(path) as tmp:
        mx.nd.save(tmp, values)


# ---------------------------------------------------------------------------------------------
# The demo's own steps: step_<name>(settings, run) -> a JSON-able summary kept in its marker

def step_data(settings: DemoSettings, run: Run) -> Dict:
    names = make_synthetic_voc(settings.folder("data"), num_train=settings.num_train,
                               num_val=settings.num_val, size=settings.size,
                               seed=settings.data_seed)
    return {split: len(v) for split, v in names.items()}


def step_pretrain(settings: DemoSettings, run: Run) -> Dict:
    if settings.pretrain_config is None:
        return {"skipped": "no pretrain config: CAM and ICD start from a random He init"}
    checkpoint = train_to_the_end(pretrain_config(settings))
    # like the release's ImageNet file: no classifier, so fc8 starts as a new layer (weight
    # N(0, 0.01), bias 0: checkpoint.new_parameter)
    write_imagenet_part(checkpoint, stand_in_weights(settings))
    return dict(checkpoint=checkpoint, stand_in=stand_in_weights(settings))


def report_inputs(settings: DemoSettings, s: PaperSettings) -> ReportInputs:
    """The report's view of this demo: its folders and the settings actually used."""
    seed = s.seeds[0]
    trainings = {"cam": s.cam, "icd": s.icd}
    config_files = {w: s.config_file(w) for w in COMPARED}
    if settings.pretrain_config is not None:
        trainings = {"pretrain": pretrain_config(settings), **trainings}
        config_files = {"pretrain": settings.pretrain_config, **config_files}
    return ReportInputs(
        out=settings.out, data=settings.folder("data"),
        classes=read_classes(class_list(settings)),
        lists={split: _list(settings, split) for split in SPLITS},
        results={m: {split: s.results(seed, m, split) for split in SPLITS} for m in COMPARED},
        trainings=trainings, config_files=config_files,
        dataset=dict(num_train=settings.num_train, num_val=settings.num_val,
                     size=settings.size, seed=settings.data_seed),
        infer_size=s.icd.infer_size, workers=settings.workers,
        segmentation={SEGMENTATION_LABELS[label]: [(s.segmentation_dirs(k, label)[1],
                                                    s.segmentation(k, label)) for k in s.seeds]
                      for label in RANKING if label in s.pipeline.segment.labels})


def step_report(settings: DemoSettings, s: PaperSettings, run: Run) -> Dict:
    return {"report": write_report(report_inputs(settings, s), run)}


# ---------------------------------------------------------------------------------------------
# The steps in order

def data_step(settings: DemoSettings) -> Step:
    return Step("data", functools.partial(step_data, settings), folders=(settings.folder("data"),),
                settings=dict(num_train=settings.num_train, num_val=settings.num_val,
                              size=settings.size, seed=settings.data_seed),
                estimate=ESTIMATES["quick" if settings.quick else "full"]["data"])


def demo_steps(settings: DemoSettings) -> List[Step]:
    """The demo as pipeline steps: data, icd-run's steps (superpixels reading the data, the
    trainings the stand-in; with `repeat` N every training seed's train_icd ... segment) with
    pretrain among them, and the report (rerun every time). The data must exist
    (`paper_settings`)."""
    s = paper_settings(settings)
    paper = [step for step in paper_steps(s) if base_name(step.name) in STEPS]
    pretrained = settings.pretrain_config is not None
    pretrain = Step("pretrain", functools.partial(step_pretrain, settings),
                    inputs=("superpixels",), folders=(settings.folder("snapshot_pretrain"),),
                    settings=dict(training_settings(pretrain_config(settings)),
                                  export="backbone, fc6, fc7") if pretrained
                    else dict(skipped=True))
    report = Step("report", functools.partial(step_report, settings, s),
                  inputs=tuple(st.name for st in paper
                               if base_name(st.name) in ("evaluate", "segment")),
                  folders=(settings.folder("report"),), always=True)
    extra = {"superpixels": ("data",), "train_icd": ("pretrain",) if pretrained else (),
             "train_cam": ("pretrain",) if pretrained else ()}
    estimates = ESTIMATES["quick" if settings.quick else "full"]
    steps = [data_step(settings)]
    for step in paper[:1] + [pretrain] + paper[1:] + [report]:
        base = base_name(step.name)
        steps.append(dataclasses.replace(step, inputs=step.inputs + extra.get(base, ()),
                                         estimate=estimates[base]))
    return steps


def base_name(step: str) -> str:
    """The step's name without its training seed (icd-run's `train_icd.s1` -> `train_icd`)."""
    return step.split(".")[0]


def run(settings: DemoSettings) -> Dict[str, Dict]:
    """Run the selected steps in order; returns {step: {"action", "seconds", ...}}. The data
    step runs on its own first: the other steps' settings read the data it makes."""
    summary: Dict[str, Dict] = {}
    options = dict(overwrite=settings.overwrite, progress_every=settings.progress_every)
    if "data" in settings.steps:
        summary.update(Run([data_step(settings)], settings.folder("steps"), selected=["data"],
                           **options).execute())
    rest = [name for name in settings.steps if name != "data"]
    if rest:
        steps = demo_steps(settings)
        selected = [st.name for st in steps if base_name(st.name) in rest]
        summary.update(Run(steps, settings.folder("steps"), selected=selected,
                           **options).execute())
    return summary
