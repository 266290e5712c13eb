"""The recurrent gate's training step in Triton: :func:`gate_train_forward` (the eval
step's kernel, keeping what the backward needs) and :func:`gate_train_backward`, over the
shared LSTM packed once per forward (:func:`pack_cell`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import tl, triton
from .gate_eval import _cell_gates, _dot_rows, _gate_step_kernel

if triton is not None:

    @triton.jit
    def _gate_step_bwd_kernel(
        dlogits_ptr,
        dh_ptr,
        dc_ptr,
        gates_ptr,
        c_ptr,
        c0_ptr,
        w_head_ptr,
        w_hh_ptr,
        w_ih_ptr,
        w_e_ptr,
        dhs_ptr,
        dgates_ptr,
        dh0_ptr,
        dc0_ptr,
        dv_ptr,
        dp_ptr,
        C,
        E,
        HID,
        CO,
        WS,
        HAS_STATE: tl.constexpr,
        NEED_DP: tl.constexpr,
        BR: tl.constexpr,
        BC: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        """The training step's backward for one example (program): the LSTM cell's and the
        three linear maps' input gradients; the weights' gradients are batched products.
        ``w_hh``, ``w_ih``: views into the packed LSTM parameters, row stride WS."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BC)
        g4 = 4 * HID
        # 1. dL/dh (H,) = the next step's dL/dh + dlogits @ W_head (W_head (C_out, H) stored)
        for j0 in range(0, HID, BC):
            jo = j0 + cols
            acc = tl.load(dh_ptr + b * HID + jo, mask=jo < HID, other=0.0).to(tl.float32)
            acc = _dot_rows(dlogits_ptr + b * CO, CO, w_head_ptr, HID, 1, HID, jo, acc, BR, BC)
            tl.store(dhs_ptr + b * HID + jo, acc, mask=jo < HID)
        tl.debug_barrier()
        # 2. the cell: c = f c0 + i g, h = o tanh(c); gradients of the pre-activations (4H,)
        for j0 in range(0, HID, BC):
            jo = j0 + cols
            m = jo < HID
            i, f, g, o = _cell_gates(gates_ptr + b * g4 + jo, HID, m, False)
            tc = 2.0 * tl.sigmoid(2.0 * tl.load(c_ptr + b * HID + jo, mask=m, other=0.0)) - 1.0
            dh = tl.load(dhs_ptr + b * HID + jo, mask=m, other=0.0)
            dc = tl.load(dc_ptr + b * HID + jo, mask=m, other=0.0).to(tl.float32)
            dc += dh * o * (1.0 - tc * tc)
            out = dgates_ptr + b * g4 + jo
            tl.store(out, dc * g * i * (1.0 - i), mask=m)
            if HAS_STATE:
                c0 = tl.load(c0_ptr + b * HID + jo, mask=m, other=0.0).to(tl.float32)
                tl.store(out + HID, dc * c0 * f * (1.0 - f), mask=m)
                tl.store(dc0_ptr + b * HID + jo, dc * f, mask=m)
            else:
                tl.store(out + HID, tl.zeros([BC], dtype=tl.float32), mask=m)
            tl.store(out + 2 * HID, dc * i * (1.0 - g * g), mask=m)
            tl.store(out + 3 * HID, dh * tc * o * (1.0 - o), mask=m)
        tl.debug_barrier()
        # 3. dL/dh0 = dgates @ W_hh (4H, H); dL/dv = dgates @ W_ih (4H, E); dL/dpooled
        if HAS_STATE:
            for j0 in range(0, HID, BC):
                jo = j0 + cols
                acc = tl.zeros([BC], dtype=tl.float32)
                acc = _dot_rows(dgates_ptr + b * g4, g4, w_hh_ptr, WS, 1, HID, jo, acc, BR, BC)
                tl.store(dh0_ptr + b * HID + jo, acc, mask=jo < HID)
        for e0 in range(0, E, BC):
            eo = e0 + cols
            acc = tl.zeros([BC], dtype=tl.float32)
            acc = _dot_rows(dgates_ptr + b * g4, g4, w_ih_ptr, WS, 1, E, eo, acc, BR, BC)
            tl.store(dv_ptr + b * E + eo, acc, mask=eo < E)
        if NEED_DP:  # the gate's gradient into the pooled input (W_e (E, C) stored)
            tl.debug_barrier()
            for k0 in range(0, C, BC):
                ko = k0 + cols
                acc = tl.zeros([BC], dtype=tl.float32)
                acc = _dot_rows(dv_ptr + b * E, E, w_e_ptr, C, 1, C, ko, acc, BR, BC)
                tl.store(dp_ptr + b * C + ko, acc, mask=ko < C)


def pack_cell(cell: nn.LSTMCell) -> Tensor:
    """The shared LSTM's parameters as one ``(4H, E + H + 2)`` tensor ``[W_ih, W_hh, b_ih,
    b_hh]``, built once per training forward (with autograd): every layer's step then returns
    one gradient for it, one product each, that autograd sums over the layers once instead of
    four parameters' gradients four times."""
    return torch.cat(
        [cell.weight_ih, cell.weight_hh, cell.bias_ih[:, None], cell.bias_hh[:, None]], 1
    )


def _unpack(packed: Tensor, e_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Views of :func:`pack_cell`'s tensor: W_ih (4H, E), W_hh (4H, H), b_ih, b_hh (4H,)."""
    hidden = packed.shape[0] // 4
    if packed.dim() != 2 or packed.shape != (4 * hidden, e_dim + hidden + 2):
        raise ValueError(
            f"need the packed LSTM (4H, E + H + 2) for E={e_dim}, got {tuple(packed.shape)}"
        )
    k = e_dim + hidden
    return packed[:, :e_dim], packed[:, e_dim:k], packed[:, k], packed[:, k + 1]


def gate_train_forward(
    pooled: Tensor,
    state: tuple[Tensor, Tensor] | None,
    emb: nn.Linear,
    packed: Tensor,
    head: nn.Linear,
    *,
    threshold: bool = False,
) -> tuple[Tensor, ...]:
    """The recurrent gate's training step forward, one program per example, on the weights as
    stored (no transposed or pre-scaled copies to launch).

    Args:
        pooled: (B, C_in) mean-pooled layer input.
        state: ``(h0, c0)``, (B, H) each, or ``None`` (zeros).
        emb, head: The layer's embedding and head.
        packed: The shared LSTM cell's parameters, :func:`pack_cell`.
        threshold: Return the binary policy ``logits >= 0`` (0./1., Eq. 2) for the logits.

    Returns:
        ``(logits, h, c, u, gates)`` in float32: (B, C_out), the new state, and what the
        backward reads: ``u = [v, h0, 1, 1]`` (B, E + H + 2), the embedding ``v`` extended so
        that ``dgates^T @ u`` is the packed parameters' gradient, and the pre-activations (B, 4H).
    """
    b, c_in = pooled.shape
    e_dim, c_out = emb.out_features, head.out_features
    w_ih, w_hh, b_ih, b_hh = _unpack(packed, e_dim)
    hidden = w_hh.shape[1]
    if emb.in_features != c_in or head.in_features != hidden or packed.stride(1) != 1:
        raise ValueError("gate weights do not fit together or the input's channels")
    f32 = {"device": pooled.device, "dtype": torch.float32}
    u, gates = torch.empty(b, e_dim + hidden + 2, **f32), torch.empty(b, 4 * hidden, **f32)
    logits = torch.empty(b, c_out, **f32)
    h, cell_out = torch.empty(b, hidden, **f32), torch.empty(b, hidden, **f32)
    pooled = pooled.contiguous()
    has_state = state is not None
    w_head = head.weight.contiguous().t()  # read transposed in place: (H, C_out)
    _gate_step_kernel[(b,)](
        pooled,
        emb.weight.contiguous(),
        emb.bias,
        w_ih.t(),  # (E, 4H), (H, 4H): views of the packed parameters
        b_ih,
        b_hh,
        w_hh.t(),
        w_head,
        head.bias,
        state[0].contiguous() if has_state else pooled,
        state[1].contiguous() if has_state else pooled,
        u,
        gates,
        logits,
        h,
        cell_out,
        c_in,
        e_dim,
        e_dim,
        hidden,
        c_out,
        1.0,
        *w_ih.t().stride(),
        *w_hh.t().stride(),
        *w_head.stride(),
        packed.stride(0),
        u.shape[1],
        HAS_EMB=True,
        HAS_STATE=has_state,
        RAW=True,
        THRESHOLD=threshold,
        BR=32,
        BC=64,
    )
    return logits, h, cell_out, u, gates


def gate_train_backward(
    grads: tuple[Tensor, Tensor, Tensor],
    gates: Tensor,
    c: Tensor,
    c0: Tensor | None,
    emb: nn.Linear,
    packed: Tensor,
    head: nn.Linear,
    *,
    need_pooled: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None]:
    """The input-side gradients of :func:`gate_train_forward`, one program per example.

    Args:
        grads: ``dL/dlogits`` (B, C_out), ``dL/dh`` and ``dL/dc`` (B, H) of the step's outputs.
        gates: (B, 4H) pre-activations the forward saved; ``c`` (B, H) its new cell state;
            ``c0`` the state it started from (``None``: zeros).
        emb, packed, head: As for :func:`gate_train_forward`.
        need_pooled: Also return ``dL/dpooled``.

    Returns:
        ``(dgates, dh0, dc0, dv, dpooled)``: (B, 4H) gradients of the pre-activations (the
        LSTM's weight and bias gradients are products of them), of the previous state
        (``None`` without one), of the embedding (B, E) and of the pooled input (or ``None``).
    """
    dlogits, dh, dc = (t.contiguous() for t in grads)
    b, hidden = dh.shape
    e_dim, c_in, c_out = emb.out_features, emb.in_features, head.out_features
    w_ih, w_hh, _, _ = _unpack(packed, e_dim)
    f32 = {"device": dh.device, "dtype": torch.float32}
    dhs, dgates = torch.empty(b, hidden, **f32), torch.empty(b, 4 * hidden, **f32)
    has_state = c0 is not None
    dh0 = torch.empty(b, hidden, **f32) if has_state else None
    dc0 = torch.empty(b, hidden, **f32) if has_state else None
    dv = torch.empty(b, e_dim, **f32)
    dp = torch.empty(b, c_in, **f32) if need_pooled else None
    _gate_step_bwd_kernel[(b,)](
        dlogits,
        dh,
        dc,
        gates,
        c,
        c0.contiguous() if has_state else c,
        head.weight.contiguous(),
        w_hh,
        w_ih,
        emb.weight.contiguous(),
        dhs,
        dgates,
        dh0 if has_state else dhs,
        dc0 if has_state else dhs,
        dv,
        dp if need_pooled else dv,
        c_in,
        e_dim,
        hidden,
        c_out,
        packed.stride(0),
        HAS_STATE=has_state,
        NEED_DP=need_pooled,
        BR=32,
        BC=64,
    )
    return dgates, dh0, dc0, dv, dp
