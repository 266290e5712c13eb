"""AdaFilter: adaptive filter fine-tuning for deep transfer learning (Guo et al., AAAI 2020)."""

from .deploy import LoadedRun, load
from .errors import AdaFilterError, CheckpointError, DataError
from .layers.gate import CNNGate, RecurrentGate, binarize
from .layers.gated_bn import gated_batch_norm
from .layers.gated_conv import GatedConv2dBN
from .training.optim import build_optimizer
from .training.precise_bn import recalibrate_bn
from .tuner import AdaFilterModel, find_conv_bn_pairs, mark_trainable, wrap
from .tuner.config import AdaFilterConfig

__version__ = "0.1.0"

__all__ = [
    "AdaFilterConfig",
    "AdaFilterError",
    "AdaFilterModel",
    "CNNGate",
    "CheckpointError",
    "DataError",
    "GatedConv2dBN",
    "LoadedRun",
    "RecurrentGate",
    "binarize",
    "build_optimizer",
    "find_conv_bn_pairs",
    "gated_batch_norm",
    "load",
    "mark_trainable",
    "recalibrate_bn",
    "wrap",
]
