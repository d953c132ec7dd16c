"""What a run of icd-run is made of: the config file (a training YAML with a `pipeline:` section),
the run folder, the overrides (`--set stage.key=value`, --repeat, the device flags), and the
configs of its trainings (ICD, the CAM baseline, DeepLab) derived from them (`PaperSettings`).
Everything is checked before the first step, each error naming the file and key or the flag.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..amp import unsupported_reason
from ..config import (FIELDS, Config, find_config, load_config, read_config_sources,
                      read_yaml_chain)
from ..devices import parse_devices
from ..evaluate import THRESHOLDS
from ..model import MODELS
from .steps import Step
from .tables import CAM_ROWS, SEED_ROWS, SEGMENT_LABELS

BASE_STEPS = ("superpixels", "train_icd", "train_cam", "infer", "seeds", "evaluate", "segment",
              "tables", "compare")
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
        seeds = {"icd": ("icd", SEED_ROWS[stage["seeds"]].folder),
                 "cam": ("cam", CAM_ROWS["crf"].folder)}
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
