"""Precise BN: recompute every BN's running statistics exactly over a set of batches.

A short fine-tuning run updates the running statistics a few dozen times with the backbone's
momentum (0.01 for TF-ported EfficientNets), so at evaluation they still describe the
pretrained network while its weights have moved. Recomputing them over N batches in train mode
without gradients fixes that (pycls / Detectron2 "precise BN"). Here the statistics are pooled
exactly -- the mean and unbiased variance over every value the BN saw, not an average of
per-batch estimates -- and each gated BN branch sees only the examples its policy routes to it
(Eq. 5). Under DDP the sums are all-reduced, so every rank ends with the same statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import DistEnv, all_reduce_sum
from ..layers.gated_bn import observe_branch_stats

__all__ = ["recalibrate_bn", "set_bn_momentum"]

_BN = nn.modules.batchnorm._BatchNorm


class _Pool:
    """Per-BN sums in float64: values n, sum x and sum x^2 per channel, (3, C)."""

    def __init__(self, bns: list[_BN]) -> None:
        self.bns = bns
        self.sums = {
            id(bn): torch.zeros(
                3, bn.num_features, dtype=torch.float64, device=bn.running_mean.device
            )
            for bn in bns
        }

    def add(self, bn: _BN, n: Tensor, mean: Tensor, var: Tensor) -> None:
        """Add a batch's ``n`` values per channel with biased ``var`` around ``mean`` (C,)."""
        n, mean, var = n.double(), mean.double(), var.double()
        self.sums[id(bn)] += torch.stack([n, n * mean, n * (var + mean * mean)])

    def write(self, env: DistEnv | None) -> int:
        """Reduce across ranks and set the running statistics; returns the BNs updated."""
        flat = torch.cat([self.sums[id(bn)].flatten() for bn in self.bns])
        if env is not None and env.enabled:
            all_reduce_sum(flat, env)
        updated, offset = 0, 0
        for bn in self.bns:
            n, s, ss = flat[offset : offset + 3 * bn.num_features].view(3, -1)
            offset += 3 * bn.num_features
            seen = n > 0  # a channel no example reached keeps its statistics
            if not bool(seen.any()):
                continue
            mean = s / n.clamp(min=1)
            var = (ss - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)  # unbiased
            rm, rv = bn.running_mean, bn.running_var
            rm.copy_(torch.where(seen, mean, rm.double()).to(rm.dtype))
            rv.copy_(torch.where(seen, var, rv.double()).to(rv.dtype))
            updated += 1
        return updated


def _plain_hook(pool: _Pool) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(bn: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()  # (B, C, H, W) or (B, C)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
        n = torch.full_like(mean, x.numel() / x.shape[1])
        pool.add(bn, n, mean, var)  # type: ignore[arg-type]

    return hook


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    forward: Callable[[Tensor], Any] | None = None,
    env: DistEnv | None = None,
) -> int:
    """Set every BN's running statistics to the exact statistics over ``batches``.

    Plain BNs pool their inputs; each gated BN branch pools the examples routed to it (a
    channel no example reached keeps its old statistics). The model runs in train mode without
    gradients; ``num_batches_tracked`` and the train/eval mode are restored afterwards.

    Args:
        model: Any network with BNs (an ``AdaFilterModel`` included).
        batches: Input batches already on the model's device, e.g. N training batches.
        forward: How to run a batch (default ``model(x)``), e.g. under autocast.
        env: The DDP environment; the sums are reduced across ranks.

    Returns:
        The number of BN modules whose statistics were recomputed.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    pool = _Pool(bns)
    tracked = {id(bn): bn.num_batches_tracked.clone() for bn in bns}
    hooks = [bn.register_forward_pre_hook(_plain_hook(pool)) for bn in bns]

    def on_branches(
        pair: tuple[nn.BatchNorm2d, nn.BatchNorm2d], mean: Tensor, var: Tensor, n: Tensor
    ) -> None:
        for i, bn in enumerate(pair):
            pool.add(bn, n[i], mean[i], var[i])

    was_training = model.training
    run = forward or model
    try:
        model.train()
        with observe_branch_stats(on_branches):
            for x in batches:
                run(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for bn in bns:
        bn.num_batches_tracked.copy_(tracked[id(bn)])
    return pool.write(env)


def set_bn_momentum(model: nn.Module, momentum: float | None) -> int:
    """Give every BN of ``model`` the running-statistics ``momentum`` (``None``: cumulative).

    Returns:
        The number of BN modules changed.
    """
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise ValueError(f"bn_momentum must be in (0, 1], got {momentum!r}")
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    for bn in bns:
        bn.momentum = momentum
    return len(bns)
