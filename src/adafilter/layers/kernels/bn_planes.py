"""The gated BN's per-plane Triton passes (Eq. 5), reading only the routed branch where one
suffices: :func:`plane_stats` and :func:`select_affine` (forward), :func:`plane_sums` and
:func:`branch_grads` (backward)."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import _check, _routing, _tiles, tl, triton

if triton is not None:

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
