"""Turning a pretrained conv-BN network into an AdaFilter model.

* :mod:`.norms`: the normalisations after a conv that can be gated (:data:`NORM_KINDS`);
* :mod:`.trace`: one hooked forward pass: which module reads each conv's output;
* :mod:`.plan`: which convs are gated, which are skipped and why (:func:`plan_gating`);
* :mod:`.policies`: where one forward's policies come from (gate, random, fixed);
* :mod:`.model`: :class:`AdaFilterModel` (gated layers, the gate, parameter groups);
* :mod:`.wrap`: :func:`wrap`, the entry point.

The layers themselves (:mod:`adafilter.layers`) know nothing of models.
"""

from .model import (
    AdaFilterModel,
    build_gate,
    default_gate_network,
    log_param_groups,
    mark_trainable,
)
from .norms import NORM_KINDS, NormActTail, NormKind, norm_kind
from .plan import GatedPair, GatingSummary, SkippedConv, find_conv_bn_pairs, plan_gating
from .trace import conv_execution_order
from .wrap import wrap

__all__ = [
    "NORM_KINDS",
    "AdaFilterModel",
    "GatedPair",
    "GatingSummary",
    "NormActTail",
    "NormKind",
    "SkippedConv",
    "build_gate",
    "conv_execution_order",
    "default_gate_network",
    "find_conv_bn_pairs",
    "log_param_groups",
    "mark_trainable",
    "norm_kind",
    "plan_gating",
    "wrap",
]
