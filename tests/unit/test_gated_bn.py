"""Gated BN (Eq. 5): masked statistics against a slow per-channel reference, and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adafilter.layers.gated_bn import gated_batch_norm
from helpers import random_bns


def _reference(xf, xs, g, bn_f, bn_s, training, min_examples, min_values):
    """Loop over channels; ``F.batch_norm`` on the examples routed to each branch."""
    b, c, h, w = xf.shape
    y = torch.empty_like(xf)
    for x, bn, sel in ((xf, bn_f, g > 0.5), (xs, bn_s, g <= 0.5)):
        for ch in range(c):
            rows = sel[:, ch].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            vals = x[rows, ch : ch + 1]  # (k, 1, H, W)
            rm = bn.running_mean[ch : ch + 1]
            rv = bn.running_var[ch : ch + 1]
            use_batch = training and rows.numel() >= min_examples and vals.numel() >= min_values
            y[rows, ch : ch + 1] = F.batch_norm(
                vals,
                rm,
                rv,
                bn.weight[ch : ch + 1],
                bn.bias[ch : ch + 1],
                training=use_batch,
                momentum=bn.momentum,
                eps=bn.eps,
            )
    return y


CASES = [
    # (B, C, H, W, min_examples, min_values, policy)
    (6, 5, 4, 4, 2, 16, "mixed"),
    (8, 7, 2, 2, 2, 16, "mixed"),  # 2x2 spatial: few-example branches fall back
    (5, 4, 3, 3, 1, 1, "mixed"),  # batch statistics whenever any example is routed
    (4, 6, 5, 5, 2, 16, "channel_unused"),  # some channels have no example in a branch
]


def _policy(b: int, c: int, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = (torch.rand(b, c, generator=gen) < 0.5).float()
    if kind == "channel_unused":
        g[:, 0] = 1.0  # no example uses S for channel 0
        g[:, 1] = 0.0  # no example uses F for channel 1
    return g


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_masked_statistics_match_reference(case, training):
    b, c, h, w, min_ex, min_val, kind = case
    gen = torch.Generator().manual_seed(1)
    xf = torch.randn(b, c, h, w, generator=gen) * 2 + 1
    xs = torch.randn(b, c, h, w, generator=gen) * 0.5 - 1
    g = _policy(b, c, kind, seed=2)
    bn_f, bn_s = random_bns(c)
    ref_f, ref_s = copy.deepcopy(bn_f), copy.deepcopy(bn_s)
    bn_f.train(training), bn_s.train(training)
    y = gated_batch_norm(
        xf, xs, g, bn_f, bn_s, training=training, min_examples=min_ex, min_values=min_val
    )
    y_ref = _reference(xf, xs, g, ref_f, ref_s, training, min_ex, min_val)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # running statistics: updated from the routed examples only, untouched otherwise
    for mine, ref in ((bn_f, ref_f), (bn_s, ref_s)):
        torch.testing.assert_close(mine.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    if kind == "channel_unused" and training:
        before_f, before_s = random_bns(c)
        assert torch.equal(bn_s.running_mean[0], before_s.running_mean[0])
        assert torch.equal(bn_f.running_var[1], before_f.running_var[1])
        assert not torch.equal(bn_f.running_mean[0], before_f.running_mean[0])


@pytest.mark.parametrize("policy", ["mixed", "all_f", "all_s"])
@pytest.mark.parametrize("case", CASES[:3])
def test_gradients_match_autograd_reference(case, policy):
    """Input and affine gradients equal autograd through the slow reference (float64).

    With a whole batch routed to one branch the other branch's input gradient is zero (and
    skipped: ``None``)."""
    b, c, h, w, min_ex, min_val, _ = case
    gen = torch.Generator().manual_seed(3)
    xf = (torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    xs = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).requires_grad_()
    g = _policy(b, c, "mixed", seed=4).double()
    if policy != "mixed":
        g.fill_(1.0 if policy == "all_f" else 0.0)
    dy = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    bn_f, bn_s = (m.double() for m in random_bns(c))
    ref_f, ref_s = copy.deepcopy(bn_f), copy.deepcopy(bn_s)
    y = gated_batch_norm(
        xf, xs, g, bn_f, bn_s, training=True, min_examples=min_ex, min_values=min_val
    )
    inputs = [xf, xs, bn_f.weight, bn_f.bias, bn_s.weight, bn_s.bias]
    grads = torch.autograd.grad(y, inputs, dy, allow_unused=True, materialize_grads=True)
    y_ref = _reference(xf, xs, g, ref_f, ref_s, True, min_ex, min_val)
    ref_inputs = [xf, xs, ref_f.weight, ref_f.bias, ref_s.weight, ref_s.bias]
    refs = torch.autograd.grad(y_ref, ref_inputs, dy, allow_unused=True, materialize_grads=True)
    for got, want in zip(grads, refs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if policy == "mixed":
        assert all(r.abs().sum() > 0 for r in refs[:2])


def test_policy_gradient_is_difference_of_branch_outputs():
    """dL/dG = sum_hw dL/dy * (BN_F(F x) - BN_S(S x)) with each branch's own statistics."""
    gen = torch.Generator().manual_seed(5)
    b, c, h, w = 6, 3, 4, 4
    xf = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    xs = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    g = _policy(b, c, "mixed", seed=6).double()
    g[0], g[1] = 1.0, 0.0  # every channel has examples in both branches
    g.requires_grad_()
    dy = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    bn_f, bn_s = (m.double() for m in random_bns(c))
    ref_f, ref_s = copy.deepcopy(bn_f), copy.deepcopy(bn_s)
    y = gated_batch_norm(xf, xs, g, bn_f, bn_s, training=True, min_examples=1, min_values=1)
    (dg,) = torch.autograd.grad(y, g, dy)
    # Each branch's statistics (from its routed examples), applied to every example.
    expect = torch.empty(b, c, dtype=torch.float64)
    for ch in range(c):
        outs = []
        for x, bn, sel in ((xf, ref_f, g[:, ch] > 0.5), (xs, ref_s, g[:, ch] <= 0.5)):
            vals = x[sel, ch]
            mean, var = vals.mean(), vals.var(unbiased=False)
            xhat = (x[:, ch] - mean) / torch.sqrt(var + bn.eps)
            outs.append(xhat * bn.weight[ch] + bn.bias[ch])
        expect[:, ch] = (dy[:, ch] * (outs[0] - outs[1])).sum((1, 2))
    torch.testing.assert_close(dg, expect.detach(), rtol=1e-9, atol=1e-9)


def test_single_example_branch_at_2x2_stays_bounded():
    """One example at 2x2 in a branch would have near-zero variance; it must fall back."""
    b, c = 8, 4
    xf = torch.randn(b, c, 2, 2)
    xs = xf.clone()
    xs[0] = 1e-4 * torch.randn(c, 2, 2) + 3.0  # the lone S example: almost constant values
    g = torch.ones(b, c)
    g[0] = 0.0
    bn_f, bn_s = random_bns(c)
    y = gated_batch_norm(xf, xs, g, bn_f, bn_s, training=True)
    assert y.abs().max() < 50
    # without the fallback (min 1 example / 1 value) the lone example's gradient explodes
    dy = torch.ones_like(xs)
    xs_bad = xs.clone().requires_grad_()
    y2 = gated_batch_norm(
        xf, xs_bad, g, *random_bns(c), training=True, min_examples=1, min_values=1
    )
    (grad_bad,) = torch.autograd.grad((y2 * dy * torch.arange(4.0).view(1, 1, 2, 2)).sum(), xs_bad)
    xs_ok = xs.clone().requires_grad_()
    y3 = gated_batch_norm(xf, xs_ok, g, *random_bns(c), training=True)
    (grad_ok,) = torch.autograd.grad((y3 * dy * torch.arange(4.0).view(1, 1, 2, 2)).sum(), xs_ok)
    assert grad_bad.abs().max() > 1e2 * grad_ok.abs().max()


def test_variance_is_numerically_stable_for_large_offsets():
    """Values around 1e4 with unit spread: E[x^2]-E[x]^2 in float32 would lose it all."""
    gen = torch.Generator().manual_seed(7)
    b, c = 8, 3
    xf = torch.randn(b, c, 4, 4, generator=gen) + 1e4
    g = torch.ones(b, c)
    bn_f, bn_s = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
    y = gated_batch_norm(xf, xf.clone(), g, bn_f, bn_s, training=True)
    want = F.batch_norm(xf.double(), None, None, training=True, eps=1e-5).float()
    torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stored", [0.0, float("nan")])
def test_degenerate_branch_with_no_stored_variance_normalises_with_one(stored: float) -> None:
    """A degenerate branch normalises with its running statistics; a stored variance of 0
    (or NaN) is no estimate, so BN's initial variance 1 stands in, not ``1/sqrt(eps)``."""
    b, c = 8, 3
    gen = torch.Generator().manual_seed(0)
    xf, xs = torch.randn(b, c, 1, 1, generator=gen), torch.randn(b, c, 1, 1, generator=gen)
    g = (torch.arange(b) % 2).float()[:, None].expand(b, c).contiguous()  # 4 and 4: degenerate
    bn_f, bn_s = random_bns(c)
    with torch.no_grad():
        bn_f.running_var[1] = stored
    y = gated_batch_norm(xf, xs, g, bn_f, bn_s, training=True)
    rows = g[:, 1] > 0.5
    expect = (xf[rows, 1] - bn_f.running_mean[1]) / (1.0 + bn_f.eps) ** 0.5
    torch.testing.assert_close(y[rows, 1], expect * bn_f.weight[1] + bn_f.bias[1])
    assert torch.isfinite(y).all() and y.abs().max() < 20
    assert bn_f.running_var[1].item() == stored or stored != stored  # left as it was
