"""What follows a conv: the kinds of normalisation that can be gated (:data:`NORM_KINDS`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NORM_KINDS", "NormActTail", "NormKind", "norm_kind"]


class NormActTail(nn.Module):
    """What stays in a norm-act module's slot once its BN has moved into a gated layer.

    timm's ``BatchNormAct2d`` (and ``FrozenBatchNormAct2d``) computes ``act(drop(bn(x)))``; the
    gated layer now computes the BN, so the slot keeps the original ``drop`` and ``act``
    modules (the same objects, applied in the same order).
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


@dataclass(frozen=True)
class NormKind:
    """How one kind of normalisation module found right after a conv is gated.

    Attributes:
        name: Description of the kind.
        matches: Whether a module is of this kind (first matching entry of
            :data:`NORM_KINDS` wins).
        adapt: ``module -> (bn, slot, fixed_stats)``: the plain ``BatchNorm2d`` the gated layer
            holds, the module that takes the norm's place in the network (whatever the norm
            computes after normalising) and whether the statistics stay fixed in training.
            ``None``: this kind is never gated.
        refusal: Why this kind is not gated (when ``adapt`` is ``None``).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    adapt: Callable[[Any], tuple[nn.BatchNorm2d, nn.Module, bool]] | None = None
    refusal: str = ""


_FROZEN_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _has_act_drop(m: nn.Module) -> bool:
    return isinstance(getattr(m, "act", None), nn.Module) and isinstance(
        getattr(m, "drop", None), nn.Module
    )


def _is_plain_bn(m: nn.Module) -> bool:
    # A subclass that keeps BatchNorm's forward computes exactly what the gated BN does.
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is _BatchNorm.forward


def _is_norm_act(m: nn.Module) -> bool:
    # timm's BatchNormAct2d and kin: a BatchNorm2d whose forward is act(drop(bn(x))).
    return isinstance(m, nn.BatchNorm2d) and _has_act_drop(m)


def _is_frozen_bn(m: nn.Module) -> bool:
    # torchvision.ops.FrozenBatchNorm2d (timm uses the same class) and timm's
    # FrozenBatchNormAct2d: statistics and affine held as buffers, forward x * scale + shift.
    return (
        not isinstance(m, _BatchNorm)
        and "FrozenBatchNorm" in type(m).__name__
        and all(isinstance(m._buffers.get(k), Tensor) for k in _FROZEN_BN_BUFFERS)
        and isinstance(getattr(m, "eps", None), float)
    )


def _copy_bn(m: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A plain ``BatchNorm2d`` with ``m``'s hyper-parameters, parameters and statistics."""
    ref = m.running_mean if m.running_mean is not None else m.weight
    bn = nn.BatchNorm2d(
        m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    with torch.no_grad():
        for name, t in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            t.copy_(getattr(m, name))
    return bn.train(m.training)


def _adapt_plain(m: nn.BatchNorm2d) -> tuple[nn.BatchNorm2d, nn.Module, bool]:
    return m, nn.Identity(), False


def _adapt_norm_act(m: nn.BatchNorm2d) -> tuple[nn.BatchNorm2d, nn.Module, bool]:
    return _copy_bn(m), NormActTail(m.drop, m.act), False


def _adapt_frozen(m: nn.Module) -> tuple[nn.BatchNorm2d, nn.Module, bool]:
    w = m.weight
    bn = nn.BatchNorm2d(w.numel(), eps=m.eps, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for name in _FROZEN_BN_BUFFERS:
            getattr(bn, name).copy_(getattr(m, name))
    slot = NormActTail(m.drop, m.act) if _has_act_drop(m) else nn.Identity()
    return bn, slot, True  # both branches start from it and keep its statistics


#: Normalisations after a conv, first match wins. Append a :class:`NormKind` to teach
#: :func:`wrap` another one.
NORM_KINDS: list[NormKind] = [
    NormKind(
        "SyncBatchNorm",
        lambda m: isinstance(m, nn.SyncBatchNorm),
        refusal="SyncBatchNorm is not gated (its statistics are reduced across processes); "
        "convert it to BatchNorm2d before wrap()",
    ),
    NormKind("BatchNorm2d", _is_plain_bn, _adapt_plain),
    NormKind("BatchNorm2d + act/drop (timm BatchNormAct2d)", _is_norm_act, _adapt_norm_act),
    NormKind(
        "frozen BatchNorm (FrozenBatchNorm2d, fixed statistics)", _is_frozen_bn, _adapt_frozen
    ),
    NormKind(
        "other BatchNorm",
        lambda m: isinstance(m, _BatchNorm),
        refusal="a BatchNorm with its own forward (what it computes is unknown)",
    ),
]


def norm_kind(module: nn.Module) -> NormKind | None:
    """The :data:`NORM_KINDS` entry ``module`` belongs to, or ``None`` (not a BatchNorm)."""
    return next((k for k in NORM_KINDS if k.matches(module)), None)
