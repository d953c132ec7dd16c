"""What a run of icd-run is made of: the config file (a training YAML with a `pipeline:` section),
the run folder, the overrides (`--set stage.key=value`, --repeat, the device flags), and the
configs of its trainings (ICD, the CAM baseline, DeepLab) derived from them (`PaperSettings`).
Everything is checked before the first step, each error naming the file and key or the flag.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..amp import unsupported_reason
from ..config import Config, find_config, load_config, read_config_sources
from ..data.dataset import DataPaths
from ..devices import parse_devices
from ..model import MODELS, model_spec
from ..model.pretrained import MODELZOO, fetch_command
from .sections import load_pipeline
from .steps import Step
from .tables import CAM_ROWS, SEED_ROWS

BASE_STEPS = ("superpixels", "train_icd", "train_cam", "infer", "seeds", "evaluate", "segment",
              "tables", "compare")
# The flag of icd-run that gives each device setting (PaperSettings.devices)
DEVICE_FLAGS = {"gpus": "--gpus", "cpus": "--cpus", "kvstore": "--kvstore",
                "num_workers": "--loader-workers", "amp": "--amp"}
# What the CAM baseline takes from the ICD config: its data, classes and inference size
INHERITED = ("image_root", "annotation_root", "data_list", "classes", "num_cls", "pretrained",
             "infer_size")
# Where a user gets each input the run reads, by the setting that names it (docs/inputs.md)
LIST = "a list of image ids (VOC: SBD's train_aug.txt, val.txt; docs/inputs.md)"
GT = "label maps <name>.png (VOC: SBD's SegmentationClassAug; docs/inputs.md)"
HOW_TO_GET = {
    "image_root": "the images <name>.jpg (VOC: VOCtrainval_11-May-2012.tar; COCO: "
                  "icd-coco-to-voc; docs/inputs.md)",
    "annotation_root": "the image-level labels <name>.xml (VOC 2012's Annotations; COCO: "
                       "icd-coco-to-voc)",
    "classes": "a class list, one name per line (icd-coco-to-voc writes COCO's)",
    "data_list": LIST, "splits": LIST, "evaluate.list": LIST, "segment.list": LIST,
    "gt_root": GT, "segment.gt_root": GT,
    "seeds.saliency_root": "saliency maps <name>.png (optional; docs/inputs.md)",
}


class Input(NamedTuple):
    """A file or folder a run reads: the setting that names it, as said in errors (`where`),
    and its key (`HOW_TO_GET`; "pretrained" for the ImageNet file)."""
    where: str
    key: str


@dataclass
class PaperSettings:
    """A run of the paper's pipeline: the config file, the run folder and the overrides.

    After loading: `pipeline` the typed `pipeline:` section (icd.pipeline.sections; `origins`
    says where each setting was given), `data` the dataset every stage reads (DataPaths),
    `icd` and `cam` the training configs, `splits` {split: list file}."""
    config: str
    out: str
    sets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    devices: Mapping[str, Any] = field(default_factory=dict)   # gpus/cpus/kvstore/num_workers/amp
    repeat: Optional[int] = None
    workers: int = 1                   # superpixel, seed and evaluation processes
    shard: Tuple[int, int] = (0, 1)    # per-image steps only (several machines)

    def __post_init__(self):
        self.config = find_config(self.config)
        self.pipeline, self.origins = load_pipeline(self.config, self.sets, self.repeat)
        self.base_seed = load_config(self.config, labels=self.labels("icd"),
                                     **self.overrides("icd")).seed
        self.icd = self.training("icd")
        self.cam = self.training("cam") if self.pipeline.cam else None
        self.data = DataPaths(self.icd.image_root, self.icd.annotation_root, self.icd.data_list,
                              self.icd.class_names, self.pipeline.gt_root)
        self.splits = dict(self.pipeline.splits or {"train": self.icd.data_list})
        segment = self.pipeline.segment
        if "cam" in segment.labels and (self.cam is None or
                                        "crf" not in self.pipeline.seeds.rows):
            raise ValueError(f"{self.where('segment.labels')}: cam needs the baseline (cam:) "
                             f"and the crf seeds, got {list(segment.labels)!r}")
        for which, cfg in (("icd", self.icd), ("cam", self.cam)):
            if cfg is not None:
                self.check_training(cfg, self.config_file(which), self.labels(which))
        for label in segment.labels if segment.config else ():
            self.check_training(self.segmentation(self.seeds[0], label),
                                self.segment_config_file(), self.segment_labels())

    # checks ------------------------------------------------------------------------------

    def where(self, name: str) -> str:
        """Where a pipeline setting (`gt_root`, `seeds.rows`) was given (`Origins.where`)."""
        return self.origins.where(name)

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

    def inputs(self, steps: Sequence[str]) -> Dict[str, Input]:
        """{path: Input} of the files and folders the `steps` (base names) read."""
        needed: Dict[str, Input] = {self.config: Input("--config", "config")}
        given = read_config_sources(self.config)[1]
        labels = self.labels("icd")

        def field(name: str) -> None:
            value = getattr(self.icd, name)
            if value:
                needed.setdefault(value, Input(labels.get(name) or
                                               f"{given.get(name, self.config)}: {name}", name))

        def setting(name: str, value: Optional[str]) -> None:
            if value:
                needed.setdefault(value, Input(self.where(name), name.split(".")[0]
                                               if name.startswith("splits.") else name))

        bases = set(steps)
        field("classes")
        if bases & {"superpixels", "train_icd", "train_cam", "infer", "seeds"}:
            field("image_root")
            field("data_list")
            for split, data_list in self.splits.items():
                setting(f"splits.{split}", data_list)
        if bases & {"train_icd", "train_cam", "seeds", "evaluate"}:
            field("annotation_root")
        if (bases & {"train_icd", "train_cam"} or (
                "superpixels" in bases and self.pipeline.superpixels.features == "pretrained")) \
                and not self.from_model_store():
            field("pretrained")
        if "seeds" in bases:
            setting("seeds.saliency_root", self.pipeline.seeds.saliency_root)
        if bases & {"evaluate", "segment", "tables", "compare"}:
            setting("gt_root", self.data.gt_root)
            setting("evaluate.list", self.pipeline.evaluate.list)
        if "segment" in bases and self.pipeline.segment.config:
            for key in ("list", "gt_root"):
                setting(f"segment.{key}", getattr(self.pipeline.segment, key))
        return needed

    def from_model_store(self) -> bool:
        """Whether the ImageNet file is the model store's own (`pretrained: modelzoo` for a
        network that takes the store's file as it is): the store fetches it, no path to check."""
        entry = model_spec(self.icd.model).pretrained
        return str(self.icd.pretrained).startswith(MODELZOO) and entry is not None and \
            not entry.convert

    def how_to_get(self, path: str, key: str) -> str:
        """How a user makes or fetches the input `path` named by setting `key`."""
        if key == "pretrained":
            entry = model_spec(self.icd.model).pretrained
            if entry is not None:
                command = fetch_command(entry, None if path.startswith(MODELZOO) else path)
                return f"{command} (or the release's file: docs/inputs.md)"
        return HOW_TO_GET.get(key, "")

    def check_paths(self, steps: Sequence[str]) -> None:
        """The files and folders the selected `steps` (base names) read exist, before the
        first step; FileNotFoundError naming every missing one at once, each with the setting
        that gave it and how to make or fetch it (`how_to_get`)."""
        if set(steps) & {"evaluate", "segment", "tables", "compare"} and not self.data.gt_root:
            raise ValueError(f"{self.config}: pipeline: gt_root: the ground-truth folder is "
                             f"needed to evaluate (or leave the evaluate step out with --steps)")
        missing = [(path, needed) for path, needed in self.inputs(steps).items()
                   if not os.path.exists(path)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} input{'s' if len(missing) > 1 else ''} of the run not found "
                f"(every input: docs/inputs.md): " + " ".join(
                    f"[{k}] {needed.where}: {path}" + (f"; get it: {how}" if (
                        how := self.how_to_get(path, needed.key)) else "")
                    for k, (path, needed) in enumerate(missing, 1)))

    def check_out(self, steps: Sequence[Step]) -> None:
        """`--out` is refused where the run would write over one of its inputs: a file, or a
        folder holding an input in a folder that a step writes (docs/troubleshooting.md)."""
        if os.path.isfile(self.out):
            raise ValueError(f"--out {self.out}: is a file; the run folder must be a folder of "
                             f"its own")
        written = {st.name: st.folders for st in steps}
        written["the step runner"] = (self.folder("steps"),)
        for path, (where, _) in self.inputs(BASE_STEPS).items():
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
        return [self.base_seed + k for k in range(self.pipeline.repeat)]

    def root(self, seed: int) -> str:
        """The folder of one training seed's steps (the run folder when repeat is 1)."""
        return self.out if len(self.seeds) == 1 else os.path.join(self.out, f"seed{seed}")

    def config_file(self, which: str) -> str:
        """The YAML file of "icd" or "cam" (the run config when `cam:` is a mapping)."""
        cam = self.pipeline.cam
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
        cam = self.pipeline.cam
        overrides = {**dict(self.sets.get("train", {})), **dict(self.sets.get(which, {})),
                     **{k: v for k, v in self.devices.items() if v is not None}}
        if which == "cam":
            # the baseline: its own YAML (or the ICD config with `cam:`'s keys) on ICD's data
            overrides = {**{k: getattr(self.icd, k) for k in INHERITED},
                         **(cam if isinstance(cam, dict) else {}), **overrides}
        return overrides

    def labels(self, which: str) -> Dict[str, str]:
        """Where each of `overrides(which)` was given, for its errors (load_config's labels)."""
        cam = self.pipeline.cam
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
        return self.beside_config(self.pipeline.segment.config, "segment.config")

    def segment_labels(self) -> Dict[str, str]:
        """Where the DeepLab options given by the segment: stage and the devices were given."""
        return {**{k: self.where(f"segment.{k}") for k in self.pipeline.segment.deeplab},
                **{k: DEVICE_FLAGS.get(k, "--" + k) for k, v in self.devices.items()
                   if v is not None}}

    def segmentation(self, seed: int, label: str = "icd") -> Optional[Config]:
        """The DeepLab config (None without `segment.config`) trained on `label`
        (SEGMENT_LABELS) of the first split, from the ICD model's ImageNet file, on the same
        devices."""
        stage = self.pipeline.segment
        if not stage.config:
            return None
        seeds = {"icd": ("icd", SEED_ROWS[stage.seeds].folder),
                 "cam": ("cam", CAM_ROWS["crf"].folder)}
        labels = os.path.join(self.results(seed, seeds[label][0], self.first_split), "seeds",
                              seeds[label][1]) if label in seeds else self.data.gt_root
        data = self.data
        return load_config(self.segment_config_file(), labels=self.segment_labels(),
                           image_root=data.image_root, annotation_root=data.annotation_root,
                           data_list=data.data_list, classes=self.icd.classes,
                           num_cls=self.icd.num_cls, label_root=labels,
                           pretrained=self.icd.pretrained, seed=seed,
                           snapshot=self.segmentation_dirs(seed, label)[0],
                           **{**stage.deeplab,
                              **{k: v for k, v in self.devices.items() if v is not None}})

    def segmentation_dirs(self, seed: int, label: str) -> Tuple[str, str]:
        """(snapshot, predictions) folders of the DeepLab on `label`: snapshot_segment/ and
        segmentation/, or snapshot_segment_<label>/ and segmentation/<label>/ with several."""
        if len(self.pipeline.segment.labels) == 1:
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
        chosen = self.pipeline.evaluate.list
        return chosen if chosen and split == self.first_split else self.splits[split]
