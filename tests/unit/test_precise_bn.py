"""Precise BN: recalibrated running statistics equal the exact (per-branch) statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import adafilter
from adafilter.training.precise_bn import recalibrate_bn, set_bn_momentum


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for m in net.modules():  # statistics far from any batch's, as after pretraining
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(7.0)
    return net


def _batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, 8, 8, generator=gen) * 2 + 0.5 for b in (5, 3, 4)]


def _pooled(values: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact mean and unbiased variance per channel over (B, C, H, W) pieces."""
    flat = torch.cat([v.double().transpose(0, 1).reshape(v.shape[1], -1) for v in values], 1)
    return flat.mean(1), flat.var(1, correction=1)


def test_plain_bn_equals_pooled_statistics() -> None:
    net = _net()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: dict[int, list[Tensor]] = {id(bn): [] for bn in bns}
    hooks = [bn.register_forward_pre_hook(lambda m, a: seen[id(m)].append(a[0])) for bn in bns]
    tracked = [bn.num_batches_tracked.clone() for bn in bns]
    net.eval()
    assert recalibrate_bn(net, _batches()) == 2
    for h in hooks:
        h.remove()
    assert not net.training  # mode restored
    for bn, before in zip(bns, tracked, strict=True):
        mean, var = _pooled(seen[id(bn)])
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert torch.equal(bn.num_batches_tracked, before)


@pytest.mark.parametrize("mode", ["random", "learned"])
def test_gated_bn_branches_equal_masked_statistics(mode: str) -> None:
    """Each branch's statistics come exactly from the examples routed to it (Eq. 5)."""
    model = adafilter.wrap(
        _net(), adafilter.AdaFilterConfig(gate_bias_init=0.0), example_input=torch.zeros(1, 3, 8, 8)
    )
    layers = model.gated_layers()
    with torch.no_grad():  # F != S so the branches differ
        for layer in layers.values():
            layer.conv_f.weight.mul_(1.5).add_(0.1)
    if mode == "random":
        model.set_policy_mode("random", p=0.5, seed=3)
    inputs: dict[str, list[Tensor]] = {n: [] for n in layers}
    policies: dict[str, list[Tensor]] = {n: [] for n in layers}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, n=name: inputs[n].append(a[0]))
        for name, layer in layers.items()
    ]

    def forward(x: Tensor) -> Tensor:
        out = model(x)
        for name, pol in model.policies.items():
            policies[name].append(pol)
        return out

    recalibrate_bn(model, _batches(), forward=forward)
    for h in hooks:
        h.remove()
    mixed = 0
    last = len(_batches())  # a degenerate branch makes it run more passes: the last one counts
    assert len(policies[next(iter(layers))]) % last == 0
    for name, layer in layers.items():
        for conv, bn, take in ((layer.conv_f, layer.bn_f, True), (layer.conv_s, layer.bn_s, False)):
            outs = [conv(x) for x in inputs[name][-last:]]  # (B, C, H, W) per batch
            masks = [p == take for p in policies[name][-last:]]  # (B, C) routed to this branch
            for c in range(bn.num_features):
                vals = torch.cat(
                    [o[m[:, c], c].flatten() for o, m in zip(outs, masks, strict=True)]
                )
                k = sum(int(m[:, c].sum()) for m in masks)
                if not (k >= 2 and vals.numel() >= 16):
                    continue  # too few values: statistics kept (test below)
                mixed += 1
                ref_mean = vals.double().mean()
                ref_var = vals.double().var(correction=1)
                torch.testing.assert_close(
                    bn.running_mean[c].double(), ref_mean, rtol=1e-5, atol=1e-6
                )
                torch.testing.assert_close(
                    bn.running_var[c].double(), ref_var, rtol=1e-5, atol=1e-6
                )
    assert mixed > 0


def test_unused_branch_keeps_its_statistics() -> None:
    model = adafilter.wrap(_net(), example_input=torch.zeros(1, 3, 8, 8))
    model.set_policy_mode("finetuned")
    layer = next(iter(model.gated_layers().values()))
    before = layer.bn_s.running_mean.clone(), layer.bn_s.running_var.clone()
    recalibrate_bn(model, _batches())
    assert torch.equal(layer.bn_s.running_mean, before[0])
    assert torch.equal(layer.bn_s.running_var, before[1])
    assert not torch.allclose(layer.bn_f.running_mean, before[0])


def test_set_bn_momentum() -> None:
    model = adafilter.wrap(_net(), example_input=torch.zeros(1, 3, 8, 8))
    assert set_bn_momentum(model, 0.3) == 4  # bn_f and bn_s of both gated layers
    assert all(m.momentum == 0.3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="bn_momentum"):
        set_bn_momentum(model, 0.0)


def test_batch1_cache_survives_inference_mode_then_no_grad() -> None:
    """The batch-1 merged-filter cache made under inference_mode is rebuilt outside it."""
    model = adafilter.wrap(
        _net(), adafilter.AdaFilterConfig(gate_bias_init=0.0), example_input=torch.zeros(1, 3, 8, 8)
    ).eval()
    x = _batches()[0]
    with torch.inference_mode():
        a = model(x[:1])
    with torch.no_grad():
        b = model(x[1:2])
        c = model(x[:1])
    torch.testing.assert_close(a.clone(), c)
    assert b.shape == (1, 4)


def _net_1x1() -> nn.Module:
    """A conv-BN whose output is 1x1 (input 2x2, stride 2), then a head."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
        net[1].running_var.fill_(7.0)
    return net


def test_one_by_one_maps_keep_statistics_of_channels_with_too_few_values() -> None:
    """Mixed routing at 1x1: a branch's channel with fewer than 16 routed values (or 2
    examples) keeps its statistics; one with enough gets the exact ones; none stores 0."""
    x1 = torch.zeros(1, 3, 2, 2)
    model = adafilter.wrap(_net_1x1(), adafilter.AdaFilterConfig(), example_input=x1)
    model.set_policy_mode("random", p=0.5, seed=0)
    layer = next(iter(model.gated_layers().values()))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 3, 2, 2, generator=gen) for b in (2, 3, 1)]  # 6 values a channel
    seen = []
    recalibrate_bn(model, batches, forward=lambda x: (model(x), seen.append(model.policies)))
    for bn in (layer.bn_f, layer.bn_s):
        assert torch.equal(bn.running_mean, torch.full((8,), 3.0))
        assert torch.equal(bn.running_var, torch.full((8,), 7.0))
    more = [torch.randn(8, 3, 2, 2, generator=gen) for _ in range(6)]  # 48 values a channel
    recalibrate_bn(model, more)
    for bn in (layer.bn_f, layer.bn_s):
        assert bool((bn.running_var > 0).all())
        assert bool((bn.running_var != 7.0).any())


# (spatial size, batch sizes of the calibration and training batches, routing probability)
ROUTINGS = [
    (1, 2, 0.5),
    (1, 3, 0.2),
    (1, 8, 0.5),
    (2, 2, 0.8),
    (2, 5, 0.5),
    (3, 4, 0.3),
    (3, 7, 0.5),
    (4, 2, 0.5),
    (4, 8, 0.9),
    (1, 6, 0.7),
]


@pytest.mark.parametrize("size, batch, p", ROUTINGS)
def test_stored_variances_stay_positive_and_training_finite(
    size: int, batch: int, p: float
) -> None:
    """Random routings, spatial sizes 1-4, batches 2-8: precise BN between training steps
    never stores a variance <= 0, and the loss stays finite."""
    torch.manual_seed(size * 100 + batch)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    x0 = torch.zeros(1, 3, size, size)
    model = adafilter.wrap(net, adafilter.AdaFilterConfig(), example_input=x0)
    model.set_policy_mode("random", p=p, seed=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(batch)
    data = [torch.randn(batch, 3, size, size, generator=gen) * 3 for _ in range(3)]
    labels = torch.randint(0, 3, (batch,), generator=gen)
    for _ in range(3):
        recalibrate_bn(model, data[:1] if batch < 4 else data)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            assert bool((bn.running_var > 0).all()), bn
        model.train()
        for x in data:
            loss = nn.functional.cross_entropy(model(x), labels)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_under_ddp_the_rule_applies_to_the_reduced_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank alone holds too few values at 1x1; the sum over (here: 4 identical) ranks
    holds enough, so every rank writes the same new statistics."""
    from adafilter.distributed import DistEnv
    from adafilter.training import precise_bn

    ranks = 4
    monkeypatch.setattr(precise_bn, "all_reduce_sum", lambda t, env: t.mul_(ranks))
    x1 = torch.zeros(1, 3, 2, 2)
    model = adafilter.wrap(_net_1x1(), adafilter.AdaFilterConfig(), example_input=x1)
    model.set_policy_mode("random", p=0.5, seed=0)
    layer = next(iter(model.gated_layers().values()))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 2, 2, generator=gen) for _ in range(2)]  # 8 values a channel
    alone = copy.deepcopy(model)
    recalibrate_bn(alone, batches)  # one rank: too few values, statistics kept
    assert torch.equal(
        next(iter(alone.gated_layers().values())).bn_f.running_var, torch.full((8,), 7.0)
    )
    recalibrate_bn(model, batches, env=DistEnv(rank=0, world_size=ranks))
    for bn in (layer.bn_f, layer.bn_s):
        assert bool((bn.running_var != 7.0).all()) and bool((bn.running_var > 0).all())
