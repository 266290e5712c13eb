"""Model definitions that torchvision does not ship (CIFAR ResNets, EfficientNet-Lite)."""

from .cifar_resnet import CifarResNet, cifar_resnet
from .efficientnet_lite import EfficientNetLite, efficientnet_lite0

__all__ = ["CifarResNet", "EfficientNetLite", "cifar_resnet", "efficientnet_lite0"]
