"""Gated batch normalisation (paper Eq. 5) with masked statistics, as one autograd function.

Eq. 5 keeps two BNs after a gated conv: one normalises the channels produced by the fine-tuned
filters F, the other those produced by the pretrained filters S, and the policy G picks, per
example and channel, which normalised value is used::

    y[b, c] = G[b, c] * BN_F(F(x))[b, c] + (1 - G[b, c]) * BN_S(S(x))[b, c]

(The paper's text names the two BNs in the opposite order of Eq. 1; here the F branch always
pairs with BN_F.) In training, BN_F's statistics for channel ``c`` come only from the examples
with ``G[b, c] = 1`` and BN_S's only from those with ``G[b, c] = 0``; each branch's running
statistics are updated from those examples alone.

Degenerate branches. A branch that holds very few values for a channel (one example at 2x2
spatial size: 4 values) has a variance estimate near zero; normalising by it and
back-propagating through ``1/sqrt(var)`` blows activations and gradients up. A branch therefore
uses its batch statistics for channel ``c`` only if it has at least ``min_examples`` examples
and ``min_examples * H * W >= min_values`` values; otherwise it normalises that channel with its
running statistics (treated as constants, as in eval mode) and leaves them unchanged. Variances
are combined from per-example statistics with Chan's parallel formula, never as
``E[x^2] - E[x]^2``.

The gradient w.r.t. the policy is that of Eq. 5 with both BN outputs evaluated under their own
branch statistics: ``dL/dG[b, c] = sum_hw dL/dy * (BN_F(F(x)) - BN_S(S(x)))``. Which examples
enter a branch's statistics is a discrete choice and carries no gradient.

Everything is computed from per-(example, channel) reductions and fused multiply-adds: the
forward makes three passes over the selected output (select, statistics, normalise), the
backward two reductions and four fused multiply-adds; masked copies fed to two ``F.batch_norm``
calls would need several times that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _BranchStats:
    """Per-channel statistics of one branch (all tensors (C,))."""

    __slots__ = ("mean", "rstd", "scale", "shift", "use_batch", "count")

    def __init__(
        self,
        mean: Tensor,
        rstd: Tensor,
        scale: Tensor,
        shift: Tensor,
        use_batch: Tensor,
        count: Tensor,
    ) -> None:
        self.mean, self.rstd, self.scale, self.shift = mean, rstd, scale, shift
        self.use_batch, self.count = use_batch, count


def _low(x: Tensor) -> bool:
    """Half/bfloat16 activations (autocast): statistics are then kept in float32."""
    return x.dtype in (torch.float16, torch.bfloat16)


def _per_example_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of every (example, channel) plane of ``x`` (B, C, H, W).

    On CPU, ``var_mean`` over the two inner dims runs a slow generic reduction (measured
    5-20x slower); viewing the batch as one example with B*C channels lets ATen's
    batch-norm statistics kernel (two-pass, stable) do the same work.
    """
    b, c, h, w = x.shape
    if x.device.type == "cpu":
        flat = x.float().reshape(1, b * c, h, w) if _low(x) else x.reshape(1, b * c, h, w)
        mean, var = torch.ops.aten.batch_norm_update_stats(flat, None, None, 0.0)
        return mean.view(b, c), var.view(b, c)
    var, mean = torch.var_mean(x.float() if _low(x) else x, dim=(2, 3), correction=0)
    return mean, var


def _per_example_sums(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_hw dy, sum_hw dy * x)`` per (example, channel), both (B, C), in one pass on CPU.

    BN's backward kernel with mean 0 and inverse std 1 computes exactly these two sums as
    its bias and weight gradients (8x faster than ``einsum`` at 56x56 here).
    """
    b, c, h, w = x.shape
    if x.device.type == "cpu":
        if _low(x):
            dy, x = dy.float(), x.float()
        zeros = x.new_zeros(b * c)
        ones = x.new_ones(b * c)
        _, s_dyx, s_dy = torch.ops.aten.native_batch_norm_backward(
            dy.reshape(1, b * c, h, w),
            x.reshape(1, b * c, h, w),
            None,
            None,
            None,
            zeros,
            ones,
            True,
            0.0,
            [False, True, True],
        )
        return s_dy.view(b, c), s_dyx.view(b, c)
    if _low(x):  # autocast: accumulate in float32
        return dy.sum((2, 3), dtype=torch.float32), (dy * x).sum((2, 3), dtype=torch.float32)
    return dy.sum((2, 3)), torch.einsum("bchw,bchw->bc", dy, x)


def _branch_stats(
    stats: tuple[Tensor, Tensor] | None,
    hw: int,
    mask: Tensor,
    bn: nn.BatchNorm2d,
    min_examples: int,
    min_values: int,
) -> _BranchStats:
    """Statistics of one branch; updates ``bn``'s running statistics in training.

    Args:
        stats: Per-example ``(mean, biased var)``, each (B, C), of this branch's conv output;
            ``None`` in eval mode (running statistics).
        hw: Spatial size H * W of that output.
        mask: (B, C) 1. where the example's channel is routed to this branch.
    """
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    weight, bias = weight.detach().to(mask.dtype), bias.detach().to(mask.dtype)
    run_mean = bn.running_mean.to(mask.dtype)
    run_var = bn.running_var.to(mask.dtype)
    if stats is None:
        rstd = torch.rsqrt(run_var + bn.eps)
        scale = weight * rstd
        false = torch.zeros_like(run_mean, dtype=torch.bool)
        return _BranchStats(run_mean, rstd, scale, bias - run_mean * scale, false, run_mean * 0)

    mean_bc, var_bc = stats
    k = mask.sum(0)  # (C,) examples routed to this branch
    n = k * hw  # (C,) values
    k_safe = k.clamp(min=1)
    mean = (mask * mean_bc).sum(0) / k_safe  # (C,)
    # Chan et al.: M2 = sum_b [M2_b + hw * (mean_b - mean)^2] over the branch's examples.
    m2 = (mask * (var_bc + (mean_bc - mean) ** 2)).sum(0) * hw
    var = m2 / n.clamp(min=1)
    use_batch = (k >= min_examples) & (n >= min_values)
    mu = torch.where(use_batch, mean, run_mean)
    rstd = torch.rsqrt(torch.where(use_batch, var, run_var) + bn.eps)
    scale = weight * rstd
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(bn.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp(min=1)
        new_mean = torch.lerp(run_mean, mean, momentum)
        new_var = torch.lerp(run_var, unbiased, momentum)
        bn.running_mean.copy_(torch.where(use_batch, new_mean, run_mean))
        bn.running_var.copy_(torch.where(use_batch, new_var, run_var))
    return _BranchStats(mu, rstd, scale, bias - mu * scale, use_batch, n)


def _branch_backward(
    st: _BranchStats, mask: Tensor, sum_dy: Tensor, sum_dy_x: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BN backward of one branch from per-example sums (all (B, C)).

    Returns ``(k1, k2, k3, dgamma, dbeta)`` with ``dx = k1 * dy + k2 * x + k3`` per (b, c);
    rows not routed to the branch get zero coefficients.
    """
    dbeta = (mask * sum_dy).sum(0)  # (C,)
    dgamma = st.rstd * (mask * (sum_dy_x - st.mean * sum_dy)).sum(0)  # (C,) = sum dy * xhat
    n = st.count.clamp(min=1)
    k2 = torch.where(st.use_batch, -st.scale * st.rstd * dgamma / n, 0.0)
    k3 = torch.where(st.use_batch, -st.scale * dbeta / n, 0.0) - k2 * st.mean
    return mask * st.scale, mask * k2, mask * k3, dgamma, dbeta


def _policy_grad(
    sf: _BranchStats, ss: _BranchStats, sum_dy: Tensor, pf: Tensor, ps: Tensor
) -> Tensor:
    """Eq. 5 differentiated w.r.t. G: ``sum_hw dy * (y_F - y_S)``, (B, C)."""
    return sf.scale * pf + sf.shift * sum_dy - ss.scale * ps - ss.shift * sum_dy


class _GatedBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        xf: Tensor,
        xs: Tensor,
        g: Tensor,
        wf: Tensor,
        bf: Tensor,
        ws: Tensor,
        bs: Tensor,
        z: Tensor,
        sf: _BranchStats,
        ss: _BranchStats,
    ) -> Tensor:
        ctx.save_for_backward(xf, xs, g)
        ctx.stats = (sf, ss)
        sel = g > 0.5
        # A branch no example uses gets a zero input gradient, passed as a broadcast zero
        # (no memory pass), so that conv's backward can skip its work (e.g. S in a layer whose
        # policy is all-F) while still handing the optimizer zero weight gradients.
        ctx.used = (bool(sel.any()), not bool(sel.all()))
        scale = torch.where(sel, sf.scale, ss.scale)[:, :, None, None].to(z.dtype)  # (B, C, 1, 1)
        shift = torch.where(sel, sf.shift, ss.shift)[:, :, None, None].to(z.dtype)
        return torch.addcmul(shift, z, scale)  # Eq. 5, z = Eq. 1's selection

    @staticmethod
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        xf, xs, g = ctx.saved_tensors
        sf, ss = ctx.stats
        dy = dy.contiguous()
        a, pf = _per_example_sums(dy, xf)  # (B, C): sum_hw dy, sum_hw dy * xf
        _, ps = _per_example_sums(dy, xs)
        grads = []
        mask_f = g.to(a.dtype)  # statistics dtype (float32 under autocast)
        branches = ((xf, pf, mask_f, sf), (xs, ps, 1.0 - mask_f, ss))
        for (x, p, mask, st), used, need in zip(
            branches, ctx.used, ctx.needs_input_grad[:2], strict=True
        ):
            k1, k2, k3, dgamma, dbeta = _branch_backward(st, mask, a, p)
            dx = None
            if need and not used:
                dx = dy.new_zeros(()).expand_as(dy)
            elif need:
                k1, k2, k3 = (k[:, :, None, None].to(dy.dtype) for k in (k1, k2, k3))
                dx = torch.addcmul(k3, dy, k1)
                dx.addcmul_(x, k2)
            grads.append((dx, dgamma, dbeta))
        (dxf, dwf, dbf), (dxs, dws, dbs) = grads
        dg = _policy_grad(sf, ss, a, pf, ps).to(g.dtype) if ctx.needs_input_grad[2] else None
        return dxf, dxs, dg, dwf, dbf, dws, dbs, None, None, None


def _affine(bn: nn.BatchNorm2d, like: Tensor) -> tuple[Tensor, Tensor]:
    w = bn.weight if bn.weight is not None else torch.ones_like(like)
    b = bn.bias if bn.bias is not None else torch.zeros_like(like)
    return w, b


def gated_batch_norm(
    xf: Tensor,
    xs: Tensor,
    g: Tensor,
    bn_f: nn.BatchNorm2d,
    bn_s: nn.BatchNorm2d,
    *,
    training: bool,
    min_examples: int = 2,
    min_values: int = 16,
) -> Tensor:
    """Select per (example, channel) between two conv outputs and normalise each branch (Eq. 5).

    Args:
        xf: Output of the fine-tuned filters F, shape (B, C, H, W).
        xs: Output of the pretrained filters S, same shape.
        g: Policy, (B, C) with values in {0, 1} (1 = fine-tuned); may carry gradient.
        bn_f: BN of the F branch (affine parameters receive gradients).
        bn_s: BN of the S branch.
        training: Use masked batch statistics and update running statistics.
        min_examples: Minimum examples for a branch to use batch statistics on a channel.
        min_values: Minimum values (examples x H x W) for the same.

    Returns:
        The normalised, selected output, shape (B, C, H, W).
    """
    if xf.shape != xs.shape or xf.dim() != 4:
        raise ValueError(f"xf, xs must be equal (B, C, H, W) tensors, got {xf.shape}, {xs.shape}")
    g = g.to(xf.dtype)
    # Statistics in float32 under autocast (half-precision sums lose BN's accuracy).
    mask = g.detach().to(torch.float32 if _low(xf) else xf.dtype)
    hw = xf.shape[2] * xf.shape[3]
    with torch.no_grad():
        z = torch.where(mask[:, :, None, None] > 0.5, xf, xs)  # (B, C, H, W): Eq. 1
    # A branch's statistics only involve its routed (example, channel) planes, which are
    # exactly the planes of z: one statistics pass serves both branches.
    stats = _per_example_stats(z) if training else None
    sf = _branch_stats(stats, hw, mask, bn_f, min_examples, min_values)
    ss = _branch_stats(stats, hw, 1.0 - mask, bn_s, min_examples, min_values)
    return _GatedBNFunction.apply(
        xf, xs, g, *_affine(bn_f, sf.mean), *_affine(bn_s, ss.mean), z, sf, ss
    )
