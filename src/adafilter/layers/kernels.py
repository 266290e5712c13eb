"""Triton kernels for the gated BN (Eq. 5) on CUDA, forward and backward.

The eager forward materialises the selection ``z = where(G, F(x), S(x))`` (Eq. 1), reduces it
per (example, channel) plane and normalises it: three full passes plus a few small launches.
Two kernels do the same reading, per plane, only the branch the policy selects:

* :func:`plane_stats`: mean and biased variance of every selected plane (two passes over the
  plane, like ATen's BN statistics, never ``E[x^2] - E[x]^2``), in float32;
* :func:`select_affine`: ``y = x_sel * scale[b, c] + shift[b, c]`` with ``x_sel`` the selected
  branch, i.e. Eq. 5 with each branch's BN folded into a per-(example, channel) affine map.

and two for the backward, which the eager path does in five reductions and four fused
multiply-adds:

* :func:`plane_sums`: ``sum_hw dy`` and ``sum_hw dy * x`` of both branches per plane, in one
  pass (the BN backward's sums and the policy gradient's);
* :func:`branch_grads`: both branches' input gradients in one pass, reading only the routed
  branch's input per plane.

The per-branch statistics, the degenerate-branch rules and the backward's (2, B, C)
coefficients stay in :mod:`adafilter.layers.gated_bn` (small tensors). Used by default for
CUDA tensors in eager mode when Triton is importable; ``ADAFILTER_TRITON=0`` (or
``kernels.ENABLED = False``) turns it off. Under ``TRITON_INTERPRET=1`` the kernels also
run on CPU tensors (tests).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton is optional (CPU-only installs, older platforms)
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

#: Set to ``False`` to keep the eager ATen path on CUDA too.
ENABLED = os.environ.get("ADAFILTER_TRITON", "1") != "0"
_BLOCK = 1024


def interpreted() -> bool:
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: Tensor) -> bool:
    """The kernels can run on ``x``'s device: CUDA (or any device under the interpreter)."""
    if triton is None or not ENABLED:
        return False
    return x.device.type == "cuda" or interpreted()


if triton is not None:

    @triton.jit
    def _plane_stats_kernel(
        xf_ptr, xs_ptr, sel_ptr, mean_ptr, var_ptr, hw, BLOCK: tl.constexpr
    ):  # pragma: no cover - compiled by Triton
        plane = tl.program_id(0)
        take = tl.load(sel_ptr + plane).to(tl.int32)
        take_f = take != 0
        take_s = take == 0
        base = plane.to(tl.int64) * hw
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hw, BLOCK):
            idx = start + offs
            inside = idx < hw
            # masked loads: only the selected branch's plane is read from memory (Eq. 1)
            a = tl.load(xf_ptr + base + idx, mask=inside & take_f, other=0.0).to(tl.float32)
            b = tl.load(xs_ptr + base + idx, mask=inside & take_s, other=0.0)
            acc += a + b.to(tl.float32)
        mean = tl.sum(acc, axis=0) / hw
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hw, BLOCK):  # second pass: sum of squared deviations
            idx = start + offs
            inside = idx < hw
            a = tl.load(xf_ptr + base + idx, mask=inside & take_f, other=0.0).to(tl.float32)
            b = tl.load(xs_ptr + base + idx, mask=inside & take_s, other=0.0)
            d = tl.where(inside, a + b.to(tl.float32) - mean, 0.0)
            acc += d * d
        tl.store(mean_ptr + plane, mean)
        tl.store(var_ptr + plane, tl.sum(acc, axis=0) / hw)

    @triton.jit
    def _select_affine_kernel(
        xf_ptr, xs_ptr, sel_ptr, scale_ptr, shift_ptr, out_ptr, hw, BLOCK: tl.constexpr
    ):  # pragma: no cover - compiled by Triton
        plane = tl.program_id(0)
        take = tl.load(sel_ptr + plane).to(tl.int32)
        take_f = take != 0
        take_s = take == 0
        scale = tl.load(scale_ptr + plane)
        shift = tl.load(shift_ptr + plane)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < hw
        ptr = plane.to(tl.int64) * hw + idx
        a = tl.load(xf_ptr + ptr, mask=inside & take_f, other=0.0).to(tl.float32)
        b = tl.load(xs_ptr + ptr, mask=inside & take_s, other=0.0).to(tl.float32)
        y = (a + b) * scale + shift  # Eq. 5 with the selected branch's BN as an affine map
        tl.store(out_ptr + ptr, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _plane_sums_kernel(
        dy_ptr, xf_ptr, xs_ptr, a_ptr, pf_ptr, ps_ptr, hw, BLOCK: tl.constexpr
    ):  # pragma: no cover - compiled by Triton
        plane = tl.program_id(0)
        base = plane.to(tl.int64) * hw
        offs = tl.arange(0, BLOCK)
        acc_a = tl.zeros([BLOCK], dtype=tl.float32)
        acc_f = tl.zeros([BLOCK], dtype=tl.float32)
        acc_s = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hw, BLOCK):  # one pass over dy, F(x), S(x)
            idx = start + offs
            inside = idx < hw
            d = tl.load(dy_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
            acc_a += d
            acc_f += d * tl.load(xf_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
            acc_s += d * tl.load(xs_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
        tl.store(a_ptr + plane, tl.sum(acc_a, axis=0))
        tl.store(pf_ptr + plane, tl.sum(acc_f, axis=0))
        tl.store(ps_ptr + plane, tl.sum(acc_s, axis=0))

    @triton.jit
    def _branch_grads_kernel(
        dy_ptr,
        xf_ptr,
        xs_ptr,
        sel_ptr,
        k_ptr,
        dxf_ptr,
        dxs_ptr,
        hw,
        planes,
        BLOCK: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        plane = tl.program_id(0)
        take = tl.load(sel_ptr + plane).to(tl.int32)
        take_f = take != 0
        # coefficients of the routed branch: k[j, r, plane], j = k1, k2, k3, r = F / S
        r = tl.where(take_f, 0, 1)
        k1 = tl.load(k_ptr + (0 * 2 + r) * planes + plane)
        k2 = tl.load(k_ptr + (1 * 2 + r) * planes + plane)
        k3 = tl.load(k_ptr + (2 * 2 + r) * planes + plane)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < hw
        ptr = plane.to(tl.int64) * hw + idx
        d = tl.load(dy_ptr + ptr, mask=inside, other=0.0).to(tl.float32)
        # only the routed branch's input is read; the other branch's gradient is zero
        a = tl.load(xf_ptr + ptr, mask=inside & take_f, other=0.0).to(tl.float32)
        b = tl.load(xs_ptr + ptr, mask=inside & (take == 0), other=0.0).to(tl.float32)
        dx = k1 * d + k2 * (a + b) + k3  # BN backward of the routed branch (Eq. 5)
        zero = tl.zeros([BLOCK], dtype=tl.float32)
        tl.store(
            dxf_ptr + ptr, tl.where(take_f, dx, zero).to(dxf_ptr.dtype.element_ty), mask=inside
        )
        tl.store(
            dxs_ptr + ptr, tl.where(take_f, zero, dx).to(dxs_ptr.dtype.element_ty), mask=inside
        )

    @triton.jit
    def _dot_rows(vec_ptr, n, mat_ptr, ld, cols, acc, BR: tl.constexpr, BC: tl.constexpr):
        """acc (BC,) += vec[0:n] @ mat[0:n, cols] for a row-major matrix of leading size ld
        (columns outside ``ld`` are masked off)."""
        rows = tl.arange(0, BR)
        for r0 in range(0, n, BR):
            ri = r0 + rows
            v = tl.load(vec_ptr + ri, mask=ri < n, other=0.0).to(tl.float32)
            inside = (ri[:, None] < n) & (cols[None, :] < ld)
            w = tl.load(mat_ptr + ri[:, None] * ld + cols[None, :], mask=inside, other=0.0)
            acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
        return acc

    @triton.jit
    def _gate_step_kernel(
        pooled_ptr,
        emb_ptr,
        emb_bias_ptr,
        inp_ptr,
        bias_ptr,
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
        HAS_EMB: tl.constexpr,
        HAS_STATE: tl.constexpr,
        BR: tl.constexpr,
        BC: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
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
            tl.store(v_ptr + b * K + ko, v, mask=ko < K)
        tl.debug_barrier()
        # 2. the LSTM's pre-activations (4H,): bias + v @ W_in (+ h0 @ W_hh), g rows doubled
        for g0 in range(0, g4, BC):
            go = g0 + cols
            acc = tl.load(bias_ptr + go, mask=go < g4, other=0.0).to(tl.float32)
            acc = _dot_rows(v_ptr + b * K, K, inp_ptr, g4, go, acc, BR, BC)
            if HAS_STATE:
                acc = _dot_rows(h0_ptr + b * HID, HID, hid_ptr, g4, go, acc, BR, BC)
            tl.store(gates_ptr + b * g4 + go, acc, mask=go < g4)
        tl.debug_barrier()
        # 3. the cell, PyTorch's gate order i, f, g, o; tanh(x) = 2 sigmoid(2x) - 1
        for j0 in range(0, HID, BC):
            jo = j0 + cols
            m = jo < HID
            base = gates_ptr + b * g4 + jo
            i = tl.sigmoid(tl.load(base, mask=m, other=0.0))
            f = tl.sigmoid(tl.load(base + HID, mask=m, other=0.0))
            g2 = tl.sigmoid(tl.load(base + 2 * HID, mask=m, other=0.0))
            o = tl.sigmoid(tl.load(base + 3 * HID, mask=m, other=0.0))
            c = i * (2.0 * g2 - 1.0)
            if HAS_STATE:
                c += f * tl.load(c0_ptr + b * HID + jo, mask=m, other=0.0).to(tl.float32)
            tl.store(c_ptr + b * HID + jo, c, mask=m)
            tl.store(h_ptr + b * HID + jo, o * (2.0 * tl.sigmoid(2.0 * c) - 1.0), mask=m)
        tl.debug_barrier()
        # 4. the head: logits (C_out,) = head_bias + h @ W_head
        for o0 in range(0, CO, BC):
            oo = o0 + cols
            acc = tl.load(head_bias_ptr + oo, mask=oo < CO, other=0.0).to(tl.float32)
            acc = _dot_rows(h_ptr + b * HID, HID, head_ptr, CO, oo, acc, BR, BC)
            tl.store(logits_ptr + b * CO + oo, acc, mask=oo < CO)


def _check(xf: Tensor, xs: Tensor, sel: Tensor) -> None:
    if xf.shape != xs.shape or xf.dim() != 4 or sel.shape != xf.shape[:2]:
        raise ValueError(
            f"need xf, xs (B, C, H, W) and sel (B, C), got {xf.shape}, {xs.shape}, {sel.shape}"
        )


def plane_stats(xf: Tensor, xs: Tensor, sel: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (float32, (B, C) each) of ``where(sel, xf, xs)``'s planes.

    Args:
        xf: F branch output (B, C, H, W).
        xs: S branch output, same shape and dtype.
        sel: (B, C) bool, True where the plane comes from ``xf``.
    """
    _check(xf, xs, sel)
    b, c, h, w = xf.shape
    xf, xs, sel = xf.contiguous(), xs.contiguous(), sel.to(torch.uint8).contiguous()
    mean = torch.empty(b, c, device=xf.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    hw = h * w
    block = min(_BLOCK, triton.next_power_of_2(hw))
    _plane_stats_kernel[(b * c,)](xf, xs, sel, mean, var, hw, BLOCK=block)
    return mean, var


def select_affine(xf: Tensor, xs: Tensor, sel: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``where(sel, xf, xs) * scale + shift`` per (example, channel) plane, in ``xf``'s dtype.

    Args:
        xf: F branch output (B, C, H, W).
        xs: S branch output, same shape and dtype.
        sel: (B, C) bool, True where the plane comes from ``xf``.
        scale: (B, C) float32 multiplier of each plane.
        shift: (B, C) float32 offset of each plane.
    """
    _check(xf, xs, sel)
    b, c, h, w = xf.shape
    xf, xs, sel = xf.contiguous(), xs.contiguous(), sel.to(torch.uint8).contiguous()
    out = torch.empty_like(xf)
    hw = h * w
    block = min(_BLOCK, triton.next_power_of_2(hw))
    scale = scale.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    grid = (b * c, triton.cdiv(hw, block))
    _select_affine_kernel[grid](xf, xs, sel, scale, shift, out, hw, BLOCK=block)
    return out


def plane_sums(dy: Tensor, xf: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_hw dy`` (B, C) and ``sum_hw dy * x`` of both branches (2, B, C), float32, in
    one pass: the per-plane sums of the gated BN's backward and its policy gradient.

    Args:
        dy: Gradient of the gated BN's output (B, C, H, W).
        xf: F branch output, same shape.
        xs: S branch output, same shape.
    """
    if not dy.shape == xf.shape == xs.shape or dy.dim() != 4:
        raise ValueError(f"need dy, xf, xs (B, C, H, W), got {dy.shape}, {xf.shape}, {xs.shape}")
    b, c, h, w = dy.shape
    dy, xf, xs = dy.contiguous(), xf.contiguous(), xs.contiguous()
    a = torch.empty(b, c, device=dy.device, dtype=torch.float32)
    p = torch.empty(2, b, c, device=dy.device, dtype=torch.float32)
    hw = h * w
    block = min(_BLOCK, triton.next_power_of_2(hw))
    _plane_sums_kernel[(b * c,)](dy, xf, xs, a, p[0], p[1], hw, BLOCK=block)
    return a, p


def branch_grads(
    dy: Tensor, xf: Tensor, xs: Tensor, sel: Tensor, k: Tensor
) -> tuple[Tensor, Tensor]:
    """Both branches' input gradients of the gated BN in one pass.

    ``dx = k1 * dy + k2 * x + k3`` for the branch each (example, channel) plane is routed to,
    zero for the other branch; the eager path needs two fused multiply-adds per branch.

    Args:
        dy: Gradient of the gated BN's output (B, C, H, W).
        xf: F branch output, same shape.
        xs: S branch output, same shape.
        sel: (B, C) bool, True where the plane is routed to F.
        k: (3, 2, B, C) float32: ``k1, k2, k3`` of the F (row 0) and S (row 1) branches.
    """
    _check(xf, xs, sel)
    b, c, h, w = xf.shape
    if dy.shape != xf.shape or k.shape != (3, 2, b, c):
        raise ValueError(
            f"need dy {tuple(xf.shape)} and k (3, 2, {b}, {c}), got {dy.shape}, {k.shape}"
        )
    dy, xf, xs = dy.contiguous(), xf.contiguous(), xs.contiguous()
    sel = sel.to(torch.uint8).contiguous()
    k = k.to(torch.float32).contiguous()
    dxf, dxs = torch.empty_like(dy), torch.empty_like(dy)
    hw = h * w
    block = min(_BLOCK, triton.next_power_of_2(hw))
    grid = (b * c, triton.cdiv(hw, block))
    _branch_grads_kernel[grid](dy, xf, xs, sel, k, dxf, dxs, hw, b * c, BLOCK=block)
    return dxf, dxs


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

    Same arguments as :class:`~adafilter.layers.gate._EvalWeights` holds them: ``emb`` the
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
    _gate_step_kernel[(b,)](
        pooled,
        emb.t().contiguous() if has_emb else dummy,  # (E, C): rows along the pooled vector
        emb_bias.contiguous() if has_emb else dummy,
        inp.contiguous(),
        bias.contiguous(),
        hid.contiguous(),
        head.contiguous(),
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
        HAS_EMB=has_emb,
        HAS_STATE=has_state,
        BR=32,
        BC=64,
    )
    out = inp.dtype
    return logits.to(out), (h.to(out), cell.to(out))
