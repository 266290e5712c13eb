"""The eval fast path's caches (folded filters, batch-1 merged filters, fused gate weights).

Reference everywhere: the same model in eval mode with gradients on, which runs the dual
path (both convs, the BN after each) and fuses the gate's weights afresh in every step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from adafilter import AdaFilterModel, wrap
from helpers import mix_policies, perturb_bn


def _model(seed: int = 0) -> AdaFilterModel:
    """A ResNet-18 whose F differs from S and whose gate mixes fixed and input-dependent
    decisions (so that consecutive examples change some of them)."""
    torch.manual_seed(seed)
    model = wrap(perturb_bn(torchvision.models.resnet18(num_classes=10), seed))
    return mix_policies(model, seed).eval()


def _fast(model: AdaFilterModel, x: torch.Tensor, inference: bool = False) -> torch.Tensor:
    with torch.inference_mode() if inference else torch.no_grad():
        return model(x).clone()


def _assert_fast_equals_reference(
    model: AdaFilterModel, x: torch.Tensor, inference: bool = False
) -> dict[str, torch.Tensor]:
    fast = _fast(model, x, inference)
    policies = model.policies
    with torch.enable_grad():
        want = model(x).detach()
    for name, pol in model.policies.items():
        assert torch.equal(policies[name], pol), name
    assert (fast - want).abs().max() <= 1e-4 * want.abs().max()
    return policies


def test_batch1_merged_filters_follow_decisions_that_change():
    """Only the filters whose decision changed are recopied: a sequence of examples, some
    under inference_mode, and a deep copy taken mid-sequence, all equal the dual path."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 3, 32, 32, generator=gen) for _ in range(6)]
    previous = None
    for i, x in enumerate(xs):
        policies = _assert_fast_equals_reference(model, x, inference=i % 3 == 1)
        if previous is not None:  # the decisions did change from one example to the next
            assert sum(int((policies[k] != previous[k]).sum()) for k in policies) > 0
        previous = policies
    clone = copy.deepcopy(model)
    for x in reversed(xs):
        _assert_fast_equals_reference(clone, x)
        _assert_fast_equals_reference(model, x)


def test_eval_caches_follow_in_place_changes_and_load_state_dict():
    model = _model()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _assert_fast_equals_reference(model, x)
    before = _fast(model, x)
    layer = next(iter(model.gated_layers().values()))
    with torch.no_grad():  # in place: the version counters move, the cached copies must too
        layer.conv_f.weight.mul_(1.5)
        layer.bn_f.running_var.add_(0.3)
        model.gate.heads[3].bias.neg_()
        model.gate.cell.weight_hh.mul_(0.5)
    _assert_fast_equals_reference(model, x)
    assert not torch.allclose(_fast(model, x), before)  # the change was visible
    other = _model(seed=1)
    model.load_state_dict(other.state_dict())
    _assert_fast_equals_reference(model, x)
    torch.testing.assert_close(_fast(model, x), _fast(other, x), rtol=1e-5, atol=1e-5)
    third = _model(seed=2)
    model.load_state_dict(third.state_dict(), assign=True)  # new parameter objects
    _assert_fast_equals_reference(model, x)
    torch.testing.assert_close(_fast(model, x), _fast(third, x), rtol=1e-5, atol=1e-5)


def test_eval_caches_follow_optimizer_steps_and_dtype_changes():
    """An optimizer step without a train()/eval() call in between, plain and foreach."""
    model = _model()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    for opt in (
        torch.optim.SGD(model.parameters(), lr=0.05),
        torch.optim.Adam(model.parameters(), lr=0.05, foreach=True),
    ):
        _assert_fast_equals_reference(model, x)
        out_before = _fast(model, x)
        model(torch.randn(2, 3, 32, 32, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        _assert_fast_equals_reference(model, x)
        assert not torch.allclose(_fast(model, x), out_before)
    model.double()
    _assert_fast_equals_reference(model, x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_incremental_merge_equals_a_full_merge_bitwise(dtype):
    """Rows are copied as raw bits (bfloat16 has no numpy dtype): the filters updated in place
    equal a fresh ``where`` merge exactly, in every float dtype."""
    model = _model().to(dtype)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x = torch.randn(1, 3, 32, 32, generator=gen).to(dtype)
        fresh = copy.deepcopy(model)  # copies start without caches: a full merge
        with torch.no_grad():
            assert torch.equal(model(x), fresh(x))
