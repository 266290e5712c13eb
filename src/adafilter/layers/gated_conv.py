"""A conv layer with a frozen pretrained copy S and a trainable copy F, and its BN (Eqs. 1, 5).

The module replaces a ``Conv2d`` that is directly followed by a ``BatchNorm2d``; the BN moves
inside (the model's own BN slot becomes ``nn.Identity``), because selection and normalisation
are one operation here.

The policy is not stored on the module: during a forward pass of the owning model a
*policy source* is active in a context variable (see :func:`policy_source`), and each layer asks
it for its decisions with its fixed index. Nothing of a forward pass outlives it.

Inference (eval mode, gradients off) runs a single-conv path: each BN is an affine map, so it is
folded into its filters once (cached until the parameters change), and every output filter is
computed once per example -- at batch 1 with a per-filter merged weight, at larger batches by
computing only the filters some example uses and gathering each example's channels.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cache, cpu_gate
from .cache import TensorsKey
from .capture import is_compiling, is_dynamo_compiling
from .gated_bn import gated_batch_norm


class PolicySource(Protocol):
    """What a gated layer asks for its decisions during a forward pass."""

    def policy(self, index: int, x: Tensor) -> Tensor:
        """Return the (B, C_out) policy of gated layer ``index`` given its input ``x``.

        Values are 0./1. floats (1 = fine-tuned filter) that may carry gradient, or bools
        (True = fine-tuned) when gradients are off.
        """
        ...

    def compiled_state(self) -> tuple[Tensor, Tensor] | None:
        """Instead of :meth:`policy` (batch-1 CPU inference): the gate state a layer's compiled
        code starts from, or ``None`` where the policy must come from :meth:`policy`."""
        ...

    def compiled_step(self, index: int, x: Tensor) -> cpu_gate.LayerStep | None:
        """The compiled gate step for layer ``index`` to bind with its filters, or ``None``."""
        ...

    def record(self, index: int, decisions: Tensor, state: tuple[Tensor, Tensor]) -> None:
        """The decisions and gate state of a layer that ran :meth:`compiled_step`."""
        ...


_SOURCE: ContextVar[PolicySource | None] = ContextVar("adafilter_policy_source", default=None)
# Sources activated while torch.compile traces: ContextVar.set() cannot be traced, a list's
# append/pop can. Only the tracer sees this stack; a compiled graph never reads it.
_TRACED_SOURCES: list[PolicySource] = []


@contextlib.contextmanager
def policy_source(source: PolicySource) -> Iterator[None]:
    """Make ``source`` answer the gated layers' policy requests inside the ``with`` block."""
    if is_dynamo_compiling():
        _TRACED_SOURCES.append(source)
        try:
            yield
        finally:
            _TRACED_SOURCES.pop()
        return
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def current_policy_source() -> PolicySource | None:
    """The innermost active :func:`policy_source` (``None`` outside every block)."""
    if _TRACED_SOURCES:
        return _TRACED_SOURCES[-1]
    return _SOURCE.get()


SUBSET_MAX_FRACTION = 0.8  # backward on a filter subset only below this share of filters
DUAL_EVAL_FRACTION = 0.95  # eval, batch > 1: both full convs when this share is needed from each


class _SubsetBackwardConv(torch.autograd.Function):
    """A conv whose backward only computes the filters some example of the batch uses.

    Under Eq. 1 the gradient reaching branch output ``F(x)[b, c]`` is zero wherever
    ``G[b, c] = 0`` (and ``S(x)[b, c]`` where ``G[b, c] = 1``). A filter that no example of
    the batch takes from this branch therefore has a zero weight gradient and adds nothing to
    ``dL/dx``: the transposed and weight convolutions run on the used filters only (with
    learned policies most filters have a fixed choice, see README). Its weight gradient is
    returned as zeros, so optimizers see exactly what plain autograd would give them.
    ``need`` (C,) bool marks the filters some example uses.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, need: Tensor, conv: nn.Conv2d
    ) -> Tensor:
        ctx.save_for_backward(x, weight, need)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, need = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        want_b = want_b and ctx.has_bias
        idx, dy_u, w_u = _used_filters(dy, weight, need, ctx.conv.groups)
        gx = gw = gb = None
        if dy_u is not None:  # an unused branch gets no real gradient from the caller
            gx, gw, gb = _conv_backward(ctx.conv, dy_u, x, w_u, [want_x, want_w, want_b])
        gx = gx.to(x.dtype) if gx is not None else None
        gw = _scatter(gw, idx, weight) if want_w else None
        gb = _scatter(gb, idx, weight.new_empty(weight.shape[0])) if want_b else None
        return gx, gw, gb, None, None


def _used_filters(
    dy: Tensor, weight: Tensor, need: Tensor, groups: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(idx, dy, w)`` restricted to the filters some example uses (``need`` (C,) bool).

    ``idx`` is ``None`` when all filters are kept: gathering ``dy`` costs a pass over it, worth
    it only when a good share of filters drops out (and never for a grouped conv, whose subset
    would also regroup its inputs). ``dy`` and ``w`` are ``None`` when no filter is used.
    """
    n = int(need.sum())
    if n == 0:
        return None, None, None
    if n <= SUBSET_MAX_FRACTION * weight.shape[0] and groups == 1:
        idx = need.nonzero().squeeze(1)
        return idx, dy.index_select(1, idx), weight.index_select(0, idx)
    return None, dy, weight


def _conv_backward(conv: nn.Conv2d, dy: Tensor, x: Tensor, w: Tensor, mask: list[bool]) -> tuple:
    """``conv``'s backward for output gradient ``dy`` and filters ``w``; ``mask`` picks
    (input, weight, bias) gradients. Computed in ``dy``'s dtype: under autocast the forward ran
    in it."""
    return torch.ops.aten.convolution_backward(
        dy,
        x.to(dy.dtype),
        w.to(dy.dtype),
        [w.shape[0]] if mask[2] else None,
        conv.stride,
        conv.padding,
        conv.dilation,
        False,
        [0, 0],
        conv.groups,
        mask,
    )


class _DualConv(torch.autograd.Function):
    """F and S of one layer with one transposed conv in the backward (training, CPU).

    Computed as two autograd convs, each branch's backward writes a full ``dL/dx`` that autograd
    then adds. When both branches are used on filter subsets only (learned policies: most
    filters have a fixed choice, see README), the backward here gathers the used filters of
    both branches (Eq. 1: the others receive zero gradient) and runs ONE transposed conv over
    them, plus F's weight gradient on its used filters: on a CPU the layers that map many
    channels to few are bound by writing ``dL/dx``, so this removes about half of their
    backward. Otherwise (every filter needed from a branch, e.g. random policies) the gather
    would cost more than it saves and each branch runs its own backward, as
    :class:`_SubsetBackwardConv`. Same gradients as autograd through two convs, up to
    summation order. ``need_f``/``need_s`` (C,) bool mark the filters some example takes from
    each branch. (The forward stays two convs: one conv over the concatenated filters measured
    slower here.)
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w_f: Tensor,
        b_f: Tensor | None,
        w_s: Tensor,
        b_s: Tensor | None,
        need_f: Tensor,
        need_s: Tensor,
        conv: nn.Conv2d,
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, w_f, w_s, need_f, need_s)
        ctx.conv, ctx.has_bias = conv, b_f is not None
        args = (conv.stride, conv.padding, conv.dilation)
        return F.conv2d(x, w_f, b_f, *args), F.conv2d(x, w_s, b_s, *args)  # (B, C, H', W')

    @staticmethod
    def backward(ctx: Any, dy_f: Tensor, dy_s: Tensor):  # type: ignore[override]
        x, w_f, w_s, need_f, need_s = ctx.saved_tensors
        conv = ctx.conv
        want_x, want_wf, want_bf, want_ws, want_bs = ctx.needs_input_grad[:5]
        c = w_f.shape[0]
        # per branch: used filter indices (None: all) and their gradients and filters
        branches = [
            (_used_filters(dy_f, w_f, need_f, 1), w_f, want_wf, want_bf and ctx.has_bias),
            (_used_filters(dy_s, w_s, need_s, 1), w_s, want_ws, want_bs and ctx.has_bias),
        ]
        used = [u for u, *_ in branches if u[1] is not None]
        fuse = want_x and len(used) == 2 and all(idx is not None for idx, _, _ in used)
        gx = None
        if fuse:  # one dL/dx over both branches' used filters
            dy_cat = torch.cat([used[0][1], used[1][1]], 1)
            w_cat = torch.cat([used[0][2], used[1][2]])
            gx = _conv_backward(conv, dy_cat, x, w_cat, [True, False, False])[0]
        grads: list[Tensor | None] = []
        for (idx, dy, sub_w), w, want_w, want_b in branches:
            want_gx = want_x and not fuse and dy is not None
            gw_u = gb_u = None
            if dy is not None and (want_gx or want_w or want_b):
                gx_u, gw_u, gb_u = _conv_backward(conv, dy, x, sub_w, [want_gx, want_w, want_b])
                if want_gx:
                    gx = gx_u if gx is None else gx.add_(gx_u)
            grads += [_scatter(gw_u, idx, w) if want_w else None]
            grads += [_scatter(gb_u, idx, w.new_empty(c)) if want_b else None]
        gx = gx.to(x.dtype) if gx is not None else None
        return gx, grads[0], grads[1], grads[2], grads[3], None, None, None


def _scatter(part: Tensor | None, idx: Tensor | None, like: Tensor) -> Tensor:
    """A gradient over all filters from that of the used ones (``idx``; ``None``: all)."""
    if part is None:
        return torch.zeros_like(like)
    if idx is None:
        return part.to(like.dtype)
    return torch.zeros_like(like).index_copy_(0, idx, part.to(like.dtype))


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> np.ndarray:
    """``t``'s memory as a numpy array of same-size integers (bfloat16 has no numpy dtype;
    copying bits is exact for every dtype)."""
    return t.view(_SAME_SIZE_INT[t.element_size()]).numpy()


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = x * scale + shift`` (C,) each."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


class _Merged(NamedTuple):
    """The batch-1 merged filter bank, numpy views of it and of its sources, and its lock."""

    bank: cpu_gate.FilterBank
    views: list  # [decisions (C,), (merged, F, S) weight bits, (merged, F, S) bias bits]
    lock: threading.Lock


class GatedConv2dBN(nn.Module):
    """Gated conv + (gated) BN: ``y = G * BN_F(F(x)) + (1 - G) * BN_S(S(x))``.

    Args:
        conv: The pretrained conv; it becomes the frozen copy S (``conv_s``).
        bn: The BN that directly follows ``conv``; it becomes ``bn_s`` and a copy ``bn_f``.
        index: This layer's position in the gate's execution order.
        gated_bn: ``False`` keeps one standard BN after the selection (Table 3 ablation).
        bn_min_examples: See :func:`adafilter.layers.gated_bn.gated_batch_norm`.
        bn_min_values: See :func:`adafilter.layers.gated_bn.gated_batch_norm`.
        fast_eval: Use the single-conv inference path in eval mode without gradients.
        fixed_stats: Normalise with the running statistics in training too and never update
            them (a frozen BN, e.g. ``torchvision.ops.FrozenBatchNorm2d``, converted to
            ``bn``); the affine parameters still train.
        recompute_s: Training with the gated BN: recompute S's conv output in the backward
            instead of keeping it (``AdaFilterConfig.recompute_pretrained``).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        *,
        index: int,
        gated_bn: bool = True,
        bn_min_examples: int = 2,
        bn_min_values: int = 16,
        fast_eval: bool = True,
        fixed_stats: bool = False,
        recompute_s: bool = False,
    ) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero-padded convs can be gated, got {conv.padding_mode!r}")
        if bn.num_features != conv.out_channels:
            raise ValueError("the BN after a gated conv must have one feature per filter")
        self.index = index
        self.gated_bn = gated_bn
        self.bn_min_examples = bn_min_examples
        self.bn_min_values = bn_min_values
        self.fast_eval = fast_eval
        self.fixed_stats = fixed_stats
        self.recompute_s = recompute_s
        self.subset_backward = True  # False: plain autograd through both convs (reference)
        self.dual_conv = True  # False: F and S as two convs on the subset path (A/B)
        # accelerators, eval at batch > 1: the CPU's filter subsets (only the filters some
        # example takes from each branch) at one host read per layer, instead of both full
        # convs and a select; off until a GPU measures it (benchmarks/speed.py, "subsets")
        self.device_subsets = False
        # True: no host reads, caches or data-dependent shapes (torch.compile, CUDA graphs);
        # also taken whenever torch.compile traces the layer. Same results either way.
        self.capturable = False
        self.conv_s = conv  # frozen pretrained filters S (the original module)
        self.conv_f = copy.deepcopy(conv)  # trainable filters F, same initial weights
        if gated_bn:
            self.bn_s = bn
            self.bn_f = copy.deepcopy(bn)
        else:
            self.bn = bn
        self._fold_key: TensorsKey | None = None
        self._fold: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._merged: _Merged | None = None  # batch-1 merged filters (see _bank)
        self._plan: tuple[Any, threading.Lock] | None = None  # bound compiled call (_bind)
        self._plan_epoch = -1

    @property
    def in_channels(self) -> int:
        return self.conv_s.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv_s.out_channels

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        c = self.conv_s
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: Tensor) -> Tensor:
        source = current_policy_source()
        if source is None:
            raise RuntimeError(
                "a gated layer ran outside an AdaFilterModel forward; call the wrapping model"
            )
        capturable = self.capturable or is_compiling()
        fast = not self.training and self.fast_eval and not torch.is_grad_enabled()
        if fast and not capturable and x.shape[0] == 1 and x.device.type == "cpu":
            y = self._forward_compiled(source, x)
            if y is not None:
                return y
        g = source.policy(self.index, x)  # (B, C_out) in {0, 1}
        if fast:
            sel = g if g.dtype == torch.bool else g > 0.5  # (B, C_out)
            if capturable:
                return self._forward_fast_capturable(x, sel)
            return self._forward_fast(x, sel)
        xf, xs = self._branches(x, g, capturable)  # (B, C_out, H', W') each
        return self._select(xf, xs, g, capturable, x)

    def _branches(self, x: Tensor, g: Tensor, capturable: bool) -> tuple[Tensor, Tensor]:
        """Both convs' outputs, ``F(x)`` and ``S(x)``; on CPU with gradients, their backward
        only on the filters some example routes to each branch (see the module's autograd
        functions)."""
        # Skipping unused filters needs their count on the host: free on CPU, but on a GPU
        # that read would stall the launch queue once per layer, which costs more than it saves.
        subset = self.subset_backward and x.device.type == "cpu" and not capturable
        f, s_ = self.conv_f, self.conv_s
        if not (torch.is_grad_enabled() and subset):
            return self._conv(x, f.weight, f.bias), self._conv(x, s_.weight, s_.bias)
        sel = g.detach() > 0.5  # (B, C)
        conv = _SubsetBackwardConv.apply
        if not g.requires_grad and bool(sel.all()):
            # A fixed all-F policy (no policy gradient wants BN_S(S x)): S is never read.
            xf = conv(x, f.weight, f.bias, sel.any(0), f)
            return xf, xf.detach()
        if self.dual_conv and s_.groups == 1:
            return _DualConv.apply(
                x, f.weight, f.bias, s_.weight, s_.bias, sel.any(0), ~sel.all(0), s_
            )
        xf = conv(x, f.weight, f.bias, sel.any(0), f)
        return xf, conv(x, s_.weight, s_.bias, ~sel.all(0), s_)

    def _select(self, xf: Tensor, xs: Tensor, g: Tensor, capturable: bool, x: Tensor) -> Tensor:
        """Eq. 1 and the BN after it: the gated BN (Eq. 5), or one standard BN (ablation)."""
        if self.gated_bn:
            # (an all-F step without a policy gradient passes F's output as S's: nothing kept)
            remake = (
                self.recompute_s
                and torch.is_grad_enabled()
                and not is_compiling()
                and xs.data_ptr() != xf.data_ptr()
            )
            return gated_batch_norm(
                xf,
                xs,
                g,
                self.bn_f,
                self.bn_s,
                training=self.training and not self.fixed_stats,
                min_examples=self.bn_min_examples,
                min_values=self.bn_min_values,
                capturable=capturable,
                remake_xs=(x, self._remake_s(xs)) if remake else None,
            )
        gate = g.to(xf.dtype)[:, :, None, None]  # (B, C, 1, 1)
        z = xs + gate * (xf - xs)  # Eq. 1, then one standard BN
        if self.fixed_stats:  # a frozen BN: running statistics in training too
            bn = self.bn
            return F.batch_norm(
                z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        return self.bn(z)

    def _remake_s(self, xs: Tensor) -> Callable[[Tensor], Tensor]:
        """S's conv as this forward ran it, for the backward to recompute its output ``xs``
        from the input instead of keeping it (``recompute_s``): in ``xs``'s dtype, to which
        autocast had cast the conv's inputs."""
        dtype = xs.dtype

        def remake(inp: Tensor) -> Tensor:
            w, b = self.conv_s.weight.to(dtype), self.conv_s.bias
            with torch.no_grad(), torch.autocast(inp.device.type, enabled=False):
                return self._conv(inp.to(dtype), w, None if b is None else b.to(dtype))

        return remake

    # ---- inference path ------------------------------------------------------------------

    def _folded(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """BN folded into each branch's filters: (w_f, b_f, w_s, b_s), cached."""
        if self._fold is not None and self._fold_key is not None and self._fold_key.valid():
            return self._fold
        bn_f = self.bn_f if self.gated_bn else self.bn
        bn_s = self.bn_s if self.gated_bn else self.bn
        tensors = [self.conv_f.weight, self.conv_s.weight, self.conv_f.bias, self.conv_s.bias]
        for bn in (bn_f, bn_s):
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        with torch.no_grad():
            folded = []
            for conv, bn in ((self.conv_f, bn_f), (self.conv_s, bn_s)):
                scale, shift = bn_affine(bn)
                w = conv.weight * scale.view(-1, 1, 1, 1)
                b = shift if conv.bias is None else conv.bias * scale + shift
                folded += [w.contiguous(), b.contiguous()]
        self._fold = (folded[0], folded[1], folded[2], folded[3])
        self._fold_key = TensorsKey(tensors)
        self._merged = None
        return self._fold

    def _forward_fast_capturable(self, x: Tensor, sel: Tensor) -> Tensor:
        """:meth:`_forward_fast` without caches, host reads or data-dependent shapes.

        BN is folded into both filter banks inside the graph (a compiled graph fuses it), then
        batch 1 runs one conv with the example's merged filters and a larger batch runs both
        folded convs and selects per (example, channel) (Eq. 1).
        """
        bn_f = self.bn_f if self.gated_bn else self.bn
        bn_s = self.bn_s if self.gated_bn else self.bn
        folded = []
        for conv, bn in ((self.conv_f, bn_f), (self.conv_s, bn_s)):
            scale, shift = bn_affine(bn)  # (C,) each
            w = conv.weight * scale.view(-1, 1, 1, 1)
            folded += [w, shift if conv.bias is None else conv.bias * scale + shift]
        w_f, b_f, w_s, b_s = folded
        if x.shape[0] == 1:  # one merged filter bank
            sel0 = sel[0]  # (C,)
            w = torch.where(sel0.view(-1, 1, 1, 1), w_f, w_s)
            return self._conv(x, w, torch.where(sel0, b_f, b_s))
        return torch.where(  # (B, C, H', W')
            sel[:, :, None, None], self._conv(x, w_f, b_f), self._conv(x, w_s, b_s)
        )

    def _forward_fast(self, x: Tensor, sel: Tensor) -> Tensor:
        """Eval: every output filter computed once per example (``sel`` (B, C) bool)."""
        w_f, b_f, w_s, b_s = self._folded()
        if x.device.type != "cpu" and not (self.device_subsets and x.shape[0] > 1):
            # Accelerators: no data-dependent shapes or host reads (each would stall the queue).
            if x.shape[0] == 1:  # one merged filter bank, selected on the device
                sel0 = sel[0]
                w = torch.where(sel0.view(-1, 1, 1, 1), w_f, w_s)
                return self._conv(x, w, torch.where(sel0, b_f, b_s))
            return torch.where(
                sel[:, :, None, None], self._conv(x, w_f, b_f), self._conv(x, w_s, b_s)
            )
        if x.shape[0] == 1:
            merged = self._bank((w_f, b_f, w_s, b_s))
            with merged.lock:  # threads share the bank: merge and conv as one step
                return self._conv(x, *self._merge(sel[0], merged))
        need_f = sel.any(0)  # (C,) filters some example takes from F
        need_s = ~sel.all(0)  # (C,) ... from S
        if not need_s.any():
            return self._conv(x, w_f, b_f)
        if not need_f.any():
            return self._conv(x, w_s, b_s)
        idx_f = need_f.nonzero().squeeze(1)
        idx_s = need_s.nonzero().squeeze(1)
        n_f = idx_f.numel()
        if self.conv_s.groups > 1 or n_f + idx_s.numel() >= 2 * DUAL_EVAL_FRACTION * sel.shape[1]:
            # A filter subset of a grouped conv would need its input channels regathered too;
            # grouped (depthwise) convs are cheap, so compute both and select. Where nearly
            # every filter is needed from both branches (random policies), two convs and a
            # select beat one conv over both banks and a gather (measured, README).
            return torch.where(
                sel[:, :, None, None], self._conv(x, w_f, b_f), self._conv(x, w_s, b_s)
            )
        out = self._conv(  # (B, n_f + n_s, H', W'): only the filters the batch uses
            x,
            torch.cat([w_f.index_select(0, idx_f), w_s.index_select(0, idx_s)]),
            torch.cat([b_f.index_select(0, idx_f), b_s.index_select(0, idx_s)]),
        )
        pos_f = torch.cumsum(need_f, 0) - 1  # (C,) position of filter c among the F filters
        pos_s = torch.cumsum(need_s, 0) - 1 + n_f
        b, n, h, w = out.shape
        # row of `out` (viewed as (B * n, H'W')) that example b uses for channel c
        rows = torch.where(sel, pos_f, pos_s) + n * torch.arange(b, device=x.device)[:, None]
        # index_select of whole rows is several times faster than gather on dim 1
        y = out.contiguous().view(b * n, h * w).index_select(0, rows.flatten())  # NCHW rows
        return y.view(b, -1, h, w)  # (B, C, H', W')

    def _forward_compiled(self, source: PolicySource, x: Tensor) -> Tensor | None:
        """Batch-1 CPU eval as one compiled call: the gate step, the recopy of the filters
        whose decision changed and the conv (``None`` where it cannot run).

        Kept lean on purpose: between two convs every Python step runs on cold caches (this
        path's Python was ~7 ms of a 120 ms ResNet-50 forward before the call was bound once,
        :func:`cpu_gate.bind`)."""
        state = source.compiled_state()
        if state is None:
            return None
        plan = self._plan if self._plan_epoch == cache.epoch() else None
        out = None
        if plan is not None:
            with plan[1]:  # the bank it updates in place is shared by concurrent forwards
                out = plan[0].run(x, *state)
        if not out:  # not bound yet, or a source changed since
            plan = self._bind(source, x)
            if plan is None:
                return None
            with plan[1]:
                out = plan[0].run(x, *state)
            if not out:
                return None
        y, decisions, h, c = out
        source.record(self.index, decisions, (h, c))
        return y  # (1, C_out, H', W')

    def _bind(self, source: PolicySource, x: Tensor) -> tuple[Any, threading.Lock] | None:
        """Bind this layer's batch-1 compiled call, with its bank's lock (``None`` where there
        is none)."""
        self._plan = None
        conv = self.conv_s
        if isinstance(conv.padding, str):  # 'same'/'valid': the kernel takes explicit padding
            return None
        step = source.compiled_step(self.index, x)
        if step is None:
            return None
        folded = self._folded()
        if folded[0].dtype != torch.float32:
            return None
        merged = self._bank(folded)
        assert self._fold_key is not None
        bound = cpu_gate.bind(step, merged.bank, folded, conv, self._fold_key.tensors)
        self._plan, self._plan_epoch = (bound, merged.lock), cache.epoch()
        return self._plan

    def _bank(self, folded: tuple[Tensor, Tensor, Tensor, Tensor]) -> _Merged:
        """The batch-1 filter bank, made on first use as S's filters with all decisions
        ``False``; then updated in place, by :meth:`_merge` or the compiled kernel, under
        its lock (concurrent forwards in threads share it)."""
        if self._merged is None:
            w_f, b_f, w_s, b_s = folded
            bank = cpu_gate.FilterBank(
                torch.zeros(w_s.shape[0], dtype=torch.bool), w_s.clone(), b_s.clone()
            )
            # numpy views of (decisions, merged, F, S), made once: each .numpy() is several
            # dispatches. The bank is this cache's own (nothing else holds it), so writing
            # through numpy is safe, also for tensors made under inference_mode.
            ts = ((bank.weight, w_f, w_s), (bank.bias, b_f, b_s))
            views = [bank.prev.numpy(), *(tuple(map(_bits, t)) for t in ts)]
            self._merged = _Merged(bank, views, threading.Lock())
        return self._merged

    def _merge(self, sel: Tensor, merged: _Merged) -> tuple[Tensor, Tensor]:
        """One example's filters (CPU), updated in place from the previous example's; the
        caller holds ``merged.lock`` until its conv has read them.

        Consecutive inputs share most decisions, so only the filters whose decision changed are
        copied (a full merge reads both weight tensors: at batch 1 that costs as much memory
        traffic as the conv itself in the late layers). The decisions are compared and the rows
        copied in numpy: a few microseconds, where the same in ATen took ~15 operations a layer.
        """
        now = sel.numpy()  # (C,) bool, shares memory with ``sel``
        prev, *views = merged.views
        w, b = merged.bank.weight, merged.bank.bias
        diff = now != prev
        if diff.any():
            changed = diff.nonzero()[0]
            take_f = now[changed]
            to_f, to_s = changed[take_f], changed[~take_f]
            for dst, src_f, src_s in views:
                dst[to_f] = src_f[to_f]
                dst[to_s] = src_s[to_s]
            prev[changed] = take_f
        return w, b

    def train(self, mode: bool = True) -> GatedConv2dBN:
        self._drop_caches()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> GatedConv2dBN:
        self._drop_caches()  # .to()/.half() may replace parameter objects
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_caches()  # load_state_dict(assign=True) replaces parameter objects
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The merged filters' numpy views alias its tensors; a copy (deepcopy, pickle) would
        # break the aliasing, so copies start without caches.
        state = dict(super().__getstate__())
        state.update(_fold_key=None, _fold=None, _merged=None, _plan=None)
        return state

    def _drop_caches(self) -> None:
        self._fold_key, self._fold, self._merged, self._plan = None, None, None, None
        cache.drop_all()

    def extra_repr(self) -> str:
        return f"index={self.index}, gated_bn={self.gated_bn}, fast_eval={self.fast_eval}" + (
            ", capturable=True" if self.capturable else ""
        )
