"""The training conv of both branches (``_DualConv``) against autograd through two convs.

Its backward gathers the filters some example uses from each branch and, when both branches
use filter subsets, computes ``dL/dx`` with one transposed conv over them; every other case
runs each branch's backward alone. Either way the gradients must equal plain autograd's
(zeros for unused filters included), for each combination of used-filter sets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adafilter.layers import gated_conv
from adafilter.layers.gated_conv import _DualConv

C = 10
_NEED = {  # which filters some example takes from the branch
    "none": torch.zeros(C, dtype=torch.bool),
    "subset": torch.arange(C) % 3 == 0,  # 4 of 10: below SUBSET_MAX_FRACTION
    "other-subset": torch.arange(C) % 3 != 0,  # 6 of 10
    "all": torch.ones(C, dtype=torch.bool),
}
CASES = [
    ("subset", "other-subset"),  # the fused dL/dx
    ("subset", "all"),
    ("all", "all"),
    ("none", "all"),
    ("subset", "none"),
]


@pytest.mark.parametrize(("need_f", "need_s"), CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_dual_conv_gradients_equal_autograd(need_f: str, need_s: str, bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, C, 3, stride=2, padding=1, bias=bias)
    x = torch.randn(4, 6, 9, 9, generator=gen, requires_grad=True)
    w_f = torch.randn(C, 6, 3, 3, generator=gen, requires_grad=True)
    w_s = torch.randn(C, 6, 3, 3, generator=gen)  # frozen S
    b_f = torch.randn(C, generator=gen, requires_grad=True) if bias else None
    b_s = torch.randn(C, generator=gen) if bias else None
    nf, ns = _NEED[need_f], _NEED[need_s]
    # upstream gradients are zero on the filters no example takes from that branch (Eq. 1)
    gy_f = torch.randn(4, C, 5, 5, generator=gen) * nf[None, :, None, None]
    gy_s = torch.randn(4, C, 5, 5, generator=gen) * ns[None, :, None, None]

    yf, ys = _DualConv.apply(x, w_f, b_f, w_s, b_s, nf, ns, conv)
    got = torch.autograd.grad(
        (yf * gy_f).sum() + (ys * gy_s).sum(), [x, w_f, *([b_f] if bias else [])]
    )
    ref_f = F.conv2d(x, w_f, b_f, 2, 1)
    ref_s = F.conv2d(x, w_s, b_s, 2, 1)
    torch.testing.assert_close(yf, ref_f)
    torch.testing.assert_close(ys, ref_s)
    want = torch.autograd.grad(
        (ref_f * gy_f).sum() + (ref_s * gy_s).sum(), [x, w_f, *([b_f] if bias else [])]
    )
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1][~nf], torch.zeros_like(got[1][~nf]))  # unused F filters: zeros


def test_dual_conv_fuses_input_gradient_only_for_two_subsets(monkeypatch) -> None:
    """One transposed conv for ``dL/dx`` when both branches use subsets, two otherwise."""
    calls: list[list[bool]] = []
    real = torch.ops.aten.convolution_backward

    class _Spy:
        def __call__(self, *args):
            calls.append(list(args[-1]))
            return real(*args)

    monkeypatch.setattr(gated_conv.torch.ops.aten, "convolution_backward", _Spy())
    conv = nn.Conv2d(3, C, 1, bias=False)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w_f = torch.randn(C, 3, 1, 1, requires_grad=True)
    for (need_f, need_s), want_dx_calls in ((CASES[0], 1), (CASES[2], 2)):
        calls.clear()
        yf, ys = _DualConv.apply(
            x, w_f, None, w_f.detach(), None, _NEED[need_f], _NEED[need_s], conv
        )
        (yf.sum() + ys.sum()).backward()
        assert sum(mask[0] for mask in calls) == want_dx_calls, calls
