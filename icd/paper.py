"""The paper's whole pipeline on a real dataset as resumable steps (`icd-run`, issue #23):

    superpixels -> train_icd, train_cam -> infer -> seeds -> evaluate -> segment -> tables

One config gives everything: a training YAML (the Config of ICD: data paths, classes, model,
devices) with a `pipeline:` section for the other stages, e.g. experiments/voc_vgg16.yaml:

    pipeline:
      cam: voc_vgg16_cam.yaml            # the CAM-only baseline's YAML, or a mapping of keys
                                         # over this config ({model: vgg16_cam}); null: none
      gt_root: ./data/VOC2012/SegmentationClassAug
      splits: {train: ./data/VOC2012/ImageSets/Segmentation/train_aug.txt}
      superpixels: {features: pretrained}          # or colour
      seeds: {rows: [bu, bu_sp, nocrf, crf]}       # Table 3 rows made (crf: what DeepLab uses)
      evaluate: {list: null, thresholds: [...]}   # list: evaluate a subset of the split
      segment: {config: deeplab_largefov_vgg16.yaml, list: ./data/.../val.txt}
                                         # labels: [icd, cam, gt] also trains DeepLab on the
                                         # baseline's seeds + CRF and on gt_root's masks

`--set stage.key=value` overrides a key of a stage (`train.learning_rate=1e-3` a training
field of ICD and the baseline, `icd.*` / `cam.*` one of them; `seeds.rows=[crf]`; `segment.*`
also the DeepLab config's fields, `segment.num_epoch=10`; `run.gt_root=DIR`, `run.repeat=3`).
Folders under the run folder `--out`:

    superpixels/  snapshot_icd/  snapshot_cam/  results_{icd,cam}/<split>/{scores_*,seeds,eval}
    snapshot_segment/  segmentation/pred, eval.json  tables/tables.{md,json}  steps/<step>.json
    (several segment.labels: snapshot_segment_<label>/ and segmentation/<label>/ each)

`repeat` N > 1 trains N training seeds (seed, seed + 1, ...): the steps after superpixels run
per seed into seed<k>/ (step names `<step>.s<k>`), and a `compare` step bootstraps ICD against
the baseline over the seeds and the images (icd.stats.compare_runs).

Every step is an icd.pipeline step: skipped when done with the same settings and inputs, rerun
with what follows when they change, resumed when interrupted (training from its last complete
checkpoint of the same run, `resume_auto`; per-image steps skip finished files).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from .runs import checkpoint_path
from .config import (FIELDS, Config, find_config, load_config, read_config_sources,
                     read_yaml_chain)
from .features import superpixels_on_devices
from .data.dataset import DataPaths
from .data.voc import read_list
from .amp import unsupported_reason
from .devices import parse_devices
from .evaluate import THRESHOLDS, EvalSettings, evaluate, image_confusions
from .metrics import percent
from .infer import infer
from .io import atomic_path, read_json, write_json
from .model import MODELS
from .pipeline import Run, Step
from .segment import AUTOTUNE, evaluate_predictions, infer_segmentation
from .seeds import SeedSettings, make_seeds
from .stats import compare_runs
from .runs import resume_auto
from .tasks import train

log = logging.getLogger(__name__)

BASE_STEPS = ("superpixels", "train_icd", "train_cam", "infer", "seeds", "evaluate", "segment",
              "tables", "compare")
ALIASES = {"train": ("train_icd", "train_cam")}
# Table 3 rows: name -> (ICD score folder, CRF, seed folder under seeds/) as the demo's report
SEED_ROWS = {"bu": ("scores_icd_bu", False, "nocrf_icd_bu"),
             "bu_sp": ("scores_icd_bu_sp", False, "nocrf_icd_bu_sp"),
             "nocrf": ("scores_icd", False, "nocrf"),
             "crf": ("scores_icd", True, "crf")}
ROW_NAMES = {"bu": "bottom-up (S)", "bu_sp": "+ superpixel refinement (S')",
             "nocrf": "+ top-down (S'')", "crf": "+ CRF"}
CAM_ROWS = {"nocrf": ("nocrf_cam", False), "crf": ("crf_cam", True)}
# What DeepLab trains on (segment.labels): the ICD seeds of row segment.seeds, the CAM
# baseline's seeds + CRF, or gt_root's masks (the fully-supervised upper bound; Tables 7-8)
SEGMENT_LABELS = {"icd": "ICD seeds", "cam": "CAM-baseline seeds + CRF",
                  "gt": "ground-truth masks (upper bound)"}
# The keys of each stage's part of the pipeline: section and their defaults.
STAGES: Dict[str, Dict[str, Any]] = {
    "superpixels": {"features": "pretrained"},
    "infer": {},
    "seeds": {"rows": ["bu", "bu_sp", "nocrf", "crf"], "saliency_root": None},
    "evaluate": {"list": None, "thresholds": list(THRESHOLDS)},
    "segment": {"config": None, "list": None, "gt_root": None, "seeds": "crf",
                "labels": ["icd"]},
    "tables": {},
}
TOP_KEYS = {"cam": None, "gt_root": None, "splits": None, "repeat": 1}
SET_STAGES = ("train", "icd", "cam", "run")    # --set stages besides STAGES' (run: TOP_KEYS)
FEATURE_SOURCES = ("pretrained", "colour")     # superpixels.features
# The flag of icd-run that gives each device setting (PaperSettings.devices)
DEVICE_FLAGS = {"gpus": "--gpus", "cpus": "--cpus", "kvstore": "--kvstore",
                "num_workers": "--loader-workers", "amp": "--amp"}
# What the CAM baseline takes from the ICD config: its data, classes and inference size
INHERITED = ("image_root", "annotation_root", "data_list", "classes", "num_cls", "pretrained",
             "infer_size")
# Config fields a training step's fingerprint holds: not devices, processes, bookkeeping or
# inference-only ones (whether a checkpoint may be resumed is icd.runs.resume_changes').
RUN_FIELDS = ("image_root", "annotation_root", "superpixel_root", "data_list", "classes", "model",
              "pretrained", "num_cls", "width", "dropout", "bottom_up_features", "bottom_up_loss",
              "top_down", "optimizer", "image_size", "batch_size", "learning_rate", "momentum",
              "wd", "num_epoch", "warmup_epochs", "seed", "label_root", "amp")
# Expected seconds per step before a finished run's markers give real times (rough, per image
# on 2 CPU cores at width 1/8; only the first run's ETA depends on them).
ESTIMATES = dict(superpixels=5, train_icd=60, train_cam=40, infer=10, seeds=20, evaluate=20,
                 segment=60, tables=5, compare=5)


# ---------------------------------------------------------------------------------------------
# Auto-resume (icd-train --resume auto, every training step of icd-run)

def _plain(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(list(value) if isinstance(value, tuple) else value))


def train_to_the_end(cfg: Config) -> str:
    """Train `cfg` to num_epoch, continuing its run (`resume_auto`); the final checkpoint."""
    cfg = resume_auto(cfg)
    if cfg.begin_epoch < cfg.num_epoch:
        train(dataclasses.replace(cfg, overwrite=cfg.overwrite and cfg.begin_epoch == 0))
    else:
        log.info("%s: the final checkpoint exists", cfg.snapshot)
    return checkpoint_path(cfg, cfg.num_epoch - 1)


# ---------------------------------------------------------------------------------------------
# The pipeline config

def read_pipeline(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(the `pipeline:` mapping of a YAML file over those of its `base:` chain, merged per
    stage; {"key" or "stage.key": the file that gave it}), read by icd.config.read_yaml_chain."""
    section: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for file, loaded in read_yaml_chain(path):
        own = loaded.get("pipeline") or {}
        if not isinstance(own, dict):
            raise ValueError(f"{file}: pipeline: expected a mapping of stage: settings")
        for key, value in own.items():
            if isinstance(value, dict) and isinstance(section.get(key), dict):
                section[key] = {**section[key], **value}
            else:
                section[key] = value
            sources[key] = file
            sources.update({f"{key}.{sub}": file for sub in
                            (value if isinstance(value, dict) else ())})
    return section, sources


def read_pipeline_section(path: str) -> Dict[str, Any]:
    """The `pipeline:` mapping of a YAML file, over that of its `base:` file (per stage)."""
    return read_pipeline(path)[0]


def parse_sets(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """`--set stage.key=value` items -> {stage: {key: value}} (values read as YAML)."""
    sets: Dict[str, Dict[str, Any]] = {}
    for item in items:
        name, eq, text = item.partition("=")
        stage, dot, key = name.partition(".")
        if not eq or not dot or not key:
            raise ValueError(f"--set: expected stage.key=value, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"--set: {item!r}: not a YAML value") from None
        sets.setdefault(stage, {})[key.replace("-", "_")] = value
    return sets


@dataclass
class PaperSettings:
    """A run of the paper's pipeline: the config file, the run folder and the overrides."""
    config: str
    out: str
    sets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    devices: Mapping[str, Any] = field(default_factory=dict)   # gpus/cpus/kvstore/num_workers/amp
    repeat: Optional[int] = None
    workers: int = 1                   # superpixel, seed and evaluation processes
    shard: Tuple[int, int] = (0, 1)    # per-image steps only (several machines)

    def __post_init__(self):
        self.config = find_config(self.config)
        section, self.sources = read_pipeline(self.config)
        for key in section:
            if key not in STAGES and key not in TOP_KEYS:
                raise ValueError(f"{self.where(key)}: unknown key; known: "
                                 f"{', '.join(sorted(set(STAGES) | set(TOP_KEYS)))}")
        for stage in STAGES:
            if not isinstance(section.get(stage) or {}, dict):
                raise ValueError(f"{self.where(stage)}: expected a mapping of key: value, got "
                                 f"{section[stage]!r}")
            for key in section.get(stage) or {}:
                if key not in self.stage_keys(stage):
                    raise ValueError(f"{self.where(f'{stage}.{key}')}: unknown key; known: "
                                     f"{', '.join(sorted(self.stage_keys(stage)))}")
        for stage, values in self.sets.items():
            if stage not in SET_STAGES and stage not in STAGES:
                raise ValueError(f"--set: unknown stage {stage!r}; one of "
                                 f"{', '.join(sorted(set(STAGES) | set(SET_STAGES)))}")
            known = FIELDS if stage in ("train", "icd", "cam") else \
                TOP_KEYS if stage == "run" else self.stage_keys(stage)
            bad = set(values) - set(known)
            if bad:
                raise ValueError(f"--set: {stage}: unknown keys {sorted(bad)}")
        self.section = section
        self.stage = {name: {**defaults, **(section.get(name) or {}),
                             **dict(self.sets.get(name, {}))}
                      for name, defaults in STAGES.items()}
        self.top = {**TOP_KEYS, **{k: section[k] for k in TOP_KEYS if k in section},
                    **dict(self.sets.get("run", {}))}
        if self.repeat is not None:
            self.top["repeat"] = self.repeat
        self.check_values()
        self.base_seed = load_config(self.config, labels=self.labels("icd"),
                                     **self.overrides("icd")).seed
        self.icd = self.training("icd")
        self.cam = self.training("cam") if self.top["cam"] else None
        self.gt_root = self.top["gt_root"]
        self.splits = dict(self.top["splits"] or {"train": self.icd.data_list})
        labels = self.stage["segment"]["labels"]
        if "cam" in labels and (self.cam is None or "crf" not in self.stage["seeds"]["rows"]):
            raise ValueError(f"{self.where('segment.labels')}: cam needs the baseline (cam:) "
                             f"and the crf seeds, got {labels!r}")
        for which, cfg in (("icd", self.icd), ("cam", self.cam)):
            if cfg is not None:
                self.check_training(cfg, self.config_file(which), self.labels(which))
        for label in labels if self.stage["segment"]["config"] else ():
            self.check_training(self.segmentation(self.seeds[0], label),
                                self.segment_config_file(), self.segment_labels())

    # checks ------------------------------------------------------------------------------

    @staticmethod
    def stage_keys(stage: str) -> Dict[str, Any]:
        """The keys of a stage's part of the pipeline: section (segment: the DeepLab fields
        too)."""
        return {**STAGES[stage], **FIELDS} if stage == "segment" else STAGES[stage]

    def where(self, name: str) -> str:
        """Where a pipeline setting (`gt_root`, `seeds.rows`) was given: `--set stage.key`,
        `--repeat`, or `<file>: pipeline: stage: key`."""
        stage, _, key = name.rpartition(".")
        if key in self.sets.get(stage or "run", {}):
            return f"--set {stage or 'run'}.{key}"
        if stage in TOP_KEYS and stage in self.sets.get("run", {}):
            return f"--set run.{stage}"
        if name == "repeat" and self.repeat is not None:
            return "--repeat"
        file = self.sources.get(name) or self.sources.get(stage) or self.config
        return f"{file}: pipeline: {': '.join(name.split('.'))}"

    def check_values(self) -> None:
        """Every pipeline setting's type and choices, each error naming its file and key."""
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                stage, _, key = name.rpartition(".")
                value = (self.stage[stage] if stage else self.top)[key]
                raise ValueError(f"{self.where(name)}: expected {expected}, got {value!r}")

        def path(value) -> bool:
            return value is None or (isinstance(value, str) and value != "")

        top, stage = self.top, self.stage
        check("cam", top["cam"] is None or path(top["cam"]) or (
            isinstance(top["cam"], dict) and set(top["cam"]) <= set(FIELDS)),
            "a YAML file, a mapping of training options or null")
        check("gt_root", path(top["gt_root"]), "a folder")
        check("splits", top["splits"] is None or (isinstance(top["splits"], dict) and
              top["splits"] and all(path(v) and v for v in top["splits"].values())),
              "a mapping of split: list file")
        check("repeat", isinstance(top["repeat"], int) and not isinstance(top["repeat"], bool)
              and top["repeat"] >= 1, "a positive integer")
        check("superpixels.features", str(stage["superpixels"]["features"]) in FEATURE_SOURCES,
              " or ".join(FEATURE_SOURCES))
        rows = stage["seeds"]["rows"]
        check("seeds.rows", isinstance(rows, list) and rows and
              all(r in SEED_ROWS for r in map(str, rows)),
              f"a list of {', '.join(SEED_ROWS)}")
        check("seeds.saliency_root", path(stage["seeds"]["saliency_root"]), "a folder")
        check("evaluate.list", path(stage["evaluate"]["list"]), "a list file")
        thresholds = stage["evaluate"]["thresholds"]
        check("evaluate.thresholds", isinstance(thresholds, list) and thresholds and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1
            for t in thresholds), "a list of numbers in [0, 1]")
        for key in ("config", "list", "gt_root"):
            check(f"segment.{key}", path(stage["segment"][key]), "a file or folder")
        check("segment.seeds", str(stage["segment"]["seeds"]) in SEED_ROWS,
              f"one of {', '.join(SEED_ROWS)}")
        labels = stage["segment"]["labels"]
        check("segment.labels", isinstance(labels, list) and labels and
              all(label in SEGMENT_LABELS for label in map(str, labels)),
              f"a list of {', '.join(SEGMENT_LABELS)}")

    @staticmethod
    def check_training(cfg: Config, path: str, labels: Mapping[str, str]) -> None:
        """The model a registered one and the precision one the devices run, before any step
        (errors name the flag or the file and key that gave it)."""
        given = read_config_sources(path)[1]

        def where(name: str) -> str:
            return labels.get(name) or f"{given.get(name, path)}: {name}"

        if cfg.model not in MODELS:
            raise ValueError(f"{where('model')}: must be one of {', '.join(MODELS)}, got "
                             f"{cfg.model!r}")
        reason = unsupported_reason(cfg.amp, parse_devices(cfg.gpus, cfg.cpus))
        if reason:
            raise ValueError(f"{where('amp')}: {cfg.amp} cannot run on these devices: {reason}")

    def inputs(self, steps: Sequence[str]) -> Dict[str, str]:
        """{path: the setting that gave it} of the files and folders the `steps` (base names)
        read."""
        needed: Dict[str, str] = {self.config: "--config"}
        given = read_config_sources(self.config)[1]
        labels = self.labels("icd")

        def field(name: str) -> None:
            value = getattr(self.icd, name)
            if value:
                needed.setdefault(value, labels.get(name) or
                                  f"{given.get(name, self.config)}: {name}")

        def setting(name: str, value: Optional[str]) -> None:
            if value:
                needed.setdefault(value, self.where(name))

        bases = set(steps)
        field("classes")
        if bases & {"superpixels", "train_icd", "train_cam", "infer", "seeds"}:
            field("image_root")
            field("data_list")
            for split, data_list in self.splits.items():
                setting(f"splits.{split}", data_list)
        if bases & {"train_icd", "train_cam", "seeds", "evaluate"}:
            field("annotation_root")
        if bases & {"train_icd", "train_cam"} or (
                "superpixels" in bases and self.stage["superpixels"]["features"] == "pretrained"):
            field("pretrained")
        if "seeds" in bases:
            setting("seeds.saliency_root", self.stage["seeds"]["saliency_root"])
        if bases & {"evaluate", "segment", "tables", "compare"}:
            setting("gt_root", self.gt_root)
            setting("evaluate.list", self.stage["evaluate"]["list"])
        if "segment" in bases and self.stage["segment"]["config"]:
            for key in ("list", "gt_root"):
                setting(f"segment.{key}", self.stage["segment"][key])
        return needed

    def check_paths(self, steps: Sequence[str]) -> None:
        """The files and folders the selected `steps` (base names) read exist, before the
        first step; a missing one is an error naming the setting that gave it."""
        if set(steps) & {"evaluate", "segment", "tables", "compare"} and not self.gt_root:
            raise ValueError(f"{self.config}: pipeline: gt_root: the ground-truth folder is "
                             f"needed to evaluate (or leave the evaluate step out with --steps)")
        for path, where in self.inputs(steps).items():
            if not os.path.exists(path):
                raise FileNotFoundError(f"{where}: {path}: not found")

    def check_out(self, steps: Sequence[Step]) -> None:
        """`--out` is refused where the run would write over one of its inputs: a file, or a
        folder holding an input in a folder that a step writes (docs: README, When something
        goes wrong)."""
        if os.path.isfile(self.out):
            raise ValueError(f"--out {self.out}: is a file; the run folder must be a folder of "
                             f"its own")
        written = {st.name: st.folders for st in steps}
        written["the step runner"] = (self.folder("steps"),)
        for path, where in self.inputs(BASE_STEPS).items():
            real = os.path.realpath(path)
            for name, folders in written.items():
                for folder in map(os.path.realpath, folders):
                    if real == folder or real.startswith(folder + os.sep):
                        raise ValueError(
                            f"--out {self.out}: {where} {path} lies in {folder}, which "
                            f"{'' if ' ' in name else 'step '}{name} writes; choose another "
                            f"--out")

    # configs -----------------------------------------------------------------------------

    @property
    def seeds(self) -> List[int]:
        """The training seeds: cfg.seed, cfg.seed + 1, ... (`repeat` of them)."""
        return [self.base_seed + k for k in range(int(self.top["repeat"]))]

    def root(self, seed: int) -> str:
        """The folder of one training seed's steps (the run folder when repeat is 1)."""
        return self.out if len(self.seeds) == 1 else os.path.join(self.out, f"seed{seed}")

    def config_file(self, which: str) -> str:
        """The YAML file of "icd" or "cam" (the run config when `cam:` is a mapping)."""
        cam = self.top["cam"]
        if which == "icd" or isinstance(cam, dict):
            return self.config
        return self.beside_config(cam, "cam")

    def beside_config(self, name: str, setting: str) -> str:
        """The YAML `name` (relative to the run config, or a shipped one) that the pipeline
        setting `setting` names; not found: an error naming the setting."""
        try:
            return find_config(os.path.join(os.path.dirname(self.config), name))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.where(setting)}: {e}") from None

    def overrides(self, which: str) -> Dict[str, Any]:
        """The options over the YAML of "icd" or "cam": the ICD config's data paths (the
        baseline's too), `cam:`'s keys, `--set train.*` and `--set <which>.*`, the devices."""
        cam = self.top["cam"]
        overrides = {**dict(self.sets.get("train", {})), **dict(self.sets.get(which, {})),
                     **{k: v for k, v in self.devices.items() if v is not None}}
        if which == "cam":
            # the baseline: its own YAML (or the ICD config with `cam:`'s keys) on ICD's data
            overrides = {**{k: getattr(self.icd, k) for k in INHERITED},
                         **(cam if isinstance(cam, dict) else {}), **overrides}
        return overrides

    def labels(self, which: str) -> Dict[str, str]:
        """Where each of `overrides(which)` was given, for its errors (load_config's labels)."""
        cam = self.top["cam"]
        labels = {k: f"{self.config}: {k}" for k in INHERITED} if which == "cam" else {}
        labels.update({k: f"{self.where('cam')}: {k}" for k in
                       (cam if which == "cam" and isinstance(cam, dict) else ())})
        labels.update({k: f"--set train.{k}" for k in self.sets.get("train", {})})
        labels.update({k: f"--set {which}.{k}" for k in self.sets.get(which, {})})
        labels.update({k: DEVICE_FLAGS.get(k, "--" + k) for k, v in self.devices.items()
                       if v is not None})
        return labels

    def training(self, which: str, seed: Optional[int] = None) -> Config:
        """Config of "icd" or "cam": its YAML with `overrides(which)`, the run's folders."""
        cfg = load_config(self.config_file(which), labels=self.labels(which),
                          **self.overrides(which))
        seed = cfg.seed if seed is None else seed
        return dataclasses.replace(cfg, seed=seed, superpixel_root=self.folder("superpixels"),
                                   snapshot=os.path.join(self.root(seed), f"snapshot_{which}"))

    def segment_config_file(self) -> str:
        return self.beside_config(self.stage["segment"]["config"], "segment.config")

    def segment_labels(self) -> Dict[str, str]:
        """Where the DeepLab options given by the segment: stage and the devices were given."""
        return {**{k: self.where(f"segment.{k}") for k in self.stage["segment"] if k in FIELDS},
                **{k: DEVICE_FLAGS.get(k, "--" + k) for k, v in self.devices.items()
                   if v is not None}}

    def segmentation(self, seed: int, label: str = "icd") -> Optional[Config]:
        """The DeepLab config (None without `segment.config`) trained on `label`
        (SEGMENT_LABELS) of the first split, from the ICD model's ImageNet file, on the same
        devices."""
        stage = self.stage["segment"]
        if not stage["config"]:
            return None
        icd = self.training("icd", seed)
        seeds = {"icd": ("icd", SEED_ROWS[stage["seeds"]][2]), "cam": ("cam", CAM_ROWS["crf"][0])}
        labels = os.path.join(self.results(seed, seeds[label][0], self.first_split), "seeds",
                              seeds[label][1]) if label in seeds else self.gt_root
        return load_config(self.segment_config_file(), labels=self.segment_labels(),
                           image_root=icd.image_root, annotation_root=icd.annotation_root,
                           data_list=icd.data_list, classes=icd.classes,
                           num_cls=icd.num_cls, label_root=labels,
                           pretrained=icd.pretrained, seed=seed,
                           snapshot=self.segmentation_dirs(seed, label)[0],
                           **{**{k: v for k, v in stage.items() if k in FIELDS},
                              **{k: v for k, v in self.devices.items() if v is not None}})

    def segmentation_dirs(self, seed: int, label: str) -> Tuple[str, str]:
        """(snapshot, predictions) folders of the DeepLab on `label`: snapshot_segment/ and
        segmentation/, or snapshot_segment_<label>/ and segmentation/<label>/ with several."""
        if len(self.stage["segment"]["labels"]) == 1:
            return (os.path.join(self.root(seed), "snapshot_segment"),
                    os.path.join(self.root(seed), "segmentation"))
        return (os.path.join(self.root(seed), f"snapshot_segment_{label}"),
                os.path.join(self.root(seed), "segmentation", label))

    @property
    def first_split(self) -> str:
        return next(iter(self.splits))

    @property
    def models(self) -> List[str]:
        return ["icd"] + (["cam"] if self.cam is not None else [])

    def folder(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def results(self, seed: int, model: str, split: str) -> str:
        return os.path.join(self.root(seed), f"results_{model}", split)

    def eval_list(self, split: str) -> str:
        """The list the seeds of `split` are evaluated on (evaluate.list for the first split:
        the paper's 1,464 train images of the 10,582 of train_aug)."""
        chosen = self.stage["evaluate"]["list"]
        return chosen if chosen and split == self.first_split else self.splits[split]


# ---------------------------------------------------------------------------------------------
# Steps: step_<name>(settings, seed, run) -> a JSON-able summary kept in the step's marker

def step_superpixels(s: PaperSettings, seed: int, run: Run) -> Dict:
    features = s.stage["superpixels"]["features"]
    pretrained = s.icd.pretrained if features == "pretrained" else None
    if features == "pretrained" and not pretrained:
        raise ValueError(f"{s.config}: superpixels.features pretrained needs the config's "
                         f"`pretrained:` file (or --set superpixels.features=colour)")
    devices = [str(ctx) for ctx in parse_devices(s.icd.gpus, s.icd.cpus)]
    written = 0
    for data_list in superpixel_lists(s):
        written += len(superpixels_on_devices(s.icd.image_root, data_list,
                                              s.folder("superpixels"), pretrained, devices,
                                              s.workers, shard=s.shard))
    return {"written": written}


def superpixel_lists(s: PaperSettings) -> List[str]:
    """The lists whose images need superpixels: training's, then every split's (inference
    refines the bottom-up scores by them, S' of Table 3)."""
    return list(dict.fromkeys([s.icd.data_list, *s.splits.values()]))


def step_train(which: str, s: PaperSettings, seed: int, run: Run) -> Dict:
    return {"checkpoint": train_to_the_end(s.training(which, seed))}


def step_infer(s: PaperSettings, seed: int, run: Run) -> Dict:
    counts = {}
    for model in s.models:
        cfg = s.training(model, seed)
        contexts = parse_devices(cfg.gpus, cfg.cpus)
        final = checkpoint_path(cfg, cfg.num_epoch - 1)
        for split, data_list in s.splits.items():
            counts[f"{model}/{split}"] = len(infer(
                dataclasses.replace(cfg, data_list=data_list), final,
                s.results(seed, model, split), contexts, s.shard))
    return {"images": counts}


def step_seeds(s: PaperSettings, seed: int, run: Run) -> Dict:
    icd = s.icd
    saliency = SeedSettings(saliency_root=s.stage["seeds"]["saliency_root"])
    common = dict(workers=s.workers, shard=s.shard)
    written = {}
    for split, data_list in s.splits.items():
        data = DataPaths(icd.image_root, icd.annotation_root, data_list, icd.class_names)
        results = s.results(seed, "icd", split)
        for row in s.stage["seeds"]["rows"]:
            scores, crf, folder = SEED_ROWS[row]
            written[f"icd/{split}/{folder}"] = make_seeds(
                results, data, dataclasses.replace(saliency, crf=crf, icd_folder=scores),
                out_dir=os.path.join(results, "seeds", folder), **common)["written"]
        if s.cam is not None:
            results = s.results(seed, "cam", split)
            for row in ("nocrf", "crf"):
                if row in s.stage["seeds"]["rows"]:
                    folder, crf = CAM_ROWS[row]
                    written[f"cam/{split}/{folder}"] = make_seeds(
                        results, data, dataclasses.replace(
                            saliency, crf=crf, icd_folder="scores_cam", cam_folder="scores_cam"),
                        out_dir=os.path.join(results, "seeds", folder), **common)["written"]
    return {"written": written}


def _seed_dirs(s: PaperSettings, model: str) -> List[str]:
    rows = s.stage["seeds"]["rows"]
    if model == "icd":
        return [os.path.join("seeds", SEED_ROWS[r][2]) for r in rows]
    return [os.path.join("seeds", CAM_ROWS[r][0]) for r in ("nocrf", "crf") if r in rows]


def step_evaluate(s: PaperSettings, seed: int, run: Run) -> Dict:
    if not s.gt_root:
        raise ValueError(f"{s.config}: pipeline: gt_root: the ground-truth folder is needed to "
                         f"evaluate (or leave the evaluate step out with --steps)")
    summary = {}
    for split in s.splits:
        for model in s.models:
            report = evaluate(
                s.results(seed, model, split), s.gt_root,
                DataPaths(s.icd.image_root, s.icd.annotation_root, s.eval_list(split),
                          s.icd.class_names),
                EvalSettings(seed_dirs=_seed_dirs(s, model),
                             thresholds=tuple(float(t) for t in s.stage["evaluate"]["thresholds"]),
                             folders={"cam": "scores_cam",
                                      "icd": "scores_icd" if model == "icd" else "scores_cam"}),
                workers=s.workers)
            summary[f"{model}/{split}"] = {d: r["miou"] for d, r in report["seeds"].items()}
    return summary


def step_segment(s: PaperSettings, seed: int, run: Run) -> Dict:
    """DeepLab on each of segment.labels (Tables 7-8): trained, predicted on segment.list,
    evaluated; {"miou": {label: mIoU}}."""
    if s.segmentation(seed) is None:
        return {"skipped": "no segment.config"}
    stage = s.stage["segment"]
    data_list, gt_root = stage["list"], stage["gt_root"] or s.gt_root
    if not data_list or not gt_root:
        raise ValueError(f"{s.config}: pipeline: segment: needs `list` (the images to predict) "
                         f"and a gt_root")
    miou = {}
    for label in stage["labels"]:
        cfg = s.segmentation(seed, label)
        log.info("segmentation on the %s", SEGMENT_LABELS[label])
        final = train_to_the_end(cfg)
        out = s.segmentation_dirs(seed, label)[1]
        predict_segmentation(dataclasses.replace(cfg, data_list=data_list), final, out,
                             s.workers)
        miou[label] = evaluate_predictions(out, gt_root, data_list, cfg.model,
                                           workers=s.workers, classes=cfg.class_names)["miou"]
    return {"miou": miou}


def predict_segmentation(cfg: Config, params: str, out: str, workers: int) -> None:
    """icd-infer-seg's inference (icd.segment.infer_segmentation) in icd-run's process, which
    trains after it: cuDNN autotune is left as it was before (icd-infer-seg's process ends)."""
    autotune = os.environ.get(AUTOTUNE)
    try:
        infer_segmentation(cfg, params, out, parse_devices(cfg.gpus, cfg.cpus), workers)
    finally:
        if autotune is None:
            os.environ.pop(AUTOTUNE, None)


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def seed_comparison(s: PaperSettings, seeds: Sequence[int], split: str) -> Dict[str, object]:
    """ICD seeds + CRF against the baseline's (mIoU over all labels, the release's rule) on
    the evaluation list of `split`: `compare_runs` over `seeds` (one model each)."""
    names = read_list(s.eval_list(split))
    labels = list(range(len(s.icd.class_names) + 1))
    sides = [[image_confusions(os.path.join(s.results(k, model, split), "seeds", folder),
                               s.gt_root, names, s.workers, s.icd.class_names) for k in seeds]
             for model, folder in (("icd", "crf"), ("cam", "crf_cam"))]
    return compare_runs(sides[0], sides[1], labels)


def step_tables(s: PaperSettings, seed: int, run: Run) -> Dict:
    """tables/tables.md and tables.json: the paper's Tables 1, 2, 3 and 7/8 of this run (all
    labels, the release's rule) and ICD vs the baseline's seeds + CRF with its interval."""
    lines, numbers = [f"# Tables of `{s.config}` (training seed {seed})", ""], {}
    for split in s.splits:
        icd = read_json(os.path.join(s.results(seed, "icd", split), "eval", "eval.json"))
        cam = (read_json(os.path.join(s.results(seed, "cam", split), "eval", "eval.json"))
               if s.cam is not None else None)
        numbers[split] = {"icd": icd, "cam": cam}
        lines += [f"## Split {split} ({icd['num_images']} images)", "",
                  "### Table 1. Pixel-level mAP", ""]
        methods = [("CAM (head of the ICD model)", icd["pixel_ap"]["cam"]),
                   ("Ours (ICD)", icd["pixel_ap"]["icd"])]
        if cam is not None:
            methods.insert(0, ("CAM (CAM-only baseline)", cam["pixel_ap"]["cam"]))
        lines += _md_table(["Method", "mAP (%)"], [[m, percent(v["map"])] for m, v in methods])
        lines += ["### Table 2. Seed mIoU by threshold (no CRF)", ""]
        study = icd["threshold_study"]
        rows = [[t, percent(study["cam"][t]["miou"]), percent(study["icd"][t]["miou"])]
                + ([percent(cam["threshold_study"]["cam"][t]["miou"])] if cam else [])
                for t in study["icd"]]
        lines += _md_table(["T", "CAM head", "ICD"] + (["CAM baseline"] if cam else []), rows)
        lines += ["### Table 3. Components of ICD (seed mIoU)", ""]
        rows = [[ROW_NAMES[r], percent(icd["seeds"][os.path.join("seeds", SEED_ROWS[r][2])]
                                       ["miou"])] for r in s.stage["seeds"]["rows"]]
        if cam is not None:
            rows += [[f"CAM baseline{' + CRF' if crf else ''}",
                      percent(cam["seeds"][os.path.join("seeds", folder)]["miou"])]
                     for row, (folder, crf) in CAM_ROWS.items()
                     if os.path.join("seeds", folder) in cam["seeds"]]
        lines += _md_table(["Seeds", "mIoU (%)"], rows)
        if cam is not None and "crf" in s.stage["seeds"]["rows"]:
            test = seed_comparison(s, [seed], split)
            numbers[split]["icd_vs_cam"] = test
            lines += [f"ICD seeds + CRF vs CAM-baseline seeds + CRF: {percent(test['value'])} "
                      f"vs {percent(test['reference'])}, difference "
                      f"{percent(test['difference'])} [{percent(test['low'])}, "
                      f"{percent(test['high'])}] (95% bootstrap over the images: "
                      f"{test['verdict']}; one trained model, not the method's spread over "
                      f"training seeds: `--repeat N`)", ""]
    rows = []
    for label in s.stage["segment"]["labels"]:
        segmentation = os.path.join(s.segmentation_dirs(seed, label)[1], "eval.json")
        if os.path.isfile(segmentation):
            numbers.setdefault("segmentation", {})[label] = read_json(segmentation)
            rows.append([s.segmentation(seed, label).model, SEGMENT_LABELS[label],
                         percent(numbers["segmentation"][label]["miou"])])
    if rows:
        lines += ["### Tables 7-8. DeepLab trained on the seeds", ""]
        lines += _md_table(["Network", "Trained on", "mIoU (%)"], rows)
    path = os.path.join(s.root(seed), "tables", "tables.md")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    write_json(os.path.join(s.root(seed), "tables", "tables.json"), numbers)
    return {"tables": path}


def step_compare(s: PaperSettings, seed: int, run: Run) -> Dict:
    """ICD vs the baseline over every training seed (two-level bootstrap) -> compare.md."""
    if s.cam is None or "crf" not in s.stage["seeds"]["rows"]:
        return {"skipped": "needs the CAM baseline and the crf seeds"}
    results = {split: seed_comparison(s, s.seeds, split) for split in s.splits}
    lines = [f"# ICD vs the CAM baseline over {len(s.seeds)} training seeds", ""]
    for split, test in results.items():
        lines += [f"- {split}: " + describe_comparison(test)]
    write_json(s.folder("compare", "compare.json"), results)
    path = s.folder("compare", "compare.md")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"compare": path}


def describe_comparison(test: Mapping) -> str:
    """One line of `compare_runs`' result: values, difference, interval, each level's share."""
    levels = "; ".join(f"{name} alone [{percent(v['low'])}, {percent(v['high'])}], "
                       f"{100 * v['share']:.0f}% of the variance"
                       for name, v in test["levels"].items())
    return (f"mIoU {percent(test['value'])} vs {percent(test['reference'])} (means over "
            f"{test['models'][0]} and {test['models'][1]} trained models): difference "
            f"{percent(test['difference'])} [{percent(test['low'])}, {percent(test['high'])}] "
            f"{test['verdict']}; {levels}")


# ---------------------------------------------------------------------------------------------
# The steps of a run

PER_IMAGE = ("superpixels", "infer", "seeds")


def step_name(base: str, seed: int, s: PaperSettings) -> str:
    return base if len(s.seeds) == 1 or base in ("superpixels", "compare") else \
        f"{base}.s{seed}"


def training_settings(cfg: Config) -> Dict:
    """What a training's checkpoints depend on (RUN_FIELDS but the superpixel folder)."""
    return {k: _plain(getattr(cfg, k)) for k in RUN_FIELDS if k != "superpixel_root"}


def step_settings(s: PaperSettings, base: str, seed: int) -> Dict:
    """What a step's outputs depend on (devices, processes and shards left out)."""
    if base == "superpixels":   # the weights only where the features are the network's: a
        # stand-in the run makes later (the demo's pretrain) must not count as a changed input
        stage = s.stage["superpixels"]
        weights = {"pretrained": s.icd.pretrained} if stage["features"] == "pretrained" else {}
        return dict(stage, image_root=s.icd.image_root, data_lists=superpixel_lists(s), **weights)
    if base in ("train_icd", "train_cam"):
        return training_settings(s.training(base[6:], seed))
    if base == "infer":
        return dict(splits=s.splits, infer_size=s.icd.infer_size)
    if base == "segment":
        if s.segmentation(seed) is None:
            return {}
        return dict(s.stage["segment"], **{label: dict(
            training_settings(cfg), scales=list(cfg.scales), flip=cfg.flip, crf=cfg.crf,
            infer_size=cfg.infer_size) for label, cfg in (
                (label, s.segmentation(seed, label)) for label in s.stage["segment"]["labels"])})
    if base == "seeds":
        return dict(s.stage["seeds"], classes=list(s.icd.class_names))
    if base == "evaluate":
        return dict(s.stage["evaluate"], gt_root=s.gt_root)
    return dict(seeds=s.seeds) if base == "compare" else {}


def step_inputs(s: PaperSettings, base: str) -> Tuple[str, ...]:
    train = ("train_icd", "train_cam") if s.cam is not None else ("train_icd",)
    return {"superpixels": (), "train_icd": ("superpixels",), "train_cam": ("superpixels",),
            "infer": train, "seeds": ("infer",), "evaluate": ("seeds",), "segment": ("seeds",),
            "tables": ("evaluate", "segment"), "compare": ("evaluate",)}[base]


def step_folders(s: PaperSettings, base: str, seed: int) -> Tuple[str, ...]:
    root = s.root(seed)
    results = [os.path.join(root, f"results_{m}") for m in s.models]
    return {"superpixels": (s.folder("superpixels"),),
            "train_icd": (os.path.join(root, "snapshot_icd"),),
            "train_cam": (os.path.join(root, "snapshot_cam"),),
            "infer": tuple(results),
            "seeds": tuple(os.path.join(r, split, "seeds") for r in results
                           for split in s.splits),
            "evaluate": tuple(os.path.join(r, split, "eval") for r in results
                              for split in s.splits),
            "segment": tuple(sorted({os.path.join(root, "segmentation")} | {
                s.segmentation_dirs(seed, label)[0] for label in s.stage["segment"]["labels"]})),
            "tables": (os.path.join(root, "tables"),),
            "compare": (s.folder("compare"),)}[base]


STEP_FUNCTIONS = {"superpixels": step_superpixels,
                  "train_icd": functools.partial(step_train, "icd"),
                  "train_cam": functools.partial(step_train, "cam"),
                  "infer": step_infer, "seeds": step_seeds, "evaluate": step_evaluate,
                  "segment": step_segment, "tables": step_tables, "compare": step_compare}


def paper_steps(s: PaperSettings) -> List[Step]:
    """Every step of the run in order: superpixels, then per training seed train_icd,
    train_cam, infer, seeds, evaluate, segment, tables; compare when repeat > 1."""
    def make(base: str, seed: int) -> Step:
        inputs = tuple(step_name(d, seed, s) for d in step_inputs(s, base))
        if base == "compare":
            inputs = tuple(step_name("evaluate", k, s) for k in s.seeds)
        return Step(step_name(base, seed, s), functools.partial(STEP_FUNCTIONS[base], s, seed),
                    inputs=inputs, folders=step_folders(s, base, seed),
                    settings=step_settings(s, base, seed), estimate=ESTIMATES[base])

    per_seed = [b for b in BASE_STEPS if b not in ("superpixels", "compare")
                and (b != "train_cam" or s.cam is not None)]
    return [make("superpixels", s.seeds[0])] + \
        [make(base, seed) for seed in s.seeds for base in per_seed] + \
        ([make("compare", s.seeds[0])] if len(s.seeds) > 1 else [])


def select(steps: Sequence[Step], wanted: Optional[Sequence[str]]) -> Optional[List[str]]:
    """The steps named by `wanted` (base names select every seed's; `train` both trainings);
    None: all. Unknown names are an error naming them."""
    if not wanted:
        return None
    bases = [b for w in wanted for b in ALIASES.get(w, (w,))]
    unknown = [b for b in bases if b not in BASE_STEPS and b not in [st.name for st in steps]]
    if unknown:
        raise ValueError(f"--steps: unknown steps {unknown}; choose from train, "
                         f"{', '.join(BASE_STEPS)}")
    return [st.name for st in steps if st.name in bases or st.name.split(".")[0] in bases]


def run_paper(s: PaperSettings, steps: Optional[Sequence[str]] = None, overwrite: bool = False,
              progress_every: float = 30.0) -> Dict[str, Dict]:
    """Run the selected steps of the pipeline; returns {step: {"action", "seconds", ...}}.
    With a shard other than 0/1 only the per-image steps run, with their own markers."""
    all_steps = paper_steps(s)
    selected = select(all_steps, steps)
    s.check_paths({name.split(".")[0] for name in selected or [st.name for st in all_steps]})
    s.check_out(all_steps)
    marker_dir = s.folder("steps")
    if s.shard != (0, 1):
        names = selected or [st.name for st in all_steps]
        other = [n for n in names if n.split(".")[0] not in PER_IMAGE]
        if other:
            raise ValueError(f"--shard: only the per-image steps ({', '.join(PER_IMAGE)}) run "
                             f"in shards; leave out {other} with --steps")
        marker_dir = s.folder("steps", f"shard{s.shard[0]}of{s.shard[1]}")
    # the workers of a training job on several machines (icd-launch) run every step together
    run = Run(all_steps, marker_dir, selected=selected, overwrite=overwrite,
              progress_every=progress_every, root=s.out,
              exclusive=not s.icd.kvstore.startswith("dist"))
    with run.lock():
        if s.shard == (0, 1):
            names = {st.name for st in all_steps}
            run.forget([n for n in run.marker_names()
                        if n.split(".")[0] in BASE_STEPS and n not in names])
        return run.execute()
