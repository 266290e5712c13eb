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
from ..layers.gated_bn import BranchBatch, observe_branch_stats

__all__ = ["bn_statistics", "recalibrate_bn", "restore_bn_statistics", "set_bn_momentum"]

_BN = nn.modules.batchnorm._BatchNorm


class _Pool:
    """Per-BN sums in float64, (5, C) per BN: values n, sum x, sum x^2, examples routed k and
    examples in the batches B; and each gated branch's minimum-examples rule."""

    def __init__(self, bns: list[_BN]) -> None:
        self.bns = bns
        self.sums = {
            id(bn): torch.zeros(
                5, bn.num_features, dtype=torch.float64, device=bn.running_mean.device
            )
            for bn in bns
        }
        self.rules: dict[int, tuple[int, int]] = {}  # gated branches: (min_examples, min_values)
        self.degenerate = 0  # branch channels that normalised with running statistics

    def add(
        self, bn: _BN, n: Tensor, mean: Tensor, var: Tensor, examples: Tensor, batch: int
    ) -> None:
        """Add a batch's ``n`` values per channel with biased ``var`` around ``mean`` (C,),
        from ``examples`` (C,) of its ``batch`` examples."""
        n, mean, var = n.double(), mean.double(), var.double()
        rows = [n, n * mean, n * (var + mean * mean), examples.double(), torch.full_like(n, batch)]
        self.sums[id(bn)] += torch.stack(rows)

    def write(self, env: DistEnv | None) -> tuple[int, bool]:
        """Reduce across ranks and set the running statistics; returns the BNs updated and
        whether any rank met a degenerate branch."""
        flat = torch.cat([self.sums[id(bn)].flatten() for bn in self.bns])
        flat = torch.cat([flat, flat.new_tensor([float(self.degenerate)])])
        if env is not None and env.enabled:
            all_reduce_sum(flat, env)
        degenerate = bool(flat[-1] > 0)
        updated, offset = 0, 0
        for bn in self.bns:
            n, s, ss, k, total = flat[offset : offset + 5 * bn.num_features].view(5, -1)
            offset += 5 * bn.num_features
            seen = _enough(n, k, total, self.rules.get(id(bn)))
            if not bool(seen.any()):
                continue
            mean = s / n.clamp(min=1)
            var = (ss - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)  # unbiased
            rm, rv = bn.running_mean, bn.running_var
            rm.copy_(torch.where(seen, mean, rm.double()).to(rm.dtype))
            rv.copy_(torch.where(seen, var, rv.double()).to(rv.dtype))
            updated += 1
        return updated, degenerate


def _enough(n: Tensor, k: Tensor, total: Tensor, rule: tuple[int, int] | None) -> Tensor:
    """Channels (C,) whose pooled values may replace the running statistics (bool).

    The rule training applies to one batch (:func:`~adafilter.layers.gated_bn.gated_batch_norm`),
    applied to the counts pooled over every batch (and rank): a gated branch needs
    ``min_examples`` examples and ``min_values`` values, or every example of every batch in
    every channel (an all-F or all-S layer: a standard BN); a plain BN, as ``nn.BatchNorm2d``,
    more than one value. With
    one value the unbiased variance is 0, and a later degenerate branch would divide by it.
    """
    if rule is None:
        return n > 1
    min_examples, min_values = rule
    whole = (k == total).all() & (n > 1)
    return ((k >= min_examples) & (n >= min_values)) | whole


def _plain_hook(pool: _Pool) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(bn: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()  # (B, C, H, W) or (B, C)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
        n = torch.full_like(mean, x.numel() / x.shape[1])
        batch = x.shape[0]
        pool.add(bn, n, mean, var, torch.full_like(mean, batch), batch)  # type: ignore[arg-type]

    return hook


#: Most passes over the batches (see :func:`recalibrate_bn`), and the relative change of every
#: running statistic below which another pass is not needed.
MAX_PASSES = 4
TOLERANCE = 1e-3


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    forward: Callable[[Tensor], Any] | None = None,
    env: DistEnv | None = None,
    max_passes: int = MAX_PASSES,
) -> int:
    """Set every BN's running statistics to the exact statistics over ``batches``.

    Plain BNs pool their inputs; each gated BN branch pools the examples routed to it. A
    channel gets new statistics only from enough values -- the rule training applies to one
    batch (``bn_min_examples``/``bn_min_values`` for a gated branch, more than one value for a
    plain BN), applied to the pooled (and, under DDP, reduced) counts; any other channel keeps
    its old statistics. The model runs in train mode without gradients; ``num_batches_tracked``
    and the train/eval mode are restored afterwards.

    Several passes where a branch was degenerate. A degenerate branch (too few examples in a
    batch) normalises with its running statistics even in train mode, so what a later BN sees
    depends on the earlier BNs' running statistics. One pass computes every BN's statistics
    under the *old* statistics of the BNs before it; once those are replaced the later ones are
    stale (ResNet-18 at 32 px: layer4's 1x1 maps normalised with variances 100x too small, and
    the next training epoch diverged). Where a pass met a degenerate branch, the batches are
    run again under the new statistics until no statistic moves by more than
    :data:`TOLERANCE` (relative) or ``max_passes`` passes have run. Networks without
    degenerate branches (plain BNs, all-F layers, large maps) take one pass, exact as before.

    Args:
        model: Any network with BNs (an ``AdaFilterModel`` included).
        batches: Input batches already on the model's device, e.g. N training batches; a
            re-iterable (a list, a ``DataLoader``) so that a second pass can run -- a one-shot
            iterator gets one pass.
        forward: How to run a batch (default ``model(x)``), e.g. under autocast.
        env: The DDP environment; the sums (and the decision to run another pass) are reduced
            across ranks, so every rank runs the same passes and ends with the same statistics.
        max_passes: The most passes.

    Returns:
        The number of BN modules whose statistics were recomputed.
    """
    bns = _tracking_bns(model)
    if not bns:
        return 0
    tracked = {id(bn): bn.num_batches_tracked.clone() for bn in bns}
    once = iter(batches) is batches  # type: ignore[comparison-overlap]
    was_training = model.training
    try:
        model.train()
        for done in range(1, max_passes + 1):
            before = _statistics(bns)
            pool = _one_pass(model, bns, batches, forward or model)
            updated, degenerate = pool.write(env)
            if not degenerate or once or done == max_passes or _settled(bns, before):
                break
    finally:
        model.train(was_training)
        for bn in bns:
            bn.num_batches_tracked.copy_(tracked[id(bn)])
    return updated


def _one_pass(
    model: nn.Module, bns: list[_BN], batches: Iterable[Tensor], run: Callable[[Tensor], Any]
) -> _Pool:
    """Run every batch once in train mode and pool what each BN (branch) saw."""
    pool = _Pool(bns)
    hooks = [bn.register_forward_pre_hook(_plain_hook(pool)) for bn in bns]

    def on_branches(pair: tuple[nn.BatchNorm2d, nn.BatchNorm2d], b: BranchBatch) -> None:
        rule = (b.min_examples, b.min_values)
        whole = (b.examples == b.batch).all(1, keepdim=True) & (b.values > 1)  # (2, 1)
        use = ((b.examples >= b.min_examples) & (b.values >= b.min_values)) | whole
        pool.degenerate += int(((b.examples > 0) & ~use).sum())
        for i, bn in enumerate(pair):
            pool.rules[id(bn)] = rule
            pool.add(bn, b.values[i], b.mean[i], b.var[i], b.examples[i], b.batch)

    try:
        with observe_branch_stats(on_branches):
            for x in batches:
                run(x)
    finally:
        for h in hooks:
            h.remove()
    return pool


def _settled(bns: list[_BN], before: list[Tensor]) -> bool:
    """No running mean or variance moved by more than :data:`TOLERANCE` of its scale."""
    for bn, old in zip(bns, before, strict=True):
        new = torch.stack([bn.running_mean, bn.running_var])
        scale = old[1].abs().sqrt().clamp(min=1e-3)  # (C,) the channel's standard deviation
        moved = (new[0] - old[0]).abs() / scale, (new[1] - old[1]).abs() / (scale * scale)
        if max(float(m.max()) for m in moved) > TOLERANCE:
            return False
    return True


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


def _tracking_bns(model: nn.Module) -> list[_BN]:
    """The BNs of ``model`` that keep running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


def _statistics(bns: list[_BN]) -> list[Tensor]:
    return [torch.stack([bn.running_mean, bn.running_var]).clone() for bn in bns]


def bn_statistics(model: nn.Module) -> list[Tensor]:
    """A copy of every tracking BN's running mean and variance, ``(2, C)`` each, in module
    order: what :func:`restore_bn_statistics` puts back (e.g. after a precise-BN pass that
    validation did not prefer)."""
    return _statistics(_tracking_bns(model))


def restore_bn_statistics(model: nn.Module, saved: list[Tensor]) -> None:
    """Put back the running statistics :func:`bn_statistics` copied from ``model``."""
    bns = _tracking_bns(model)
    if len(bns) != len(saved):
        raise ValueError(f"{len(saved)} saved BN statistics for {len(bns)} BNs")
    with torch.no_grad():
        for bn, stats in zip(bns, saved, strict=True):
            bn.running_mean.copy_(stats[0])
            bn.running_var.copy_(stats[1])
