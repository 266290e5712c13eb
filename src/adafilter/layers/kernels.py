"""Triton kernels for the gated BN (Eq. 5) and the gate's eval step, on CUDA.

The eager forward materialises the selection ``z = where(G, F(x), S(x))`` (Eq. 1), reduces it
per (example, channel) plane and normalises it: three full passes plus a few small launches.
Two kernels do the same reading, per plane, only the branch the policy selects:

* :func:`plane_stats`: mean and biased variance of every selected plane (two passes over the
  plane, like ATen's BN statistics, never ``E[x^2] - E[x]^2``), in float32;
* :func:`select_affine`: ``y = x_sel * scale + shift`` with ``x_sel`` the selected branch and
  that branch's per-channel affine map, i.e. Eq. 5 with each BN folded into scale and shift.

and two for the backward, which the eager path does in five reductions and four fused
multiply-adds:

* :func:`plane_sums`: ``sum_hw dy`` and ``sum_hw dy * x`` of both branches per plane, in one
  pass (the BN backward's sums and the policy gradient's);
* :func:`branch_grads`: both branches' input gradients in one pass, reading only the routed
  branch's input per plane.

Between them, the per-channel arithmetic on (B, C) tensors -- about sixty small launches per
layer and step in the eager path, which a GPU step is bound by -- is two more kernels:

* :func:`branch_stats`: both branches' statistics from the per-plane ones (Chan's formula),
  the degenerate- and whole-branch rules, scale and shift, and the running-statistics update;
* :func:`branch_coeffs`: the backward's per-branch coefficients, the affine gradients and the
  policy gradient.

:func:`gate_step` is the recurrent gate's eval step (one program per example). Used by default
for CUDA tensors in eager mode when Triton is importable; the first call on a device compiles
and runs each kernel on tiny inputs, and turns them off there with a warning if that fails.
``ADAFILTER_TRITON=0`` (or ``kernels.ENABLED = False``) turns them off. Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (tests).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from .capture import is_compiling

try:  # Triton is optional (CPU-only installs, older platforms)
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

#: Set to ``False`` to keep the eager ATen path on CUDA too.
ENABLED = os.environ.get("ADAFILTER_TRITON", "1") != "0"
_BLOCK = 1024
# CUDA device index -> every kernel compiled and ran there (see _works_on)
_VERIFIED: dict[int, bool] = {}


def interpreted() -> bool:
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: Tensor) -> bool:
    """The kernels can run on ``x``'s device: CUDA (or any device under the interpreter)."""
    if triton is None or not ENABLED:
        return False
    if x.device.type == "cuda":
        return _works_on(x.device)
    return interpreted()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _works_on(device: torch.device) -> bool:
    """Whether the kernels compiled and ran on this CUDA device, tried once per device on the
    first eager call (never inside a CUDA-graph capture or a trace: assumed there)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _VERIFIED.get(index)
    if ok is None:
        if _capturing() or is_compiling():
            return True
        ok = _VERIFIED[index] = _smoke(torch.device("cuda", index))
    return ok


def _smoke(device: torch.device) -> bool:
    """Compile and run every kernel once on tiny inputs, checking two results. A failure (a
    GPU or a Triton version they do not compile for) turns them off for the device, with one
    warning, and the eager path runs: training goes on rather than stopping mid-run."""
    try:  # float32 whatever the caller's autocast, no graph
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, 3, 4, 4, generator=gen).to(device)
            sel = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], device=device)
            z = torch.where(sel[:, :, None, None] > 0.5, x, x + 1)
            mean, var = plane_stats(x, x + 1, sel)
            ones = torch.ones(2, 3, device=device)
            y = select_affine(x, x + 1, sel, ones, ones)
            a, p = plane_sums(x, x, x)
            branch_grads(x, x, x, sel, torch.zeros(3, 2, 2, 3, device=device))
            bns = (nn.BatchNorm2d(3).to(device), nn.BatchNorm2d(3).to(device))
            st, use = branch_stats(mean, var, sel, 16, bns, min_examples=2, min_values=16)
            branch_coeffs(sel, st, use, a, p)
            w = [torch.zeros(s, device=device) for s in ((3, 8), (8,), (2, 8), (2, 3), (3,))]
            gate_step(x, None, None, *w, None)
            gate_step(x, torch.zeros(3, 3, device=device), w[4], *w, (ones[:, :2], ones[:, :2]))
            mods = (nn.Linear(3, 2), nn.LSTMCell(2, 2), nn.Linear(2, 3))
            emb, cell, head = (m.to(device) for m in mods)
            pk = pack_cell(cell)
            out = gate_train_forward(mean, (ones[:, :2], ones[:, :2]), emb, pk, head)
            gate_train_backward(
                out[:3], out[4], out[2], ones[:, :2], emb, pk, head, need_pooled=True
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not (torch.allclose(mean, z.mean((2, 3)), atol=1e-5) and torch.allclose(y, z + 1)):
            raise RuntimeError("wrong results")
    except Exception as exc:  # noqa: BLE001 - any failure means "use the eager path"
        warnings.warn(
            f"adafilter: the Triton kernels failed on {device} ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the eager path runs instead (ADAFILTER_TRITON=0 skips them)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


if triton is not None:

    @triton.jit
    def _taken(sel_ptr, plane):  # pragma: no cover - compiled by Triton
        """1 where plane ``plane`` is routed to F (the routing: a 0/1 float or a bool), else 0
        (an int: a comparison's own mask type does not combine with block masks under the
        interpreter)."""
        return (tl.load(sel_ptr + plane).to(tl.float32) > 0.5).to(tl.int32)

    @triton.jit
    def _plane_tile(sel_ptr, n, PLANES: tl.constexpr):  # pragma: no cover - compiled by Triton
        """This program's PLANES planes (of ``n``), their in-range mask, and 1 where a plane is
        routed to F else 0 (an int: a comparison's own mask type does not combine with block
        masks under the interpreter)."""
        planes = tl.program_id(0) * PLANES + tl.arange(0, PLANES)
        pm = planes < n
        take = (tl.load(sel_ptr + planes, mask=pm, other=0).to(tl.float32) > 0.5).to(tl.int32)
        return planes, pm, take

    @triton.jit
    def _plane_stats_kernel(
        xf_ptr, xs_ptr, sel_ptr, mean_ptr, var_ptr, hw, n, BLOCK: tl.constexpr, PLANES: tl.constexpr
    ):  # pragma: no cover - compiled by Triton
        planes, pm, take = _plane_tile(sel_ptr, n, PLANES)
        take_f = (take != 0)[:, None]
        take_s = (take == 0)[:, None]
        base = planes.to(tl.int64)[:, None] * hw  # (PLANES, 1)
        offs = tl.arange(0, BLOCK)[None, :]
        acc = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        for start in range(0, hw, BLOCK):
            idx = start + offs
            inside = (idx < hw) & pm[:, None]
            # masked loads: only the selected branch's plane is read from memory (Eq. 1)
            a = tl.load(xf_ptr + base + idx, mask=inside & take_f, other=0.0).to(tl.float32)
            b = tl.load(xs_ptr + base + idx, mask=inside & take_s, other=0.0)
            acc += a + b.to(tl.float32)
        mean = tl.sum(acc, axis=1) / hw  # (PLANES,)
        acc = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        for start in range(0, hw, BLOCK):  # second pass: sum of squared deviations
            idx = start + offs
            inside = (idx < hw) & pm[:, None]
            a = tl.load(xf_ptr + base + idx, mask=inside & take_f, other=0.0).to(tl.float32)
            b = tl.load(xs_ptr + base + idx, mask=inside & take_s, other=0.0)
            d = tl.where(inside, a + b.to(tl.float32) - mean[:, None], 0.0)
            acc += d * d
        tl.store(mean_ptr + planes, mean, mask=pm)
        tl.store(var_ptr + planes, tl.sum(acc, axis=1) / hw, mask=pm)

    @triton.jit
    def _select_affine_kernel(
        xf_ptr,
        xs_ptr,
        sel_ptr,
        scale_ptr,
        shift_ptr,
        out_ptr,
        hw,
        C,
        n,
        BLOCK: tl.constexpr,
        PLANES: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        planes, pm, take = _plane_tile(sel_ptr, n, PLANES)
        take_f = take != 0
        # the routed branch's affine map: row 0 (F) or 1 (S) of the (2, C) scale and shift
        at = tl.where(take_f, 0, C) + planes % C
        scale = tl.load(scale_ptr + at, mask=pm, other=0.0)[:, None]
        shift = tl.load(shift_ptr + at, mask=pm, other=0.0)[:, None]
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
        inside = (idx < hw) & pm[:, None]
        ptr = planes.to(tl.int64)[:, None] * hw + idx  # (PLANES, BLOCK)
        a = tl.load(xf_ptr + ptr, mask=inside & take_f[:, None], other=0.0).to(tl.float32)
        b = tl.load(xs_ptr + ptr, mask=inside & (take == 0)[:, None], other=0.0).to(tl.float32)
        y = (a + b) * scale + shift  # Eq. 5 with the selected branch's BN as an affine map
        tl.store(out_ptr + ptr, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _plane_sums_kernel(
        dy_ptr,
        xf_ptr,
        xs_ptr,
        a_ptr,
        pf_ptr,
        ps_ptr,
        hw,
        n,
        BLOCK: tl.constexpr,
        PLANES: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        planes = tl.program_id(0) * PLANES + tl.arange(0, PLANES)
        pm = planes < n
        base = planes.to(tl.int64)[:, None] * hw
        offs = tl.arange(0, BLOCK)[None, :]
        acc_a = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        acc_f = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        acc_s = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        for start in range(0, hw, BLOCK):  # one pass over dy, F(x), S(x)
            idx = start + offs
            inside = (idx < hw) & pm[:, None]
            d = tl.load(dy_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
            acc_a += d
            acc_f += d * tl.load(xf_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
            acc_s += d * tl.load(xs_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
        tl.store(a_ptr + planes, tl.sum(acc_a, axis=1), mask=pm)
        tl.store(pf_ptr + planes, tl.sum(acc_f, axis=1), mask=pm)
        tl.store(ps_ptr + planes, tl.sum(acc_s, axis=1), mask=pm)

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
        n,
        BLOCK: tl.constexpr,
        PLANES: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        planes, pm, take = _plane_tile(sel_ptr, n, PLANES)
        take_f = take != 0
        # coefficients of the routed branch: k[j, r, plane], j = k1, k2, k3, r = F / S
        at = tl.where(take_f, 0, 1) * n + planes
        k1 = tl.load(k_ptr + at, mask=pm, other=0.0)[:, None]
        k2 = tl.load(k_ptr + 2 * n + at, mask=pm, other=0.0)[:, None]
        k3 = tl.load(k_ptr + 4 * n + at, mask=pm, other=0.0)[:, None]
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
        inside = (idx < hw) & pm[:, None]
        ptr = planes.to(tl.int64)[:, None] * hw + idx  # (PLANES, BLOCK)
        d = tl.load(dy_ptr + ptr, mask=inside, other=0.0).to(tl.float32)
        # only the routed branch's input is read; the other branch's gradient is zero
        to_f = take_f[:, None]
        a = tl.load(xf_ptr + ptr, mask=inside & to_f, other=0.0).to(tl.float32)
        b = tl.load(xs_ptr + ptr, mask=inside & (take == 0)[:, None], other=0.0).to(tl.float32)
        dx = k1 * d + k2 * (a + b) + k3  # BN backward of the routed branch (Eq. 5)
        zero = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        tl.store(dxf_ptr + ptr, tl.where(to_f, dx, zero).to(dxf_ptr.dtype.element_ty), mask=inside)
        tl.store(dxs_ptr + ptr, tl.where(to_f, zero, dx).to(dxs_ptr.dtype.element_ty), mask=inside)

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

    @triton.jit
    def _batch_block(sel_ptr, b0, rows, cs, cm, B, C):  # pragma: no cover - compiled by Triton
        """Rows ``b0 + rows`` of a (B, C) tensor at channels ``cs``: their offsets, the
        in-batch mask and 1./0. blocks of the planes routed to F and to S (0 outside)."""
        bi = b0 + rows
        inb = (bi[:, None] < B) & cm[None, :]
        off = bi[:, None] * C + cs[None, :]
        taken = tl.load(sel_ptr + off, mask=inb, other=0).to(tl.float32) > 0.5
        t_f = tl.where(taken, 1.0, 0.0)  # masked-off entries loaded as 0
        return off, inb, t_f, tl.where(inb, 1.0, 0.0) - t_f

    @triton.jit
    def _branch_stats_kernel(
        mean_ptr,
        var_ptr,
        sel_ptr,
        lo_ptr,
        hi_ptr,
        wf_ptr,
        bf_ptr,
        rmf_ptr,
        rvf_ptr,
        nbf_ptr,
        ws_ptr,
        bs_ptr,
        rms_ptr,
        rvs_ptr,
        nbs_ptr,
        out_ptr,
        use_ptr,
        B,
        C,
        hw,
        eps_f,
        eps_s,
        mom_f,
        mom_s,
        min_examples,
        min_values,
        BB: tl.constexpr,
        BCH: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        cs = tl.program_id(0) * BCH + tl.arange(0, BCH)
        cm = cs < C
        rows = tl.arange(0, BB)
        zero = tl.zeros([BCH], dtype=tl.float32)
        k_f, k_s, s_f, s_s = zero, zero, zero, zero
        for b0 in range(0, B, BB):  # examples and summed plane means routed to each branch
            off, inb, t_f, t_s = _batch_block(sel_ptr, b0, rows, cs, cm, B, C)
            m = tl.load(mean_ptr + off, mask=inb, other=0.0)
            k_f += tl.sum(t_f, axis=0)
            k_s += tl.sum(t_s, axis=0)
            s_f += tl.sum(t_f * m, axis=0)
            s_s += tl.sum(t_s * m, axis=0)
        mean_f = s_f / tl.maximum(k_f, 1.0)
        mean_s = s_s / tl.maximum(k_s, 1.0)
        q_f, q_s = zero, zero
        for b0 in range(0, B, BB):  # Chan et al.: sum_b [M2_b + hw (mean_b - mean)^2]
            off, inb, t_f, t_s = _batch_block(sel_ptr, b0, rows, cs, cm, B, C)
            m = tl.load(mean_ptr + off, mask=inb, other=0.0)
            v = tl.load(var_ptr + off, mask=inb, other=0.0)
            d_f = m - mean_f[None, :]
            d_s = m - mean_s[None, :]
            q_f += tl.sum(t_f * (v + d_f * d_f), axis=0)
            q_s += tl.sum(t_s * (v + d_s * d_s), axis=0)
        n_f, n_s = k_f * hw, k_s * hw
        var_f = q_f * hw / tl.maximum(n_f, 1.0)
        var_s = q_s * hw / tl.maximum(n_s, 1.0)
        # a branch holding every example in every channel is a standard BN: batch statistics
        # whenever it has more than one value (lo, hi: the policy's min and max over the batch)
        whole_f = (_taken(lo_ptr, 0) == 1) & (n_f > 1.0)
        whole_s = (_taken(hi_ptr, 0) == 0) & (n_s > 1.0)
        use_f = ((k_f >= min_examples) & (n_f >= min_values)) | whole_f
        use_s = ((k_s >= min_examples) & (n_s >= min_values)) | whole_s
        f_stats = (use_f, mean_f, var_f, n_f)
        s_stats = (use_s, mean_s, var_s, n_s)
        _branch_affine(
            out_ptr, use_ptr, cs, cm, C, 0, f_stats, wf_ptr, bf_ptr, rmf_ptr, rvf_ptr, eps_f, mom_f
        )
        _branch_affine(
            out_ptr, use_ptr, cs, cm, C, 1, s_stats, ws_ptr, bs_ptr, rms_ptr, rvs_ptr, eps_s, mom_s
        )
        first = tl.program_id(0) == 0  # num_batches_tracked += 1, once per BN
        tl.store(nbf_ptr, tl.load(nbf_ptr) + 1, mask=first)
        tl.store(nbs_ptr, tl.load(nbs_ptr) + 1, mask=first)

    @triton.jit
    def _branch_affine(
        out_ptr, use_ptr, cs, cm, C, r, stats, w_ptr, b_ptr, rm_ptr, rv_ptr, eps, mom
    ):  # pragma: no cover - compiled by Triton
        """One branch's normalisation (batch or running statistics) as scale and shift, and
        its running statistics' update (from the batch only where it normalises with it)."""
        use, mean, var, n = stats
        rm = tl.load(rm_ptr + cs, mask=cm, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + cs, mask=cm, other=1.0).to(tl.float32)
        mu = tl.where(use, mean, rm)
        # a stored variance that is not positive is no estimate: BN's initial variance 1
        rstd = 1.0 / tl.sqrt(tl.where(use, var, tl.where(rv > 0.0, rv, 1.0)) + eps)
        scale = tl.load(w_ptr + cs, mask=cm, other=1.0).to(tl.float32) * rstd
        shift = tl.load(b_ptr + cs, mask=cm, other=0.0).to(tl.float32) - mu * scale
        row = r * C + cs
        tl.store(out_ptr + row, mu, mask=cm)  # out: (5, 2, C) mu, rstd, scale, shift, count
        tl.store(out_ptr + 2 * C + row, rstd, mask=cm)
        tl.store(out_ptr + 4 * C + row, scale, mask=cm)
        tl.store(out_ptr + 6 * C + row, shift, mask=cm)
        tl.store(out_ptr + 8 * C + row, n, mask=cm)
        tl.store(use_ptr + row, use.to(tl.uint8), mask=cm)
        unbiased = var * n / tl.maximum(n - 1.0, 1.0)
        new_mean = tl.where(use, rm + mom * (mean - rm), rm)
        new_var = tl.where(use, rv + mom * (unbiased - rv), rv)
        tl.store(rm_ptr + cs, new_mean.to(rm_ptr.dtype.element_ty), mask=cm)
        tl.store(rv_ptr + cs, new_var.to(rv_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _branch_coeffs_kernel(
        sel_ptr,
        st_ptr,
        use_ptr,
        a_ptr,
        p_ptr,
        k_ptr,
        dgb_ptr,
        dg_ptr,
        B,
        C,
        BB: tl.constexpr,
        BCH: tl.constexpr,
    ):  # pragma: no cover - compiled by Triton
        cs = tl.program_id(0) * BCH + tl.arange(0, BCH)
        cm = cs < C
        rows = tl.arange(0, BB)
        bc = B * C
        mean_f = tl.load(st_ptr + cs, mask=cm, other=0.0)  # st: (5, 2, C) as branch_stats
        mean_s = tl.load(st_ptr + C + cs, mask=cm, other=0.0)
        zero = tl.zeros([BCH], dtype=tl.float32)
        db_f, db_s, dw_f, dw_s = zero, zero, zero, zero
        for b0 in range(0, B, BB):  # dbeta = sum dy, dgamma / rstd = sum dy * (x - mean)
            off, inb, t_f, t_s = _batch_block(sel_ptr, b0, rows, cs, cm, B, C)
            a = tl.load(a_ptr + off, mask=inb, other=0.0)
            db_f += tl.sum(t_f * a, axis=0)
            db_s += tl.sum(t_s * a, axis=0)
            p_f = tl.load(p_ptr + off, mask=inb, other=0.0)
            p_s = tl.load(p_ptr + bc + off, mask=inb, other=0.0)
            dw_f += tl.sum(t_f * (p_f - mean_f[None, :] * a), axis=0)
            dw_s += tl.sum(t_s * (p_s - mean_s[None, :] * a), axis=0)
        rstd_f = tl.load(st_ptr + 2 * C + cs, mask=cm, other=0.0)
        rstd_s = tl.load(st_ptr + 3 * C + cs, mask=cm, other=0.0)
        sc_f = tl.load(st_ptr + 4 * C + cs, mask=cm, other=0.0)
        sc_s = tl.load(st_ptr + 5 * C + cs, mask=cm, other=0.0)
        sh_f = tl.load(st_ptr + 6 * C + cs, mask=cm, other=0.0)
        sh_s = tl.load(st_ptr + 7 * C + cs, mask=cm, other=0.0)
        n_f = tl.maximum(tl.load(st_ptr + 8 * C + cs, mask=cm, other=1.0), 1.0)
        n_s = tl.maximum(tl.load(st_ptr + 9 * C + cs, mask=cm, other=1.0), 1.0)
        use_f = tl.load(use_ptr + cs, mask=cm, other=0).to(tl.int32) != 0
        use_s = tl.load(use_ptr + C + cs, mask=cm, other=0).to(tl.int32) != 0
        dw_f *= rstd_f
        dw_s *= rstd_s
        # dx = k1 dy + k2 x + k3: the BN backward; running statistics are constants (k2 = 0)
        k2_f = tl.where(use_f, -sc_f * rstd_f * dw_f / n_f, 0.0)
        k2_s = tl.where(use_s, -sc_s * rstd_s * dw_s / n_s, 0.0)
        k3_f = tl.where(use_f, -sc_f * db_f / n_f, 0.0) - k2_f * mean_f
        k3_s = tl.where(use_s, -sc_s * db_s / n_s, 0.0) - k2_s * mean_s
        tl.store(dgb_ptr + cs, dw_f, mask=cm)  # dgb: (2, 2, C) dgamma, dbeta
        tl.store(dgb_ptr + C + cs, dw_s, mask=cm)
        tl.store(dgb_ptr + 2 * C + cs, db_f, mask=cm)
        tl.store(dgb_ptr + 3 * C + cs, db_s, mask=cm)
        for b0 in range(0, B, BB):  # per plane: coefficients of its branch, policy gradient
            off, inb, t_f, t_s = _batch_block(sel_ptr, b0, rows, cs, cm, B, C)
            a = tl.load(a_ptr + off, mask=inb, other=0.0)
            p_f = tl.load(p_ptr + off, mask=inb, other=0.0)
            p_s = tl.load(p_ptr + bc + off, mask=inb, other=0.0)
            tl.store(k_ptr + off, t_f * sc_f[None, :], mask=inb)  # k: (3, 2, B, C)
            tl.store(k_ptr + bc + off, t_s * sc_s[None, :], mask=inb)
            tl.store(k_ptr + 2 * bc + off, t_f * k2_f[None, :], mask=inb)
            tl.store(k_ptr + 3 * bc + off, t_s * k2_s[None, :], mask=inb)
            tl.store(k_ptr + 4 * bc + off, t_f * k3_f[None, :], mask=inb)
            tl.store(k_ptr + 5 * bc + off, t_s * k3_s[None, :], mask=inb)
            # dL/dG = sum_hw dy (y_F - y_S), both branches' BN as affine maps (Eq. 5)
            y_f = sc_f[None, :] * p_f + sh_f[None, :] * a
            y_s = sc_s[None, :] * p_s + sh_s[None, :] * a
            tl.store(dg_ptr + off, y_f - y_s, mask=inb)


def _check(xf: Tensor, xs: Tensor, sel: Tensor) -> None:
    if xf.shape != xs.shape or xf.dim() != 4 or sel.shape != xf.shape[:2]:
        raise ValueError(
            f"need xf, xs (B, C, H, W) and sel (B, C), got {xf.shape}, {xs.shape}, {sel.shape}"
        )


def _routing(sel: Tensor) -> Tensor:
    """The (B, C) routing as the kernels read it: a bool as bytes (a view, no copy), or the
    policy's own 0/1 floats (no comparison launched)."""
    sel = sel.contiguous()
    return sel.view(torch.uint8) if sel.dtype == torch.bool else sel


def _tiles(n: int, hw: int) -> tuple[int, int, tuple[int, int]]:
    """How the per-plane kernels cover ``n`` planes of ``hw`` values: ``(BLOCK, PLANES, grid)``.

    Planes are read in blocks of up to ``_BLOCK`` values; the grid's second axis splits a plane
    for the kernels that do not loop over it (the others take ``grid[:1]``). Smaller planes go
    ``PLANES`` to a program, so that every program handles about ``_BLOCK`` values: a 7 x 7
    plane alone would leave most of a program idle, and a late ResNet-50 layer at batch 64 has
    ~130k of them.
    """
    block = min(_BLOCK, triton.next_power_of_2(hw))
    planes = min(_BLOCK // block, triton.next_power_of_2(n))
    return block, planes, (triton.cdiv(n, planes), triton.cdiv(hw, block))


def plane_stats(xf: Tensor, xs: Tensor, sel: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (float32, (B, C) each) of ``where(sel, xf, xs)``'s planes.

    Args:
        xf: F branch output (B, C, H, W).
        xs: S branch output, same shape and dtype.
        sel: (B, C) bool (True: the plane comes from ``xf``), or 0/1 floats.
    """
    _check(xf, xs, sel)
    b, c, h, w = xf.shape
    xf, xs, sel = xf.contiguous(), xs.contiguous(), _routing(sel)
    mean = torch.empty(b, c, device=xf.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block, planes, grid = _tiles(b * c, h * w)
    args = (xf, xs, sel, mean, var, h * w, b * c)
    _plane_stats_kernel[grid[:1]](*args, BLOCK=block, PLANES=planes)
    return mean, var


def select_affine(xf: Tensor, xs: Tensor, sel: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``where(sel, xf, xs) * scale + shift`` per (example, channel) plane, in ``xf``'s dtype,
    with the routed branch's per-channel affine map.

    Args:
        xf: F branch output (B, C, H, W).
        xs: S branch output, same shape and dtype.
        sel: (B, C) bool (True: the plane comes from ``xf``), or 0/1 floats.
        scale: (2, C) multiplier of each channel, row 0 for planes from F, row 1 from S.
        shift: (2, C) offset, the same way.
    """
    _check(xf, xs, sel)
    b, c, h, w = xf.shape
    if scale.shape != (2, c) or shift.shape != (2, c):
        raise ValueError(f"need scale, shift (2, {c}), got {scale.shape}, {shift.shape}")
    xf, xs, sel = xf.contiguous(), xs.contiguous(), _routing(sel)
    out = torch.empty_like(xf)
    scale = scale.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    block, planes, grid = _tiles(b * c, h * w)
    args = (xf, xs, sel, scale, shift, out, h * w, c, b * c)
    _select_affine_kernel[grid](*args, BLOCK=block, PLANES=planes)
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
    block, planes, grid = _tiles(b * c, h * w)
    args = (dy, xf, xs, a, p[0], p[1], h * w, b * c)
    _plane_sums_kernel[grid[:1]](*args, BLOCK=block, PLANES=planes)
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
        sel: (B, C) bool (True: the plane is routed to F), or 0/1 floats.
        k: (3, 2, B, C) float32: ``k1, k2, k3`` of the F (row 0) and S (row 1) branches.
    """
    _check(xf, xs, sel)
    b, c, h, w = xf.shape
    if dy.shape != xf.shape or k.shape != (3, 2, b, c):
        raise ValueError(
            f"need dy {tuple(xf.shape)} and k (3, 2, {b}, {c}), got {dy.shape}, {k.shape}"
        )
    dy, xf, xs, sel = dy.contiguous(), xf.contiguous(), xs.contiguous(), _routing(sel)
    k = k.to(torch.float32).contiguous()
    dxf, dxs = torch.empty_like(dy), torch.empty_like(dy)
    block, planes, grid = _tiles(b * c, h * w)
    args = (dy, xf, xs, sel, k, dxf, dxs, h * w, b * c)
    _branch_grads_kernel[grid](*args, BLOCK=block, PLANES=planes)
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


def branch_stats(
    mean: Tensor,
    var: Tensor,
    sel: Tensor,
    hw: int,
    bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d],
    *,
    min_examples: int,
    min_values: int,
) -> tuple[Tensor, Tensor]:
    """Both branches' statistics from the per-plane ones, and the BNs' running statistics
    updated in place: the gated BN's small per-channel arithmetic (about forty launches in
    the eager path) in one kernel, one program per block of channels.

    Args:
        mean: (B, C) float32 mean of each selected plane (:func:`plane_stats`).
        var: (B, C) float32 biased variance of each.
        sel: (B, C) routing: 0/1 floats (1 = F) or bool.
        hw: Values per plane.
        bns: ``(bn_f, bn_s)``: affine, float32 running statistics, a set momentum.
        min_examples: Fewest examples for a branch to use its batch statistics on a channel.
        min_values: Fewest values for the same.

    Returns:
        ``(stats, use)``: (5, 2, C) float32 mean, 1/std, scale, shift and value count used
        by each branch (row 0 = F), and (2, C) bool, True where that is its batch statistics.
    """
    b, c = mean.shape
    for bn in bns:
        if bn.weight is None or bn.momentum is None or bn.running_var is None:
            raise ValueError("branch_stats needs affine BNs with running statistics and momentum")
    if var.shape != (b, c) or sel.shape != (b, c) or bns[0].num_features != c:
        raise ValueError(f"need mean, var, sel (B, C) of the BNs' {c} channels")
    sel = _routing(sel)
    lo, hi = torch.aminmax(sel.to(torch.float32) if sel.dtype == torch.uint8 else sel)
    out = torch.empty(5, 2, c, device=mean.device, dtype=torch.float32)
    use = torch.empty(2, c, device=mean.device, dtype=torch.bool)
    tensors = [t for bn in bns for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    f, s = bns
    _branch_stats_kernel[(triton.cdiv(c, 32),)](
        mean.contiguous(),
        var.contiguous(),
        sel,
        lo,
        hi,
        *tensors[:4],
        f.num_batches_tracked,
        *tensors[4:],
        s.num_batches_tracked,
        out,
        use.view(torch.uint8),
        b,
        c,
        hw,
        f.eps,
        s.eps,
        f.momentum,
        s.momentum,
        min_examples,
        min_values,
        BB=32,
        BCH=32,
    )
    return out, use


def branch_coeffs(
    sel: Tensor, stats: Tensor, use: Tensor, sum_dy: Tensor, sum_dy_x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The gated BN's backward coefficients and policy gradient from the per-plane sums, in
    one kernel (the eager path launches about twenty small operations).

    Args:
        sel: (B, C) routing: 0/1 floats (1 = F) or bool.
        stats: (5, 2, C) float32 as :func:`branch_stats` returns them.
        use: (2, C) bool, the branch normalised the channel with its batch statistics.
        sum_dy: (B, C) float32 ``sum_hw dy`` (:func:`plane_sums`).
        sum_dy_x: (2, B, C) float32 ``sum_hw dy * x`` of each branch's input.

    Returns:
        ``(k, dgamma_dbeta, dg)``: (3, 2, B, C) ``k1, k2, k3`` with ``dx = k1 dy + k2 x + k3``
        per branch (zero where a plane is not routed to it), (2, 2, C) the affine gradients
        (dgamma then dbeta, rows F and S), and (B, C) ``dL/dG``.
    """
    b, c = sum_dy.shape
    if (
        sel.shape != (b, c)
        or stats.shape != (5, 2, c)
        or use.shape != (2, c)
        or sum_dy_x.shape != (2, b, c)
    ):
        raise ValueError(
            "need sel, sum_dy (B, C), stats (5, 2, C), use (2, C), sum_dy_x (2, B, C); got "
            f"{sel.shape}, {sum_dy.shape}, {stats.shape}, {use.shape}, {sum_dy_x.shape}"
        )
    f32 = {"device": sum_dy.device, "dtype": torch.float32}
    k, dgb, dg = (
        torch.empty(3, 2, b, c, **f32),
        torch.empty(2, 2, c, **f32),
        torch.empty(b, c, **f32),
    )
    _branch_coeffs_kernel[(triton.cdiv(c, 32),)](
        _routing(sel),
        stats.to(torch.float32).contiguous(),
        use.contiguous().view(torch.uint8),
        sum_dy.to(torch.float32).contiguous(),
        sum_dy_x.to(torch.float32).contiguous(),
        k,
        dgb,
        dg,
        b,
        c,
        BB=32,
        BCH=32,
    )
    return k, dgb, dg


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
