"""The `pipeline:` section of an icd-run config, typed like icd.config.Config: one frozen
dataclass per stage whose fields are declared once (icd.config.option: default, help, choices,
range), read with the config's `base:` chain by icd.config's one reader (`read_config_file`),
`--set stage.key=value` and --repeat on top, every value checked at load: an unknown key, a bad
choice, a value out of range or of the wrong type is an error naming the file and key
(`<file>: pipeline: seeds: rows: must be one of bu, bu_sp, nocrf, crf, got 'foo'`) or the flag
(`--set seeds.rows: ...`). E.g. experiments/voc_vgg16.yaml:

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

`--set` stages: those below, `run` (the top keys: `run.gt_root=DIR`, `run.repeat=3`), and the
training fields (icd.config.Config) of `train` (ICD and the baseline), `icd` or `cam`; the
segment stage also takes the DeepLab config's fields (`segment.num_epoch=10`).

A new setting of a stage is a field of its section here; its step reads
`settings.pipeline.<stage>.<field>`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ..config import FIELDS, option, read_config_file, typed_value
from ..evaluate import THRESHOLDS
from .tables import SEED_ROWS, SEGMENT_LABELS

RUN = ("run",)                                 # the reader of these fields: icd-run
FEATURE_SOURCES = ("pretrained", "colour")     # superpixels.features


@dataclass(frozen=True)
class SuperpixelsSection:
    """superpixels: Felzenszwalb + merge for the training list and every split (icd.features)."""
    features: str = option("pretrained",
        "features of the merge: conv5 of the config's `pretrained:` ImageNet file, or colour "
        "and position (no network)",
        used_by=RUN, choices=FEATURE_SOURCES)


@dataclass(frozen=True)
class InferSection:
    """infer: the score maps of every model and split (the trainings' infer_size)."""


@dataclass(frozen=True)
class SeedsSection:
    """seeds: Table 3's seeds from the ICD model's scores and the baseline's (icd.seeds)."""
    rows: Tuple[str, ...] = option(tuple(SEED_ROWS),
        "Table 3's rows made (crf: the seeds DeepLab trains on)",
        used_by=RUN, choices=tuple(SEED_ROWS))
    saliency_root: Optional[str] = option(None,
        "folder of saliency maps <name>.png the seeds use (icd.seeds)",
        used_by=RUN, range="non_empty")


@dataclass(frozen=True)
class EvaluateSection:
    """evaluate: pixel mAP, the threshold study and the seeds' mIoU (icd.evaluate)."""
    list: Optional[str] = option(None,
        "evaluate this subset of the first split (the paper: the 1,464 train images of the "
        "10,582 of train_aug; default: the whole split)",
        used_by=RUN, range="non_empty")
    thresholds: Tuple[float, ...] = option(THRESHOLDS,
        "Table 2's thresholds, each in [0, 1]",
        used_by=RUN, range="unit")


@dataclass(frozen=True)
class SegmentSection:
    """segment: DeepLab trained on the seeds, predicted, evaluated (Tables 7-8)."""
    config: Optional[str] = option(None,
        "DeepLab's YAML (beside the run config, or a shipped one); null: no segment step",
        used_by=RUN, range="non_empty")
    list: Optional[str] = option(None,
        "the images to predict and evaluate",
        used_by=RUN, range="non_empty")
    gt_root: Optional[str] = option(None,
        "their ground truth (default: gt_root)",
        used_by=RUN, range="non_empty")
    seeds: str = option("crf",
        "the Table 3 row whose ICD seeds DeepLab trains on",
        used_by=RUN, choices=tuple(SEED_ROWS))
    labels: Tuple[str, ...] = option(("icd",),
        "what DeepLab trains on, one DeepLab each: icd (the ICD seeds), cam (the baseline's "
        "seeds + CRF), gt (gt_root's masks, the upper bound)",
        used_by=RUN, choices=tuple(SEGMENT_LABELS))
    deeplab: Mapping[str, Any] = field(default_factory=dict, metadata=dict(
        help="the DeepLab config's fields given in this section (width: 0.25), over "
             "segment.config's; checked when the config loads", rest=FIELDS))


@dataclass(frozen=True)
class TablesSection:
    """tables: the paper's tables of the run."""


@dataclass(frozen=True)
class PipelineConfig:
    """The whole `pipeline:` section: its top keys and one section per stage."""
    cam: Union[str, Dict[str, Any], None] = option(None,
        "the CAM-only baseline: its YAML (beside the run config, or a shipped one), a mapping "
        "of training options over the run config ({model: vgg16_cam}), or null: none",
        used_by=RUN, range="non_empty")
    gt_root: Optional[str] = option(None,
        "folder of the ground-truth masks <name>.png (evaluation, tables, segment.labels gt)",
        used_by=RUN, range="non_empty")
    splits: Optional[Dict[str, str]] = option(None,
        "split: list file of the images to infer, make seeds for and evaluate (default: "
        "{train: the config's data_list})",
        used_by=RUN, range="non_empty")
    repeat: int = option(1,
        "training seeds (the config's seed, + 1, ...): the steps after superpixels run per seed",
        used_by=RUN, range="positive")
    superpixels: SuperpixelsSection = field(default_factory=SuperpixelsSection)
    infer: InferSection = field(default_factory=InferSection)
    seeds: SeedsSection = field(default_factory=SeedsSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    segment: SegmentSection = field(default_factory=SegmentSection)
    tables: TablesSection = field(default_factory=TablesSection)


_HINTS = {cls: typing.get_type_hints(cls) for cls in (
    PipelineConfig, SuperpixelsSection, InferSection, SeedsSection, EvaluateSection,
    SegmentSection, TablesSection)}
STAGES = {name: hint for name, hint in _HINTS[PipelineConfig].items()
          if dataclasses.is_dataclass(hint)}
TOP_KEYS = tuple(name for name in _HINTS[PipelineConfig] if name not in STAGES)
TRAINING_STAGES = ("train", "icd", "cam")      # --set stages of Config fields
SET_STAGES = TRAINING_STAGES + ("run",)        # --set stages besides STAGES (run: TOP_KEYS)


def _own_fields(cls: type) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "rest" not in f.metadata}


def _rest(cls: type) -> Optional[dataclasses.Field]:
    """The field of `cls` that holds the keys of another config (segment: DeepLab's)."""
    return next((f for f in dataclasses.fields(cls) if "rest" in f.metadata), None)


def stage_keys(stage: str) -> Tuple[str, ...]:
    """The keys a stage's section takes (segment: the DeepLab config's fields too)."""
    rest = _rest(STAGES[stage])
    return tuple(_own_fields(STAGES[stage])) + (tuple(rest.metadata["rest"]) if rest else ())


def section_settings(section: Any) -> Dict[str, Any]:
    """A section's values as one mapping (its other config's keys among its own), as its
    step's fingerprint holds them."""
    rest = _rest(type(section))
    return {**{name: getattr(section, name) for name in _own_fields(type(section))},
            **(dict(getattr(section, rest.name)) if rest else {})}


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


@dataclass(frozen=True)
class Origins:
    """Where each pipeline setting was given, for errors: the config file (and the file of its
    `base:` chain that gave each key: `sources`), the --set items and --repeat."""
    config: str
    sources: Mapping[str, str]
    sets: Mapping[str, Mapping[str, Any]]
    repeat: Optional[int] = None

    def where(self, name: str) -> str:
        """Where `name` (`gt_root`, `seeds.rows`, `splits.train`) was given: `--set stage.key`,
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


def _check_keys(section: Mapping[str, Any], origins: Origins) -> None:
    """Every key of the file's section and of the --set items is one the pipeline knows."""
    known = ", ".join(sorted(set(STAGES) | set(TOP_KEYS)))
    for key, value in section.items():
        if key not in STAGES and key not in TOP_KEYS:
            raise ValueError(f"{origins.where(key)}: unknown key; known: {known}")
        if key in STAGES and not isinstance(value or {}, dict):
            raise ValueError(f"{origins.where(key)}: expected a mapping of key: value, got "
                             f"{value!r}")
        for sub in (value or {}) if key in STAGES else ():
            if sub not in stage_keys(key):
                raise ValueError(f"{origins.where(f'{key}.{sub}')}: unknown key; known: "
                                 f"{', '.join(sorted(stage_keys(key)))}")
    for stage, values in origins.sets.items():
        if stage not in SET_STAGES and stage not in STAGES:
            raise ValueError(f"--set: unknown stage {stage!r}; one of "
                             f"{', '.join(sorted(set(STAGES) | set(SET_STAGES)))}")
        allowed = FIELDS if stage in TRAINING_STAGES else \
            TOP_KEYS if stage == "run" else stage_keys(stage)
        bad = set(values) - set(allowed)
        if bad:
            raise ValueError(f"--set: {stage}: unknown keys {sorted(bad)}")


def _typed(cls: type, name: str, value: Any, label: str) -> Any:
    """`value` of the field `name` of `cls` checked (typed_value), errors naming `label`."""
    spec = _own_fields(cls)[name]
    try:
        return typed_value(_HINTS[cls][name], value, spec.metadata.get("choices"),
                           spec.metadata.get("range"))
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None


def _section(stage: str, given: Mapping[str, Any], origins: Origins) -> Any:
    """The typed section of `stage` from its `given` keys."""
    cls, rest = STAGES[stage], _rest(STAGES[stage])
    own = {k: _typed(cls, k, v, origins.where(f"{stage}.{k}")) for k, v in given.items()
           if k in _own_fields(cls)}
    if rest is not None:
        own[rest.name] = {k: v for k, v in given.items() if k not in _own_fields(cls)}
    return cls(**own)


def load_pipeline(config: str, sets: Mapping[str, Mapping[str, Any]] = {},
                  repeat: Optional[int] = None) -> Tuple[PipelineConfig, Origins]:
    """The typed `pipeline:` section of the YAML `config` (its `base:` chain's, each stage's
    keys over its base's) with `sets` (parse_sets) and `repeat` (--repeat) on top, every key
    and value checked; and where each setting was given (`Origins`)."""
    loaded = read_config_file(config)
    origins = Origins(config, loaded.pipeline_sources, sets, repeat)
    _check_keys(loaded.pipeline, origins)
    top = {**{k: loaded.pipeline[k] for k in TOP_KEYS if k in loaded.pipeline},
           **dict(sets.get("run", {})), **({"repeat": repeat} if repeat is not None else {})}
    top = {k: _typed(PipelineConfig, k, v, origins.where(k)) for k, v in top.items()}
    if isinstance(top.get("cam"), dict) and set(top["cam"]) - set(FIELDS):
        raise ValueError(f"{origins.where('cam')}: {sorted(set(top['cam']) - set(FIELDS))}: "
                         f"not training options (icd.config.Config's fields)")
    stages = {stage: _section(stage, {**(loaded.pipeline.get(stage) or {}),
                                      **dict(sets.get(stage, {}))}, origins)
              for stage in STAGES}
    return PipelineConfig(**top, **stages), origins
