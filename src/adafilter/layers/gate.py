"""Policy networks: the recurrent gate of the paper (Eq. 2) and the CNN-gate ablation.

Both output *logits*; :func:`binarize` turns them into the binary fine-tuning policy with a
hard threshold at sigmoid = 0.5 and the straight-through estimator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import cache, cpu_gate, kernels
from .cache import TensorsKey
from .capture import is_compiling
from .gate_weights import EvalWeights


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, through_sigmoid: bool) -> Tensor:  # type: ignore[override]
        # sigmoid(z) >= 0.5  <=>  z >= 0 (Eq. 2, forward)
        ctx.through_sigmoid = through_sigmoid
        if through_sigmoid:
            ctx.save_for_backward(torch.sigmoid(logits))
        return (logits >= 0).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        if ctx.through_sigmoid:
            (s,) = ctx.saved_tensors
            return grad * s * (1 - s), None
        # Eq. 2, backward: dE/dx = dE/dx_b, x being the sigmoid's input.
        return grad, None


class _KernelStep(torch.autograd.Function):
    """The training step (Eq. 2, optionally with its threshold) as two Triton kernels: the
    forward and the input-side backward one program per example; the weight gradients batched
    products, the shared LSTM's one product into its packed parameters (:func:`kernels.pack_cell`).
    About eight launches per layer and step where the eager step with its backward needs
    twenty to forty."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        pooled: Tensor,
        h0: Tensor | None,
        c0: Tensor | None,
        modules: tuple[nn.Linear, nn.Linear],
        threshold: bool,
        *params: Tensor,  # W_e, b_e, the packed LSTM, W_head, b_head: autograd's inputs
    ) -> tuple[Tensor, Tensor, Tensor]:
        emb, head = modules
        state = (h0, c0) if h0 is not None and c0 is not None else None
        out, h, c, u, gates = kernels.gate_train_forward(
            pooled, state, emb, params[2], head, threshold=threshold
        )
        ctx.modules = modules
        ctx.save_for_backward(pooled, params[2], c0, h, c, u, gates)
        return out, h, c

    @staticmethod
    def backward(ctx: Any, dout: Tensor, dh: Tensor, dc: Tensor):  # type: ignore[override]
        # dout: of the logits, or of the thresholded policy (the identity straight-through
        # estimator of Eq. 2 passes it to the logits unchanged)
        pooled, packed, c0, h, c, u, gates = ctx.saved_tensors
        emb, head = ctx.modules
        dgates, dh0, dc0, dv, dp = kernels.gate_train_backward(
            (dout, dh, dc), gates, c, c0, emb, packed, head, need_pooled=ctx.needs_input_grad[0]
        )
        dout = dout.float()
        return (
            dp,
            dh0,
            dc0,
            None,
            None,
            dv.t() @ pooled.float(),  # W_e (E, C_in)
            dv.sum(0),
            dgates.t() @ u,  # [W_ih, W_hh, b_ih, b_hh] (4H, E + H + 2): u = [v, h0, 1, 1]
            dout.t() @ h,  # W_head (C_out, H)
            dout.sum(0),
        )


def binarize(logits: Tensor, ste: str = "identity") -> Tensor:
    """Hard-threshold ``sigmoid(logits)`` at 0.5 with a straight-through gradient.

    Args:
        logits: Gate outputs before the sigmoid, any shape.
        ste: ``"identity"`` passes the gradient of the binary output unchanged to the logits
            (the paper); ``"sigmoid"`` multiplies it by the sigmoid's derivative.

    Returns:
        A tensor of 0./1. values with the dtype of ``logits``.
    """
    if ste not in ("identity", "sigmoid"):
        raise ValueError(f"ste must be 'identity' or 'sigmoid', got {ste!r}")
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return (logits >= 0).to(logits.dtype)  # inference: skip the autograd.Function
    return _StraightThrough.apply(logits, ste == "sigmoid")


class RecurrentGate(nn.Module):
    """One LSTM cell shared by all gated layers, stepped once per layer (paper Fig. 2).

    Per layer ``i``: global average pool of the layer's input -> a per-layer 1x1 conv (a linear
    map on the pooled vector) to ``embed_dim`` -> the shared LSTM step -> a per-layer linear
    map to the layer's number of filters -> policy logits.

    Args:
        in_channels: Input channels of each gated layer, in execution order.
        out_channels: Output filters of each gated layer, in execution order.
        embed_dim: Embedding size fed to the LSTM.
        hidden_dim: LSTM hidden size.
        bias_init: Initial bias of the policy heads.
        detach_input: Stop the gate's gradient at the pooled activations (see
            ``AdaFilterConfig.gate_input_grad``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        *,
        embed_dim: int = 64,
        hidden_dim: int = 64,
        bias_init: float = 0.0,
        detach_input: bool = True,
    ) -> None:
        super().__init__()
        self.detach_input = detach_input
        if len(in_channels) != len(out_channels):
            raise ValueError("in_channels and out_channels must have one entry per gated layer")
        self.embed = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_channels)
        self.cell = nn.LSTMCell(embed_dim, hidden_dim)
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, c) for c in out_channels)
        # eval caches (see _eval_weights): per layer, and the LSTM's own matrices shared by all
        self._fused: dict[int, tuple[TensorsKey, EvalWeights]] = {}
        self._cell_fused: tuple[TensorsKey, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        # True: fuse the eval weights in every step instead of caching them
        # (torch.compile traces the fusion into its graph); also whenever it is compiling.
        self.capturable = False
        for head in self.heads:
            nn.init.constant_(head.bias, bias_init)

    def step(
        self,
        index: int,
        x: Tensor,
        state: tuple[Tensor, Tensor] | None,
        *,
        packed: Tensor | None = None,
        binary: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Advance the LSTM on layer ``index``'s input ``x`` (B, C_in, H, W).

        On CUDA (eager or graph capture, not ``torch.compile``) the training step and its
        backward run as Triton kernels (:class:`_KernelStep`); elsewhere as ATen's linear maps
        and LSTM cell.

        Args:
            index: The gated layer.
            x: Its input.
            state: The LSTM state after the previous layer; ``None`` starts from zeros.
            packed: The kernels' training step: :meth:`packed_cell` of this forward, shared by
                its layers (built per step when ``None``).
            binary: Return the policy ``binarize(logits)`` (identity straight-through) rather
                than the logits; the kernels' training step thresholds in the same launch.

        Returns:
            Policy logits (B, C_out) (or the policy, with ``binary``) and the new LSTM state.
        """
        if not self.training:
            logits, new = self._step_eval(index, x, state)
            return (binarize(logits) if binary else logits), new
        pooled = x.mean((2, 3))  # (B, C_in)
        if self.detach_input:
            pooled = pooled.detach()
        if self._kernel_step(x):
            emb, head = self.embed[index], self.heads[index]
            h0, c0 = state if state is not None else (None, None)
            packed = self.packed_cell(x) if packed is None else packed
            params = (emb.weight, emb.bias, packed, head.weight, head.bias)
            out, h, c = _KernelStep.apply(pooled, h0, c0, (emb, head), binary, *params)
            return out, (h, c)
        e = self.embed[index](pooled)  # (B, E)
        h, c = self.cell(e, state)  # (B, H) each
        logits = self.heads[index](h)  # (B, C_out)
        return (binarize(logits) if binary else logits), (h, c)

    def _kernel_step(self, x: Tensor) -> bool:
        # CUDA (graph capture included), not traced: torch.compile traces the ATen step
        return self.training and kernels.available(x) and not is_compiling()

    def packed_cell(self, x: Tensor) -> Tensor | None:
        """The shared LSTM's parameters packed for the kernels' training step on ``x``
        (:func:`kernels.pack_cell`), to build once per forward and pass to every layer's
        :meth:`step`; ``None`` where that step does not run."""
        return kernels.pack_cell(self.cell) if self._kernel_step(x) else None

    def train(self, mode: bool = True) -> RecurrentGate:
        self._drop_caches()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> RecurrentGate:
        self._drop_caches()  # .to()/.half() may replace parameter objects
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_caches()  # load_state_dict(assign=True) replaces parameter objects
        super()._load_from_state_dict(*args, **kwargs)

    def _drop_caches(self) -> None:
        self._fused.clear()
        self._cell_fused = None
        cache.drop_all()

    def _eval_weights(self, index: int) -> EvalWeights:
        """Layer ``index``'s gate as few, pre-transposed matrices for the eval step.

        The embedding and the LSTM's input map are both linear, so
        ``W_ih (W_e p + b_e) + b_ih + b_hh = (W_ih W_e) p + b``: one matrix product instead of
        two -- but only for narrow inputs: the fused matrix has ``4H`` columns against the
        embedding's ``E``, and at batch 1 these products are bound by reading the weights
        (fusing every ResNet-50 layer reads 23 MB per forward instead of 6), so a layer is fused
        only when that matrix is no larger than the two it replaces. The cell gate's rows are
        doubled so that one sigmoid serves all four gates (``tanh(x) = 2 sigmoid(2x) - 1``).
        Cached, without autograd, until a parameter changes (:class:`TensorsKey`).
        """
        if torch.is_grad_enabled() or self.capturable or is_compiling():
            return self._fuse(index)
        hit = self._fused.get(index)
        if hit is None or not hit[0].valid():
            emb, head = self.embed[index], self.heads[index]
            params = (emb.weight, emb.bias, *self.cell.parameters(), head.weight, head.bias)
            hit = (TensorsKey(params), self._fuse(index))
            self._fused[index] = hit
        return hit[1]

    def _cell_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The LSTM's own eval matrices, shared by every layer: the g rows doubled (one
        sigmoid for four gates), ``W_ih`` (4H, E), ``W_ih^T`` (E, 4H), ``W_hh^T`` (H, 4H),
        ``b_ih + b_hh`` (4H,).

        One copy for all layers, so the step reads it from cache rather than a copy per layer.
        """
        cell = self.cell
        cached = not (torch.is_grad_enabled() or self.capturable or is_compiling())
        if cached and self._cell_fused is not None and self._cell_fused[0].valid():
            return self._cell_fused[1]
        hid = cell.hidden_size
        scale = torch.ones(4 * hid, dtype=cell.weight_ih.dtype, device=cell.weight_ih.device)
        scale[2 * hid : 3 * hid] = 2.0  # the cell gate g, PyTorch's order i, f, g, o
        w_ih = scale[:, None] * cell.weight_ih
        out = (
            w_ih,
            w_ih.t().contiguous(),
            (scale[:, None] * cell.weight_hh).t().contiguous(),
            scale * (cell.bias_ih + cell.bias_hh),
        )
        if cached:
            self._cell_fused = (TensorsKey(cell.parameters()), out)
        return out

    def _fuse(self, index: int) -> EvalWeights:
        emb, cell, head = self.embed[index], self.cell, self.heads[index]
        hid, e_dim = cell.hidden_size, cell.input_size
        w_ih, w_ih_t, w_hh, b = self._cell_weights()
        w_head = head.weight.t().contiguous()
        if emb.in_features * 4 * hid <= (emb.in_features + 4 * hid) * e_dim:  # fuse
            w_in = (w_ih @ emb.weight).t().contiguous()
            return EvalWeights(None, None, w_in, b + w_ih @ emb.bias, w_hh, w_head, head.bias)
        # W_e as stored (E, C_in), transposed as a view: a product over the long C_in rows
        # runs ~1.5x faster at batch 1 than over a (C_in, E) copy (measured, MKL, 1 thread)
        return EvalWeights(emb.weight.t(), emb.bias, w_ih_t, b, w_hh, w_head, head.bias)

    def compiled_step(self, index: int, x: Tensor) -> cpu_gate.LayerStep | None:
        """Layer ``index``'s eval step as the compiled CPU kernel, for the layer to bind with
        its filters; ``None`` where it cannot run (training, capture, not built, not a float32
        CPU input without autograd)."""
        if self.training or self.capturable or is_compiling() or torch.is_grad_enabled():
            return None
        module = cpu_gate.get()  # where it has been built
        if module is None:
            return None
        w = self._eval_weights(index)
        if not cpu_gate.usable(x, w):
            return None
        return cpu_gate.LayerStep(module, w, self._fused[index][0].tensors)

    def _step_eval(
        self, index: int, x: Tensor, state: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The same LSTM step with fused, pre-scaled weights (eval mode; equal up to rounding)."""
        w = self._eval_weights(index)
        if not (self.capturable or is_compiling()):
            if cpu_gate.usable(x, w):
                module = cpu_gate.get()  # the compiled step, where it has been built
                if module is not None:
                    return cpu_gate.step(module, x, w, state)
            elif x.device.type == "cuda" and kernels.available(x) and not torch.is_grad_enabled():
                return kernels.gate_step(x, *w, state)  # one Triton kernel after the pooling
        pooled = x.sum((2, 3))  # (B, C_in); the mean's 1/(HW) is the first product's alpha
        if self.detach_input and pooled.requires_grad:
            pooled = pooled.detach()
        alpha = 1.0 / (x.shape[2] * x.shape[3])
        if w.emb is not None:
            pooled, alpha = torch.addmm(w.emb_bias, pooled, w.emb, alpha=alpha), 1.0  # (B, E)
        gates = torch.addmm(w.bias, pooled, w.inp, alpha=alpha)  # (B, 4H)
        if state is not None:
            gates = gates.addmm_(state[0], w.hid)
        i, f, g2, o = torch.sigmoid(gates).chunk(4, 1)  # (B, H) each; tanh(g) = 2 * g2 - 1
        c = torch.addcmul(-i, i, g2, value=2.0)  # i * tanh(g)
        if state is not None:
            c = c.addcmul(f, state[1])
        h = o * torch.tanh(c)  # (B, H)
        return torch.addmm(w.head_bias, h, w.head), (h, c)  # (B, C_out)


class CNNGate(nn.Module):
    """A separate CNN that sees the image and predicts every layer's policy at once.

    The paper's Table 4 ablation (there a ResNet-18): features (B, D) -> one linear head per
    gated layer.

    Args:
        features: A network mapping images (B, 3, H, W) to features (B, feature_dim).
        feature_dim: Width of those features.
        out_channels: Output filters of each gated layer, in execution order.
        bias_init: Initial bias of the policy heads.
    """

    def __init__(
        self,
        features: nn.Module,
        feature_dim: int,
        out_channels: Sequence[int],
        *,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList(nn.Linear(feature_dim, c) for c in out_channels)
        for head in self.heads:
            nn.init.constant_(head.bias, bias_init)

    def forward(self, image: Tensor) -> list[Tensor]:
        """Policy logits for every gated layer: a list of (B, C_out_i)."""
        f = self.features(image).flatten(1)  # (B, D)
        return [head(f) for head in self.heads]
