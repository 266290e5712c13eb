"""The recurrent gate's eval step as one Triton kernel after the pooling sum
(:func:`gate_step`), and the row-product and LSTM-cell helpers the training step shares."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import tl, triton

if triton is not None:

    @triton.jit
    def _dot_rows(
        vec_ptr, n, mat_ptr, s_r, s_c, ncols, cols, acc, BR: tl.constexpr, BC: tl.constexpr
    ):
        """acc (BC,) += vec[0:n] @ mat[0:n, cols] for a matrix with strides (s_r, s_c) and
        ``ncols`` columns (columns outside it are masked off): a row-major one, or the
        transpose of a parameter read in place."""
        rows = tl.arange(0, BR)
        for r0 in range(0, n, BR):
            ri = r0 + rows
            v = tl.load(vec_ptr + ri, mask=ri < n, other=0.0).to(tl.float32)
            inside = (ri[:, None] < n) & (cols[None, :] < ncols)
            at = mat_ptr + ri[:, None] * s_r + cols[None, :] * s_c
            w = tl.load(at, mask=inside, other=0.0)
            acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
        return acc

    @triton.jit
    def _cell_gates(base, HID, m, DOUBLED: tl.constexpr):  # pragma: no cover - compiled by Triton
        """The LSTM's i, f, tanh(g), o (PyTorch's gate order) from one example's (4H,)
        pre-activations at ``base``; DOUBLED: g's rows were pre-doubled (eval weights)."""
        i = tl.sigmoid(tl.load(base, mask=m, other=0.0))
        f = tl.sigmoid(tl.load(base + HID, mask=m, other=0.0))
        g_pre = tl.load(base + 2 * HID, mask=m, other=0.0)
        g = 2.0 * tl.sigmoid(g_pre if DOUBLED else 2.0 * g_pre) - 1.0  # tanh = 2 sigmoid(2x) - 1
        o = tl.sigmoid(tl.load(base + 3 * HID, mask=m, other=0.0))
        return i, f, g, o

    @triton.jit
    def _gate_step_kernel(
        pooled_ptr,
        emb_ptr,
        emb_bias_ptr,
        inp_ptr,
        bias_ptr,
        bias2_ptr,
        hid_ptr,
        head_ptr,
        head_bias_ptr,
        h0_ptr,
        c0_ptr,
        v_ptr,
        gates_ptr,
        logits_ptr,
        h_ptr,
        c_ptr,
        C,
        E,
        K,
        HID,
        CO,
        alpha,
        inp_s0,
        inp_s1,
        hid_s0,
        hid_s1,
        head_s0,
        head_s1,
        bias_s,
        VS,
        HAS_EMB: tl.constexpr,
        HAS_STATE: tl.constexpr,
        RAW: tl.constexpr,
        THRESHOLD: tl.constexpr,
        BR: tl.constexpr,
        BC: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        """``inp`` (K, 4H), ``hid`` (H, 4H), ``head`` (H, C_out) are read through their strides
        (``*_s0``, ``*_s1``), the biases with stride ``bias_s``: the eval weights are row-major
        copies, the training step's the packed LSTM parameters and the head read in place.
        RAW: the training step's two LSTM biases and cell gate rows as stored, and each row of
        ``v`` (row stride VS) extended to ``[v, h0, 1, 1]``, the factor that multiplies the
        pre-activations' gradient into the packed parameters' (zeros for h0 without a state);
        else one summed bias and g rows doubled (eval). THRESHOLD: store the policy
        ``logits >= 0`` as 0./1. (Eq. 2) instead of the logits."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BC)
        rows = tl.arange(0, BR)
        g4 = 4 * HID
        # 1. v (K,): the mean-pooled input, or its embedding (the layer's 1x1 conv)
        for k0 in range(0, K, BC):
            ko = k0 + cols
            if HAS_EMB:  # emb is stored (E, C): contract over C for E outputs
                acc = tl.zeros([BC], dtype=tl.float32)
                for c0 in range(0, C, BR):
                    ci = c0 + rows
                    p = tl.load(pooled_ptr + b * C + ci, mask=ci < C, other=0.0)
                    inside = (ci[:, None] < C) & (ko[None, :] < E)
                    w = tl.load(emb_ptr + ko[None, :] * C + ci[:, None], mask=inside, other=0.0)
                    acc += tl.sum(w.to(tl.float32) * p[:, None], axis=0)
                eb = tl.load(emb_bias_ptr + ko, mask=ko < E, other=0.0).to(tl.float32)
                v = acc * alpha + eb
            else:
                v = tl.load(pooled_ptr + b * C + ko, mask=ko < K, other=0.0) * alpha
            tl.store(v_ptr + b * VS + ko, v, mask=ko < K)
        if RAW:  # [v, h0, 1, 1] (see above)
            for j0 in range(0, HID, BC):
                jo = j0 + cols
                hv = tl.zeros([BC], dtype=tl.float32)
                if HAS_STATE:
                    hv = tl.load(h0_ptr + b * HID + jo, mask=jo < HID, other=0.0).to(tl.float32)
                tl.store(v_ptr + b * VS + K + jo, hv, mask=jo < HID)
            one = tl.full([BC], 1.0, dtype=tl.float32)
            tl.store(v_ptr + b * VS + K + HID + cols, one, mask=cols < 2)
        tl.debug_barrier()
        # 2. the LSTM's pre-activations (4H,): bias + v @ W_in (+ h0 @ W_hh), g rows doubled
        for g0 in range(0, g4, BC):
            go = g0 + cols
            acc = tl.load(bias_ptr + go * bias_s, mask=go < g4, other=0.0).to(tl.float32)
            if RAW:
                acc += tl.load(bias2_ptr + go * bias_s, mask=go < g4, other=0.0).to(tl.float32)
            acc = _dot_rows(v_ptr + b * VS, K, inp_ptr, inp_s0, inp_s1, g4, go, acc, BR, BC)
            if HAS_STATE:
                h0 = h0_ptr + b * HID
                acc = _dot_rows(h0, HID, hid_ptr, hid_s0, hid_s1, g4, go, acc, BR, BC)
            tl.store(gates_ptr + b * g4 + go, acc, mask=go < g4)
        tl.debug_barrier()
        # 3. the cell, PyTorch's gate order i, f, g, o; tanh(x) = 2 sigmoid(2x) - 1
        for j0 in range(0, HID, BC):
            jo = j0 + cols
            m = jo < HID
            i, f, g, o = _cell_gates(gates_ptr + b * g4 + jo, HID, m, not RAW)
            c = i * g
            if HAS_STATE:
                c += f * tl.load(c0_ptr + b * HID + jo, mask=m, other=0.0).to(tl.float32)
            tl.store(c_ptr + b * HID + jo, c, mask=m)
            tl.store(h_ptr + b * HID + jo, o * (2.0 * tl.sigmoid(2.0 * c) - 1.0), mask=m)
        tl.debug_barrier()
        # 4. the head: logits (C_out,) = head_bias + h @ W_head
        for o0 in range(0, CO, BC):
            oo = o0 + cols
            acc = tl.load(head_bias_ptr + oo, mask=oo < CO, other=0.0).to(tl.float32)
            h = h_ptr + b * HID
            acc = _dot_rows(h, HID, head_ptr, head_s0, head_s1, CO, oo, acc, BR, BC)
            if THRESHOLD:
                acc = (acc >= 0.0).to(tl.float32)
            tl.store(logits_ptr + b * CO + oo, acc, mask=oo < CO)


def gate_step(
    x: Tensor,
    emb: Tensor | None,
    emb_bias: Tensor | None,
    inp: Tensor,
    bias: Tensor,
    hid: Tensor,
    head: Tensor,
    head_bias: Tensor,
    state: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The recurrent gate's eval step (no autograd) as one kernel after the pooling sum.

    Same arguments as :class:`~adafilter.layers.gate_weights.EvalWeights` holds them: ``emb`` the
    embedding transposed (C_in, E) or ``None`` when it is folded into ``inp`` (K, 4H);
    ``hid`` (H, 4H), ``head`` (H, C_out); the cell gate's rows pre-doubled. One program per
    example runs the embedding, the LSTM pre-activations, the cell and the head, where the
    eager step launches about a dozen small operations per layer.

    Returns:
        Logits (B, C_out) and the new state (h, c), (B, H) each, in ``inp``'s dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"need x (B, C, H, W), got {tuple(x.shape)}")
    b, c = x.shape[:2]
    k, g4 = inp.shape
    hidden, c_out = head.shape
    if g4 != 4 * hidden or hid.shape != (hidden, g4) or k != (c if emb is None else emb.shape[1]):
        raise ValueError("gate weights do not fit together or the input's channels")
    pooled = x.sum((2, 3), dtype=torch.float32).contiguous()  # (B, C); 1/(HW) below
    f32 = {"device": x.device, "dtype": torch.float32}
    v, gates = torch.empty(b, k, **f32), torch.empty(b, g4, **f32)
    logits = torch.empty(b, c_out, **f32)
    h, cell = torch.empty(b, hidden, **f32), torch.empty(b, hidden, **f32)
    has_emb, has_state = emb is not None, state is not None
    dummy = pooled  # never read when the flag that would use it is off
    if has_emb and emb_bias is None:
        emb_bias = torch.zeros(k, **f32)
    inp, hid, head = inp.contiguous(), hid.contiguous(), head.contiguous()
    _gate_step_kernel[(b,)](
        pooled,
        emb.t().contiguous() if has_emb else dummy,  # (E, C): rows along the pooled vector
        emb_bias.contiguous() if has_emb else dummy,
        inp,
        bias.contiguous(),
        dummy,
        hid,
        head,
        head_bias.contiguous(),
        state[0].contiguous() if has_state else dummy,
        state[1].contiguous() if has_state else dummy,
        v,
        gates,
        logits,
        h,
        cell,
        c,
        emb.shape[1] if has_emb else 0,
        k,
        hidden,
        c_out,
        1.0 / (x.shape[2] * x.shape[3]),
        *inp.stride(),
        *hid.stride(),
        *head.stride(),
        1,
        k,
        HAS_EMB=has_emb,
        HAS_STATE=has_state,
        RAW=False,
        THRESHOLD=False,
        BR=32,
        BC=64,
    )
    out = inp.dtype
    return logits.to(out), (h.to(out), cell.to(out))
