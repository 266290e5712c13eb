"""Backbones: build a pretrained CNN with a fresh classifier head.

Registered names (see :func:`backbone_names`): the built-in torchvision ResNets, CIFAR ResNets
and EfficientNet-Lite0 (:mod:`.builtin`), and ``timm:NAME`` / ``tv:NAME`` for any model timm
(``pip install 'adafilter[timm]'``) or torchvision registers (:mod:`.library`).

``weights`` is ``None`` (random init), ``"pretrained"`` (the backbone's own pretrained source),
``"imagenet"`` (same, for ImageNet backbones) or a path to a state_dict file. Files are always
read with ``torch.load(weights_only=True)``, so loading never runs pickled code.

Layout: ``registry`` (specs, names), ``weights`` (reading and checking state_dicts),
``sources`` (where pretrained files come from), ``builtin`` and ``library`` (registrations),
``build`` (:func:`build_backbone`), ``arch`` (model definitions torchvision lacks).
"""

from . import builtin, library  # noqa: F401  (registrations)
from .build import build_backbone, build_feature_extractor
from .registry import (
    BACKBONE_LIBRARIES,
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    BackboneInfo,
    BackboneSpec,
    WeightsArg,
    backbone_names,
)
from .sources import DOWNLOAD_TIMEOUT_S, TORCHVISION_DIMS, pretrained_weights_path
from .weights import KeyDiff, compare_keys, load_state_dict_file

__all__ = [
    "BACKBONES",
    "BACKBONE_LIBRARIES",
    "DOWNLOAD_TIMEOUT_S",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "TORCHVISION_DIMS",
    "BackboneInfo",
    "BackboneSpec",
    "KeyDiff",
    "WeightsArg",
    "backbone_names",
    "build_backbone",
    "build_feature_extractor",
    "compare_keys",
    "load_state_dict_file",
    "pretrained_weights_path",
]
