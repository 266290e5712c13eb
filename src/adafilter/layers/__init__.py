"""Plain modules of AdaFilter; nothing here knows models, datasets or training."""

from .gate import CNNGate, RecurrentGate, binarize
from .gated_bn import gated_batch_norm
from .gated_conv import GatedConv2dBN, PolicySource, policy_source

__all__ = [
    "CNNGate",
    "GatedConv2dBN",
    "PolicySource",
    "RecurrentGate",
    "binarize",
    "gated_batch_norm",
    "policy_source",
]
