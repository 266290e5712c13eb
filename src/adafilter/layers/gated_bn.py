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
and ``min_examples * H * W >= min_values`` values -- or holds every example in every channel (an
all-F or all-S layer), when it is a standard BN; otherwise it normalises that channel with its
running statistics (treated as constants, as in eval mode) and leaves them unchanged. Variances
are combined from per-example statistics with Chan's parallel formula, never as
``E[x^2] - E[x]^2``.

The gradient w.r.t. the policy is that of Eq. 5 with both BN outputs evaluated under their own
branch statistics: ``dL/dG[b, c] = sum_hw dL/dy * (BN_F(F(x)) - BN_S(S(x)))``. Which examples
enter a branch's statistics is a discrete choice and carries no gradient.

Everything is computed from per-(example, channel) reductions and fused multiply-adds: the
forward makes three passes over the selected output (select, statistics, normalise), the
backward two reductions and four fused multiply-adds; masked copies fed to two ``F.batch_norm``
calls would need several times that. On CUDA (eager), Triton kernels
(:mod:`adafilter.layers.kernels`) compute the per-plane statistics and the normalised
selection reading only the selected branch per plane, the per-channel arithmetic of both
branches (forward and backward) in one kernel each, and the backward's passes: seven launches
per layer and step (six kernels and the policy's min/max) where the eager arithmetic needed
about eighty (``benchmarks/launch_count.py``). On CPU the same six passes run as compiled
C++ where :mod:`adafilter.layers.cpu_gate` is built (:class:`~.cpu_gate.Passes`: one call
each, no full-size temporaries). ``capturable=True`` (and any ``torch.compile`` trace) uses
only traceable operations and no host reads, with the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import cpu_gate, kernels
from .capture import is_compiling


class BranchBatch(NamedTuple):
    """What one training batch holds for each branch of a gated BN (row 0 = F, row 1 = S),
    and the rule that decides whether a branch may learn statistics from it."""

    mean: Tensor  # (2, C) mean of the routed values
    var: Tensor  # (2, C) their biased variance
    values: Tensor  # (2, C) values routed (examples x H x W)
    examples: Tensor  # (2, C) examples routed
    batch: int  # examples in the batch
    min_examples: int  # the layer's bn_min_examples
    min_values: int  # the layer's bn_min_values


BranchStatsObserver = Callable[[tuple[nn.BatchNorm2d, nn.BatchNorm2d], BranchBatch], None]
_OBSERVER: ContextVar[BranchStatsObserver | None] = ContextVar("gated_bn_observer", default=None)


@contextmanager
def observe_branch_stats(observer: BranchStatsObserver) -> Iterator[None]:
    """Call ``observer`` with every gated BN's per-branch batch statistics in the block.

    Used to recompute running statistics exactly ("precise BN"): the observer receives a
    :class:`BranchBatch` per gated BN and batch -- the mean, biased variance and counts of the
    examples routed to each branch, and the minimum-examples rule, which it applies to its
    pooled counts as training applies it to one batch's.
    """
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def stored_variance(run_var: Tensor) -> Tensor:
    """The running variance a degenerate branch normalises with: a stored variance that is not
    positive (0 from a writer that saw one value, NaN) is no estimate, so BN's initial variance
    1 stands in for it; dividing by ``sqrt(0 + eps)`` would scale the channel by up to 1000x."""
    return torch.where(run_var > 0, run_var, torch.ones_like(run_var))


def _low(x: Tensor) -> bool:
    """Half/bfloat16 activations (autocast): statistics are then kept in float32."""
    return x.dtype in (torch.float16, torch.bfloat16)


def _per_example_stats(x: Tensor, capturable: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of every (example, channel) plane of ``x`` (B, C, H, W).

    On CPU, ``var_mean`` over the two inner dims runs a slow generic reduction (measured
    5-20x slower); viewing the batch as one example with B*C channels lets ATen's
    batch-norm statistics kernel (two-pass, stable) do the same work. ``capturable``: the
    generic reduction, which graph compilers can trace and fuse.
    """
    b, c, h, w = x.shape
    if x.device.type == "cpu" and not capturable:
        flat = x.float().reshape(1, b * c, h, w) if _low(x) else x.reshape(1, b * c, h, w)
        mean, var = torch.ops.aten.batch_norm_update_stats(flat, None, None, 0.0)
        return mean.view(b, c), var.view(b, c)
    var, mean = torch.var_mean(x.float() if _low(x) else x, dim=(2, 3), correction=0)
    return mean, var


def _per_example_sums(
    dy: Tensor, xf: Tensor, xs: Tensor, capturable: bool = False
) -> tuple[Tensor, Tensor]:
    """``sum_hw dy`` (B, C) and ``sum_hw dy * x`` for both branches, stacked (2, B, C).

    On CPU, BN's backward kernel with mean 0 and inverse std 1 computes exactly these two sums
    as its bias and weight gradients, in one pass (8x faster than ``einsum`` at 56x56 here).
    ``capturable``: plain reductions, which graph compilers can trace and fuse.
    """
    b, c, h, w = dy.shape
    if dy.device.type == "cpu" and not capturable:
        if _low(dy):
            dy, xf, xs = dy.float(), xf.float(), xs.float()
        zeros = dy.new_zeros(b * c)
        ones = dy.new_ones(b * c)
        flat_dy = dy.reshape(1, b * c, h, w)
        out = []
        for x in (xf, xs):
            _, s_dyx, s_dy = torch.ops.aten.native_batch_norm_backward(
                flat_dy,
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
            out.append(s_dyx.view(b, c))
        return s_dy.view(b, c), torch.stack(out)
    if _low(dy):  # autocast: accumulate in float32
        a = dy.sum((2, 3), dtype=torch.float32)
        p = [(dy * x).sum((2, 3), dtype=torch.float32) for x in (xf, xs)]
        return a, torch.stack(p)
    return dy.sum((2, 3)), torch.stack([torch.einsum("bchw,bchw->bc", dy, x) for x in (xf, xs)])


class _Stats(NamedTuple):
    """Per-channel statistics of both branches, stacked: row 0 = F, row 1 = S (each (2, C)).

    Stacking halves the number of small tensor operations per layer, which is what a GPU
    step of this layer is bound by. A tuple of tensors, so that it passes through
    ``save_for_backward`` and graph capture like any other autograd input.
    """

    mean: Tensor
    rstd: Tensor
    scale: Tensor
    shift: Tensor
    use_batch: Tensor  # bool: the branch normalises the channel with its batch statistics
    count: Tensor  # values (examples x H x W) in the branch
    # (5, 2, C) float32 [mean, rstd, scale, shift, count] where the Triton kernel made them
    # (the fields above are its rows), for the backward kernel; else None
    packed: Tensor | None = None


def _stacked(bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d], dtype: torch.dtype) -> list[Tensor]:
    """``[weight, bias, running_mean, running_var]`` of both BNs, each (2, C), in ``dtype``."""
    out = []
    for get in (
        lambda bn: bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean),
        lambda bn: bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean),
        lambda bn: bn.running_mean,
        lambda bn: bn.running_var,
    ):
        out.append(torch.stack([get(bn).detach() for bn in bns]).to(dtype))
    return out


def _shared(bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d], name: str) -> float | Tensor:
    """BN hyper-parameter ``name`` (e.g. ``eps``): a scalar if both BNs agree, else (2, 1)."""
    a, b = (getattr(bn, name) for bn in bns)
    if a == b:
        return a
    return torch.tensor([[a], [b]], device=bns[0].running_mean.device)


def _both_stats(
    stats: tuple[Tensor, Tensor] | None,
    hw: int,
    masks: Tensor,
    bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d],
    min_examples: int,
    min_values: int,
    capturable: bool = False,
) -> _Stats:
    """Statistics of both branches; updates the BNs' running statistics in training.

    Args:
        stats: Per-example ``(mean, biased var)``, each (B, C), of the selected output;
            ``None`` in eval mode (running statistics).
        hw: Spatial size H * W of that output.
        masks: (2, B, C): 1. where the example's channel is routed to F (row 0) / S (row 1).
        capturable: No host reads (a cumulative moving average's factor stays a tensor).
    """
    weight, bias, run_mean, run_var = _stacked(bns, masks.dtype)  # (2, C) each
    eps = _shared(bns, "eps")
    if stats is None:
        rstd = torch.rsqrt(run_var + eps)
        scale = weight * rstd
        false = torch.zeros_like(run_mean, dtype=torch.bool)
        return _Stats(run_mean, rstd, scale, bias - run_mean * scale, false, run_mean * 0)

    mean_bc, var_bc = stats
    k = masks.sum(1)  # (2, C) examples routed to each branch
    n = k * hw  # (2, C) values
    mean = (masks * mean_bc).sum(1) / k.clamp(min=1)  # (2, C)
    # Chan et al.: M2 = sum_b [M2_b + hw * (mean_b - mean)^2] over the branch's examples.
    m2 = (masks * (var_bc + (mean_bc - mean[:, None]) ** 2)).sum(1) * hw
    var = m2 / n.clamp(min=1)
    observer = _OBSERVER.get()
    if observer is not None:
        batch = masks.shape[1]
        observer(
            bns, BranchBatch(mean.detach(), var.detach(), n, k, batch, min_examples, min_values)
        )
    # A branch holding every example in every channel (an all-F or all-S layer) is a standard
    # BN, so it uses batch statistics whenever nn.BatchNorm2d would (more than one value):
    # all-F AdaFilter == fine-tuning, also where feature maps are tiny.
    whole = (k == masks.shape[1]).all(1, keepdim=True) & (n > 1)  # (2, C)
    use_batch = ((k >= min_examples) & (n >= min_values)) | whole
    mu = torch.where(use_batch, mean, run_mean)
    rstd = torch.rsqrt(torch.where(use_batch, var, stored_variance(run_var)) + eps)
    scale = weight * rstd
    with torch.no_grad():
        for bn in bns:
            bn.num_batches_tracked.add_(1)
        # momentum None: cumulative moving average, as nn.BatchNorm2d
        if capturable and any(bn.momentum is None for bn in bns):
            mom: float | Tensor = torch.stack(
                [
                    1.0 / bn.num_batches_tracked.to(masks.dtype)
                    if bn.momentum is None
                    else masks.new_tensor(bn.momentum)
                    for bn in bns
                ]
            )[:, None]  # (2, 1)
        else:
            m = [
                1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                for bn in bns
            ]
            mom = m[0] if m[0] == m[1] else masks.new_tensor([[m[0]], [m[1]]])
        unbiased = var * n / (n - 1).clamp(min=1)
        new_mean = torch.where(use_batch, torch.lerp(run_mean, mean, mom), run_mean)
        new_var = torch.where(use_batch, torch.lerp(run_var, unbiased, mom), run_var)
        for i, bn in enumerate(bns):
            bn.running_mean.copy_(new_mean[i])
            bn.running_var.copy_(new_var[i])
    return _Stats(mu, rstd, scale, bias - mu * scale, use_batch, n)


def _fusable(bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d], mask: Tensor) -> bool:
    """:func:`kernels.branch_stats` covers these BNs (affine, float32 running statistics, a
    set momentum) and no observer wants the raw statistics."""
    return (
        mask.dtype == torch.float32
        and _OBSERVER.get() is None
        and all(
            bn.weight is not None
            and bn.bias is not None
            and bn.momentum is not None
            and bn.running_mean is not None
            and bn.running_mean.dtype == torch.float32
            for bn in bns
        )
    )


def _kernel_stats(
    ops: Any,
    stats: tuple[Tensor, Tensor],
    hw: int,
    mask: Tensor,
    bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d],
    min_examples: int,
    min_values: int,
) -> _Stats:
    """:func:`_both_stats` (training) as one kernel (``ops``: :mod:`.kernels` or
    :class:`.cpu_gate.Passes`): the same statistics, rules and running-statistics update."""
    packed, use = ops.branch_stats(
        *stats, mask, hw, bns, min_examples=min_examples, min_values=min_values
    )
    mean, rstd, scale, shift, count = packed.unbind(0)  # (2, C) each
    return _Stats(mean, rstd, scale, shift, use, count, packed)


def _backward_coeffs(
    st: _Stats, masks: Tensor, sum_dy: Tensor, sum_dy_x: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BN backward of both branches from per-example sums.

    Args:
        masks: (2, B, C) routing masks.
        sum_dy: (B, C) ``sum_hw dy``.
        sum_dy_x: (2, B, C) ``sum_hw dy * x`` of each branch's input.

    Returns:
        ``(k1, k2, k3, dgamma, dbeta)``: (2, B, C) coefficients with
        ``dx = k1 * dy + k2 * x + k3`` per branch and (example, channel) -- zero on rows not
        routed to the branch -- and the (2, C) affine gradients.
    """
    dbeta = (masks * sum_dy).sum(1)  # (2, C)
    dgamma = st.rstd * (masks * (sum_dy_x - st.mean[:, None] * sum_dy)).sum(1)  # sum dy * xhat
    n = st.count.clamp(min=1)
    k2 = torch.where(st.use_batch, -st.scale * st.rstd * dgamma / n, 0.0)
    k3 = torch.where(st.use_batch, -st.scale * dbeta / n, 0.0) - k2 * st.mean
    return masks * st.scale[:, None], masks * k2[:, None], masks * k3[:, None], dgamma, dbeta


def _policy_grad(st: _Stats, sum_dy: Tensor, sum_dy_x: Tensor) -> Tensor:
    """Eq. 5 differentiated w.r.t. G: ``sum_hw dy * (y_F - y_S)``, (B, C)."""
    t = st.scale[:, None] * sum_dy_x + st.shift[:, None] * sum_dy  # (2, B, C)
    return t[0] - t[1]


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
        z: Tensor | None,
        ops: Any,
        mask: Tensor,
        source: Tensor | None,
        remake: Callable[[Tensor], Tensor] | None,
        capturable: bool,
        *stats: Tensor | None,
    ) -> Tensor:
        st = _Stats(*stats)
        # with ``remake``, S's output is recomputed from its input in the backward rather than
        # kept (one conv-output activation less per layer, one more conv forward)
        ctx.save_for_backward(xf, xs if remake is None else source, mask, *st)
        ctx.remake = remake
        ctx.capturable = capturable
        ctx.ops = ops  # the kernels (or compiled CPU passes) ran the forward: also the backward
        # A branch no example uses gets a zero input gradient, passed as a broadcast zero
        # (no memory pass), so that conv's backward can skip its work (e.g. S in a layer whose
        # policy is all-F) while still handing the optimizer zero weight gradients.
        # (Only on CPU and not captured: on a GPU the host read would stall the launch queue
        # every layer, and a captured graph cannot branch on it.)
        skip = g.device.type == "cpu" and not capturable
        sel = g > 0.5 if skip or ops is None else None  # (no launch the kernels do not need)
        ctx.used = (
            (bool(sel.any()), not bool(sel.all())) if sel is not None and skip else (True, True)
        )
        if ops is not None:  # select (Eq. 1) and normalise (Eq. 5) in one pass, z never built
            return ops.select_affine(xf, xs, mask, st.scale, st.shift)
        scale = torch.where(sel, st.scale[0], st.scale[1])[:, :, None, None]  # (B, C, 1, 1)
        shift = torch.where(sel, st.shift[0], st.shift[1])[:, :, None, None]
        return torch.addcmul(shift.to(z.dtype), z, scale.to(z.dtype))  # Eq. 5, z = Eq. 1

    @staticmethod
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        xf, xs, mask, *stats = ctx.saved_tensors
        if ctx.remake is not None:
            xs = ctx.remake(xs)  # saved: S's input
        st = _Stats(*stats)
        dy = dy.contiguous()
        if ctx.ops is not None:  # one pass for the per-plane sums, one kernel for the coefficients
            a, p = ctx.ops.plane_sums(dy, xf, xs)  # (B, C), (2, B, C)
            coeffs, dgb, dg = ctx.ops.branch_coeffs(mask, _packed(st), st.use_batch, a, p)
            k1, k2, k3 = coeffs  # (2, B, C) each
            dgamma, dbeta = dgb.to(mask.dtype)  # (2, C) each
        else:
            a, p = _per_example_sums(dy, xf, xs, ctx.capturable)
            masks = torch.stack([mask, 1.0 - mask])  # (2, B, C): routed to F / to S
            k1, k2, k3, dgamma, dbeta = _backward_coeffs(st, masks, a, p)  # (2, B, C) each
            dg = _policy_grad(st, a, p) if ctx.needs_input_grad[2] else None
        dxs: list[Tensor | None] = []
        if isinstance(ctx.ops, cpu_gate.Passes):
            dxs += _compiled_grads(ctx, dy, xf, xs, mask, coeffs)
        elif ctx.ops is not None and all(ctx.needs_input_grad[:2]):
            dxs += ctx.ops.branch_grads(dy, xf, xs, mask, coeffs)
        else:
            k1, k2, k3 = (k[:, :, :, None, None].to(dy.dtype) for k in (k1, k2, k3))
            for i, (x, used, need) in enumerate(
                zip((xf, xs), ctx.used, ctx.needs_input_grad[:2], strict=True)
            ):
                if not need:
                    dxs.append(None)
                elif not used:
                    dxs.append(dy.new_zeros(()).expand_as(dy))
                else:
                    dx = torch.addcmul(k3[i], dy, k1[i])
                    dxs.append(dx.addcmul_(x, k2[i]))
        # g entered in the activations' dtype (float32 statistics under autocast)
        dg = dg.to(dy.dtype) if dg is not None and ctx.needs_input_grad[2] else None
        return (
            dxs[0],
            dxs[1],
            dg,
            dgamma[0],
            dbeta[0],
            dgamma[1],
            dbeta[1],
            *([None] * 6),  # z, ops, mask, source, remake, capturable
            *([None] * len(stats)),
        )


def _compiled_grads(
    ctx: Any, dy: Tensor, xf: Tensor, xs: Tensor, mask: Tensor, k: Tensor
) -> list[Tensor | None]:
    """Both branches' input gradients in one compiled CPU pass (``k`` (3, 2, B, C)); a branch
    no example uses gets a broadcast zero (its conv's backward skips it), one nobody asks for
    ``None``."""
    want = [need and used for need, used in zip(ctx.needs_input_grad[:2], ctx.used, strict=True)]
    grads = ctx.ops.branch_grads(dy, xf, xs, mask, k, want=tuple(want))
    zero = dy.new_zeros(()).expand_as(dy)
    return [
        (g if w else zero) if need else None
        for g, w, need in zip(grads, want, ctx.needs_input_grad[:2], strict=True)
    ]


def _passes(xf: Tensor, xs: Tensor, capturable: bool) -> Any:
    """The per-plane passes for these branch outputs: the Triton kernels (:mod:`.kernels`:
    CUDA, eager or CUDA-graph capture), the compiled CPU passes (:class:`.cpu_gate.Passes`:
    float32 CPU tensors, not captured, where built), or ``None`` (the ATen path; also under
    ``torch.compile``, which fuses its own)."""
    if is_compiling() or not (xf.is_contiguous() and xs.is_contiguous()):
        return None
    if kernels.available(xf):
        return kernels
    if capturable or xf.device.type != "cpu" or not cpu_gate.ENABLED:
        return None
    if not xf.dtype == xs.dtype == torch.float32:
        return None
    module = cpu_gate.get()  # where built; a forward never builds
    return cpu_gate.Passes(module) if module is not None and hasattr(module, "bn_coeffs") else None


def _packed(st: _Stats) -> Tensor:
    """(5, 2, C) float32 [mean, rstd, scale, shift, count] for :func:`kernels.branch_coeffs`:
    the forward kernel's own buffer, else stacked (statistics from the eager path)."""
    if st.packed is not None:
        return st.packed
    return torch.stack([st.mean, st.rstd, st.scale, st.shift, st.count]).to(torch.float32)


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
    capturable: bool = False,
    remake_xs: tuple[Tensor, Callable[[Tensor], Tensor]] | None = None,
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
        capturable: No host synchronisation and only traceable operations (for
            ``torch.compile`` and CUDA graphs); the same results as the default path, which
            uses faster ATen kernels on CPU and skips the backward of an unused branch.
        remake_xs: ``(x, fn)`` with ``fn(x) == xs`` exactly (S's conv and its input): the
            backward recomputes ``xs`` instead of keeping it (activation memory for compute).

    Returns:
        The normalised, selected output, shape (B, C, H, W).
    """
    if xf.shape != xs.shape or xf.dim() != 4:
        raise ValueError(f"xf, xs must be equal (B, C, H, W) tensors, got {xf.shape}, {xs.shape}")
    g = g.to(xf.dtype)
    # Statistics in float32 under autocast (half-precision sums lose BN's accuracy).
    mask = g.detach().to(torch.float32 if _low(xf) else xf.dtype)  # (B, C): 1 = routed to F
    hw = xf.shape[2] * xf.shape[3]
    bns = (bn_f, bn_s)
    # A branch's statistics only involve its routed (example, channel) planes, which are
    # exactly the planes of the selection z: one statistics pass serves both branches.
    z: Tensor | None = None
    ops = _passes(xf, xs, capturable)
    if ops is not None:  # per-plane passes that read only the selected branch
        mask = mask.contiguous()
        stats = ops.plane_stats(xf, xs, mask) if training else None
    else:
        with torch.no_grad():
            z = torch.where(mask[:, :, None, None] > 0.5, xf, xs)  # (B, C, H, W): Eq. 1
        stats = _per_example_stats(z, capturable) if training else None
    if stats is not None and ops is not None and _fusable(bns, mask):
        st = _kernel_stats(ops, stats, hw, mask, bns, min_examples, min_values)
    else:
        masks = torch.stack([mask, 1.0 - mask])  # (2, B, C): routed to F / to S
        st = _both_stats(stats, hw, masks, bns, min_examples, min_values, capturable)
    return _GatedBNFunction.apply(
        xf,
        xs,
        g,
        *_affine(bn_f, st.mean[0]),
        *_affine(bn_s, st.mean[1]),
        z,
        ops,
        mask,
        *(remake_xs if remake_xs is not None else (None, None)),
        capturable,
        *st,
    )
