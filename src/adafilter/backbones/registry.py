"""The backbone registry: :class:`BackboneSpec` entries by name, and what a build returns."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import AdaFilterError
from ..utils.registry import Registry

__all__ = [
    "BACKBONES",
    "BACKBONE_LIBRARIES",
    "BackboneInfo",
    "BackboneSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "WeightsArg",
    "backbone_names",
]

WeightsArg = str | os.PathLike[str] | None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneInfo:
    """What callers need to know about a built backbone.

    Attributes:
        name: Registered backbone name.
        mean: Per-channel input normalisation mean (inputs in [0, 1]).
        std: Per-channel input normalisation std.
        default_resolution: Input side length the weights were trained at.
        head_name: Qualified module name of the classifier (``model.get_submodule(head_name)``).
        feature_dim: Number of input features of the classifier.
        source: Human-readable description of where the weights came from.
        interpolation: Resize interpolation of the pretrained configuration.
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_resolution: int
    head_name: str
    feature_dim: int
    source: str
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class BackboneSpec:
    """Registry entry: how to build one backbone and find its pretrained weights."""

    name: str
    factory: Callable[[int], nn.Module]  # num_classes -> randomly initialised model
    head_name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_resolution: int
    pretrained_dataset: str  # "imagenet" or "cifar10"
    pretrained: Callable[[], tuple[Path, str]]  # -> (weights file, source description)
    # The library's own pretrained loading (timm/torchvision): -> (model, source description);
    # used instead of ``pretrained`` for weights="pretrained" when set.
    load_pretrained: Callable[[], tuple[nn.Module, str]] | None = None
    interpolation: str = "bilinear"
    # Fetch the pretrained file into the cache directory (``download=True``); ``None`` when
    # ``pretrained`` finds or fetches it by itself.
    download: Callable[[], Path] | None = None


#: ``LIBRARY`` of ``LIBRARY:MODEL`` backbone names -> ``model name -> BackboneSpec``.
BACKBONE_LIBRARIES: Registry[Callable[[str], BackboneSpec]] = Registry("backbone library")


class _BackboneRegistry(Registry[BackboneSpec]):
    """Registered backbones, plus ``LIBRARY:MODEL`` names resolved (and cached) on first use."""

    def get(self, name: str) -> BackboneSpec:
        library, sep, model = name.partition(":")
        if sep and name not in self._items:
            return BACKBONE_LIBRARIES.get(library)(model)
        try:
            return super().get(name)
        except AdaFilterError as e:
            raise AdaFilterError(
                f"{e}; or any timm/torchvision model as timm:NAME or tv:NAME"
            ) from None


BACKBONES: Registry[BackboneSpec] = _BackboneRegistry("backbone")


def backbone_names() -> list[str]:
    """Return the sorted names of all registered backbones."""
    return BACKBONES.names()
