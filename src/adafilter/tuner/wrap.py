"""wrap(): plan the gating of a pretrained network and build its :class:`AdaFilterModel`."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .config import AdaFilterConfig
from .model import AdaFilterModel
from .plan import plan_gating

logger = logging.getLogger("adafilter")

__all__ = ["wrap"]


def wrap(
    model: nn.Module,
    config: AdaFilterConfig | None = None,
    *,
    example_input: Tensor | None = None,
    gate_network: tuple[nn.Module, int] | None = None,
) -> AdaFilterModel:
    """Turn every conv directly followed by a BN into an AdaFilter layer.

    Gated: convs whose output goes straight into a ``BatchNorm2d``, timm's ``BatchNormAct2d``
    (act and drop stay after the selection) or a ``FrozenBatchNorm2d`` (fixed statistics) that
    only they feed (see :func:`plan_gating`). The summary of what was gated and what was
    skipped and why is logged (INFO: one line, DEBUG: every conv) and kept as
    :meth:`AdaFilterModel.gating_summary`.

    Args:
        model: A pretrained conv-BN network (modified in place and owned by the result).
        config: Options; defaults to :class:`AdaFilterConfig`'s defaults (the paper's method).
        example_input: A batch the model accepts, used once to trace conv->BN pairs;
            default ``torch.zeros(1, 3, 64, 64)``.
        gate_network: ``(features, feature_dim)`` for ``config.gate == "cnn"``; default
            ``config.cnn_gate_backbone`` (ResNet-18), randomly initialised.

    Returns:
        The wrapped model. At initialisation its outputs equal the original model's in every
        policy mode (F = S and both BNs are copies of the pretrained one).

    Raises:
        ValueError: Nothing can be gated (e.g. a BN-free network such as ConvNeXt or a ViT).
    """
    config = config or AdaFilterConfig()
    if example_input is None:
        try:
            p = next(model.parameters())
            example_input = torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype)
        except StopIteration:
            example_input = torch.zeros(1, 3, 64, 64)
    summary = plan_gating(
        model,
        example_input,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
    )
    logger.info("adafilter.wrap: %s", summary.brief())
    logger.debug("%s", summary)
    if not summary.gated:
        why = "; ".join(f"{r}: {n}" for r, n in summary.skip_reasons().items())
        raise ValueError(
            f"no Conv2d directly followed by a BatchNorm2d was found to gate in {summary.model} "
            f"({why or 'it has no Conv2d'}); AdaFilter needs conv->BatchNorm layers"
        )
    return AdaFilterModel(model, config, summary.pairs, gate_network=gate_network, summary=summary)
