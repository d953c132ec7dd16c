"""One registry of the model families, by the name users give as `--model` (timm-style).

Each family module registers its constructors (`icd_net`: vgg16_icd, vgg16_cam; `deeplab`:
vgg16_largefov, vgg16_aspp, resnet101_largefov); `build_model` serves them all.
"""
from __future__ import annotations

from typing import Callable, Dict

from mxnet.gluon import HybridBlock

MODELS: Dict[str, Callable[..., HybridBlock]] = {}


def register(name: str, constructor: Callable[..., HybridBlock]) -> Callable[..., HybridBlock]:
    """Make `constructor` available as `build_model(name, ...)`; a name is registered once."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = constructor
    return constructor


def build_model(name: str = "vgg16_icd", **kwargs) -> HybridBlock:
    """Construct a registered model by the release's name (`--model`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name](**kwargs)
