"""Compatibility module: the model code lives in :mod:`adafilter.tuner`.

``from adafilter.model import wrap, AdaFilterModel, plan_gating, ...`` keeps working.
"""

from .tuner import (
    NORM_KINDS,
    AdaFilterModel,
    GatedPair,
    GatingSummary,
    NormActTail,
    NormKind,
    SkippedConv,
    conv_execution_order,
    find_conv_bn_pairs,
    log_param_groups,
    mark_trainable,
    norm_kind,
    plan_gating,
    wrap,
)

__all__ = [
    "NORM_KINDS",
    "AdaFilterModel",
    "GatedPair",
    "GatingSummary",
    "NormActTail",
    "NormKind",
    "SkippedConv",
    "conv_execution_order",
    "find_conv_bn_pairs",
    "log_param_groups",
    "mark_trainable",
    "norm_kind",
    "plan_gating",
    "wrap",
]
