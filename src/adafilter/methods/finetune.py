"""Standard fine-tuning, fine-tuning the second half (Table 2 baselines) and a linear probe."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..tuner import conv_execution_order
from .base import Method, Prepared

logger = logging.getLogger("adafilter")


@dataclass(frozen=True)
class FineTune(Method):
    """Standard fine-tuning: every parameter of the backbone and the new head trains."""

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        network.requires_grad_(True)
        return Prepared(model=network, method=self)


def freeze_first_half(model: nn.Module, example_input: Tensor, *, head_name: str) -> dict[str, Any]:
    """Freeze the first ``floor(n / 2)`` of the ``n`` backbone convs and the BNs after them.

    "First" is execution order on ``example_input`` (:func:`conv_execution_order`; the head is
    never frozen). Frozen means ``requires_grad=False`` for the conv's weight/bias and the
    directly-following BN's affine weight/bias. The frozen BNs' running statistics keep
    updating in training mode, exactly as in standard fine-tuning (the paper's setting: only
    the listed parameters are excluded from training).

    Returns:
        ``{"num_convs", "frozen_convs", "frozen_bns", "bn_running_stats"}`` for the summary.
    """
    order = conv_execution_order(model, example_input, skip_prefix=head_name)
    k = len(order) // 2
    frozen_convs, frozen_bns = [], []
    for conv_name, bn_name in order[:k]:
        model.get_submodule(conv_name).requires_grad_(False)
        frozen_convs.append(conv_name)
        if bn_name is not None:
            model.get_submodule(bn_name).requires_grad_(False)
            frozen_bns.append(bn_name)
    return {
        "num_convs": len(order),
        "frozen_convs": frozen_convs,
        "frozen_bns": frozen_bns,
        "bn_running_stats": "updated in training mode (only affine parameters are frozen)",
    }


@dataclass(frozen=True)
class FineTuneHalf(FineTune):
    """Fine-tune the second half of the backbone's convs and the head; freeze the first half."""

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        network.requires_grad_(True)
        info = freeze_first_half(network, example_input, head_name=head_name)
        logger.info(
            "finetune-half: froze %d of %d convs (+%d BNs)",
            len(info["frozen_convs"]),
            info["num_convs"],
            len(info["frozen_bns"]),
        )
        return Prepared(model=network, method=self, info={"finetune_half": info})


def freeze_backbone(network: nn.Module, *, head_name: str) -> int:
    """Freeze everything but the head: no parameter outside ``head_name`` trains, and every
    ``BatchNorm2d`` outside it becomes a ``FrozenBatchNorm2d`` (its pretrained statistics, in
    training as in evaluation), so the features are exactly the pretrained network's.

    Returns:
        The number of BNs frozen.
    """
    network.requires_grad_(False)
    network.get_submodule(head_name).requires_grad_(True)
    frozen = 0
    for name, bn in list(network.named_modules()):
        if not isinstance(bn, nn.BatchNorm2d) or name.startswith(head_name):
            continue
        fixed = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.running_mean.device)
        fixed.running_mean.copy_(bn.running_mean)
        fixed.running_var.copy_(bn.running_var)
        if bn.affine:
            fixed.weight.copy_(bn.weight.detach())
            fixed.bias.copy_(bn.bias.detach())
        parent, _, leaf = name.rpartition(".")
        setattr(network.get_submodule(parent) if parent else network, leaf, fixed)
        frozen += 1
    return frozen


@dataclass(frozen=True)
class LinearProbe(FineTune):
    """A linear probe: only the new head trains, on the frozen pretrained features (a reference
    line: what S knows without changing a filter)."""

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        frozen = freeze_backbone(network, head_name=head_name)
        logger.info("linear-probe: backbone frozen (%d BNs with fixed statistics)", frozen)
        return Prepared(model=network, method=self, info={"frozen_bns": frozen})
