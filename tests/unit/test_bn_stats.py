"""``benchmarks/bn_stats.py``: a run's weights evaluated with the pretrained BN statistics."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from adafilter.backbones import build_backbone
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bn_stats  # noqa: E402  (benchmarks/ is not a package)


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_swaps_statistics_only() -> None:
    pretrained, _ = build_backbone("efficientnet-lite0", num_classes=10, weights="pretrained")
    trained, _ = build_backbone("efficientnet-lite0", num_classes=10, weights="pretrained")
    with torch.no_grad():
        for bn in _bns(trained):  # "fine-tuned": other weights and statistics
            bn.weight.add_(0.5)
            bn.running_mean.add_(1.0)
            bn.running_var.mul_(3.0)
    swapped = bn_stats._with_pretrained_statistics(trained, "efficientnet-lite0", 10)
    for a, b, c in zip(_bns(pretrained), _bns(swapped), _bns(trained), strict=True):
        assert torch.equal(b.running_mean, a.running_mean)
        assert torch.equal(b.running_var, a.running_var)
        assert torch.equal(b.weight, c.weight)  # the run's weights are kept
        assert not torch.equal(c.running_mean, a.running_mean)  # the run itself is untouched


def test_gated_pairs_both_get_the_pretrained_statistics() -> None:
    from adafilter import AdaFilterConfig, wrap

    pretrained, _ = build_backbone("efficientnet-lite0", num_classes=10, weights="pretrained")
    net, _ = build_backbone("efficientnet-lite0", num_classes=10, weights="pretrained")
    gated = wrap(net, AdaFilterConfig())
    with torch.no_grad():
        for bn in _bns(gated):
            bn.running_mean.add_(1.0)
    swapped = bn_stats._with_pretrained_statistics(gated, "efficientnet-lite0", 10)
    groups = bn_stats._bn_groups(swapped)
    assert len(groups) == len(_bns(pretrained)) and len(_bns(swapped)) > len(groups)
    for a, group in zip(_bns(pretrained), groups, strict=True):
        for b in group:
            assert torch.equal(b.running_mean, a.running_mean)
            assert torch.equal(b.running_var, a.running_var)


def test_other_backbones_are_refused() -> None:
    net, _ = build_backbone("efficientnet-lite0", num_classes=10, weights="pretrained")
    extra = nn.Sequential(net, nn.BatchNorm2d(3))  # one BN more than the pretrained network
    with pytest.raises(SystemExit, match="runs of that backbone"):
        bn_stats._with_pretrained_statistics(extra, "efficientnet-lite0", 10)
