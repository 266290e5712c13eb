"""Policy networks: the recurrent gate of the paper (Eq. 2) and the CNN-gate ablation.

Both output *logits*; :func:`binarize` turns them into the binary fine-tuning policy with a
hard threshold at sigmoid = 0.5 and the straight-through estimator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


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
        self._fused: dict[int, tuple] = {}  # eval-mode cache, see _input_map
        for head in self.heads:
            nn.init.constant_(head.bias, bias_init)

    def step(
        self, index: int, x: Tensor, state: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Advance the LSTM on layer ``index``'s input ``x`` (B, C_in, H, W).

        Returns:
            Policy logits (B, C_out) and the new LSTM state; ``state=None`` starts from zeros.
        """
        pooled = x.mean((2, 3))  # (B, C_in)
        if self.detach_input:
            pooled = pooled.detach()
        if not self.training:
            return self._step_eval(index, pooled, state)
        e = self.embed[index](pooled)  # (B, E)
        h, c = self.cell(e, state)  # (B, H) each
        return self.heads[index](h), (h, c)  # (B, C_out)

    def _input_map(self, index: int) -> tuple[Tensor, Tensor]:
        """Embedding and the LSTM's input map as one affine map: ``(W^T (C_in, 4H), b (4H,))``.

        Both are linear, so ``W_ih (W_e p + b_e) + b_ih + b_hh = (W_ih W_e) p + b``: one matrix
        product per layer instead of two (the gate runs once per layer and example, which at
        batch 1 costs as much as a late layer's conv). Cached without autograd until a
        parameter changes.
        """
        emb, cell = self.embed[index], self.cell
        params = (emb.weight, emb.bias, cell.weight_ih, cell.bias_ih, cell.bias_hh)
        if torch.is_grad_enabled():
            return self._fuse(emb, cell)
        key = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._fused.get(index)
        if hit is None or hit[0] != key:
            hit = (key, *self._fuse(emb, cell))
            self._fused[index] = hit
        return hit[1], hit[2]

    @staticmethod
    def _fuse(emb: nn.Linear, cell: nn.LSTMCell) -> tuple[Tensor, Tensor]:
        w = (cell.weight_ih @ emb.weight).t().contiguous()  # (C_in, 4H)
        b = cell.weight_ih @ emb.bias + cell.bias_ih + cell.bias_hh  # (4H,)
        return w, b

    def _step_eval(
        self, index: int, pooled: Tensor, state: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The same LSTM step with the fused input map (eval mode; equal up to rounding)."""
        w, b = self._input_map(index)
        gates = torch.addmm(b, pooled, w)  # (B, 4H), PyTorch's order: i, f, g, o
        if state is not None:
            gates = torch.addmm(gates, state[0], self.cell.weight_hh.t())
        i, f, g, o = gates.chunk(4, 1)
        g = torch.tanh(g)
        i, o = torch.sigmoid(i), torch.sigmoid(o)
        c = i * g if state is None else torch.addcmul(i * g, torch.sigmoid(f), state[1])
        h = o * torch.tanh(c)  # (B, H)
        return self.heads[index](h), (h, c)  # (B, C_out)


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
