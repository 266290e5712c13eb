"""The gated BN's per-channel Triton arithmetic between its per-plane passes:
:func:`branch_stats` (both branches' statistics, the min-examples and whole-branch rules, the
running-statistics update) and :func:`branch_coeffs` (the backward's coefficients, the affine
gradients and the policy gradient)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import _routing, _taken, tl, triton

if triton is not None:

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
