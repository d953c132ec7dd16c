"""One registry of the model families, by the name users give as `--model` (timm-style).

Each family module registers its constructors (`icd_net`: vgg16_icd, vgg16_cam, vgg16_bn_cam;
`deeplab`: vgg16_largefov, vgg16_aspp, resnet101_largefov) with what the rest of the project
needs to know of them: the task that trains them (`icd.tasks.TASKS` by this name: "icd" for
image-level labels, "segmentation" for DeepLab on label maps), the Config fields their
constructor takes beyond the common ones and the ImageNet weights they start from (`Pretrained`,
timm's pretrained_cfg; `icd.model.pretrained` finds and loads them); `build_model` serves them
all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from mxnet.gluon import HybridBlock

# constructor keyword -> Config field, for every model
COMMON_OPTIONS = {"num_classes": "num_cls", "width": "width", "dropout": "dropout"}


@dataclass(frozen=True)
class Pretrained:
    """Which ImageNet weights a registered network starts from (timm's pretrained_cfg).

    `source` says what the file is; `file` is where the configs expect it (None: the model
    store's cache); `store` and `store_name` name the model store that serves the ImageNet
    network ("mxnet": `mxnet.gluon.model_zoo`, "gluoncv": `gluoncv.model_zoo`) and its model;
    `convert`: the store's file is not loaded as it is but made into `file` by `icd-pretrained`
    (VGG16: the release's layout, docs/release.md section 13). `icd.model.pretrained.imagenet_file`
    resolves an entry to a local file.
    """
    source: str
    store: str
    store_name: str
    file: Optional[str] = None
    convert: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its constructor, the task that trains it (None: not trainable), its
    own options (constructor keyword -> Config field, beyond COMMON_OPTIONS) and its ImageNet
    weights (None: it has none)."""
    constructor: Callable[..., HybridBlock]
    task: Optional[str] = None
    options: Mapping[str, str] = field(default_factory=dict)
    pretrained: Optional[Pretrained] = None

    @property
    def losses(self) -> Tuple[str, ...]:
        """The loss terms the model computes (its class's `loss_names`); () when it names none."""
        constructor = getattr(self.constructor, "func", self.constructor)   # functools.partial
        return tuple(getattr(constructor, "loss_names", ()))


MODELS: Dict[str, ModelSpec] = {}


def register(name: str, constructor: Callable[..., HybridBlock], task: Optional[str] = None,
             options: Optional[Mapping[str, str]] = None,
             pretrained: Optional[Pretrained] = None) -> Callable[..., HybridBlock]:
    """Make `constructor` available as `build_model(name, ...)`, trained by `task`, taking the
    Config fields `options` (keyword -> field), starting from the ImageNet weights `pretrained`;
    a name is registered once."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = ModelSpec(constructor, task, dict(options or {}), pretrained)
    return constructor


def model_spec(name: str) -> ModelSpec:
    """The registration of `name`; ValueError naming the registered models."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name]


def models_of(task: str) -> List[str]:
    """The registered models that `task` trains, sorted."""
    return sorted(name for name, spec in MODELS.items() if spec.task == task)


def model_options(name: str, settings: Any) -> Dict[str, Any]:
    """The constructor's keyword arguments from `settings` (a Config): COMMON_OPTIONS and the
    model's own."""
    fields = {**COMMON_OPTIONS, **model_spec(name).options}
    return {keyword: getattr(settings, f) for keyword, f in fields.items()}


def build_model(name: str = "vgg16_icd", **kwargs) -> HybridBlock:
    """Construct a registered model by the release's name (`--model`)."""
    return model_spec(name).constructor(**kwargs)


def model_from_config(settings: Any) -> HybridBlock:
    """The model a Config names (`settings.model`), built with the options it gives
    (`model_options`)."""
    return build_model(settings.model, **model_options(settings.model, settings))
