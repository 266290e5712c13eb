"""All-fine-tuned AdaFilter trains exactly like fine-tuning (issue: the 2-point Lite0 gap).

With every filter routed to F, gated BN holds all examples in one branch and is a standard BN:
the same forward, gradients and updates as fine-tuning the unwrapped network. Checked on a
tiny EfficientNet-Lite-style network (depthwise + pointwise convs, squeeze-and-excitation,
drop-connect and dropout under a fixed RNG) and a torchvision ResNet, with the policy forced
all-F and with the learned gate at a bias that keeps it all-F:

* after one SGD step (momentum, weight decay): loss, every F filter and BN_F parameter, BN_F
  running statistics and eval outputs equal fine-tuning's to rounding (float64: relative 1e-9);
* over more steps, their distance stays within the noise floor: fine-tuning's own divergence
  when its weights are multiplied by (1 + 1e-6 noise).

Both run in float64: in float32 the plain fine-tuned ResNet-18 at 2x2 feature maps is itself
16% (of the largest entry) away from its float64 gradients in one layer (a cancellation-prone
conv input gradient), while AdaFilter-all-F stays within 1e-5 of float64 fine-tuning; float64
checks the maths rather than which kernel rounds better.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import adafilter
from adafilter.backbones.arch.efficientnet_lite import MBConvBlock

STEPS = 6
TOL = {"rtol": 1e-9, "atol": 1e-11}


class _SE(nn.Module):
    """Squeeze-and-excitation (EfficientNet-B0 style): no BN, left ungated."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, max(1, c // 4), 1)
        self.expand = nn.Conv2d(max(1, c // 4), c, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class _TinyLite(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8, momentum=0.01, eps=1e-3)  # Lite0's BN settings
        self.blocks = nn.Sequential(
            MBConvBlock(8, 8, 3, 1, 1, drop_connect_rate=0.2),
            MBConvBlock(8, 12, 3, 2, 4, drop_connect_rate=0.2),
            MBConvBlock(12, 12, 5, 1, 4, drop_connect_rate=0.2),
        )
        self.se = _SE(12)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(12, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum, m.eps = 0.01, 1e-3

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self.bn0(self.stem(x)))  # (B, 8, H/2, W/2)
        x = self.se(self.blocks(x))  # (B, 12, H/4, W/4)
        return self.fc(self.drop(x.mean((2, 3))))  # (B, num_classes)


def _pretrained_like(net: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return net


def _tiny_lite() -> nn.Module:
    torch.manual_seed(0)
    return _pretrained_like(_TinyLite()).double()


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return _pretrained_like(torchvision.models.resnet18(num_classes=5)).double()


NETS: dict[str, Callable[[], nn.Module]] = {"tiny-lite": _tiny_lite, "resnet18": _resnet}


def _data(n_steps: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64),
            torch.randint(0, 5, (8,), generator=gen),
        )
        for _ in range(n_steps)
    ]


def _adafilter(net: nn.Module, mode: str) -> adafilter.AdaFilterModel:
    bias = 50.0 if mode == "learned" else 3.0  # learned: logits far above 0 -> all F
    model = adafilter.wrap(net, adafilter.AdaFilterConfig(gate_bias_init=bias), example_input=_x0())
    if mode == "forced":
        model.set_policy_mode("finetuned")
    return model


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    if isinstance(model, adafilter.AdaFilterModel):
        groups = model.param_groups(lr=0.05, gate_lr=0.1, weight_decay=5e-4)
    else:
        groups = [{"params": list(model.parameters()), "lr": 0.05, "weight_decay": 5e-4}]
    return torch.optim.SGD(groups, lr=0.05, momentum=0.9)


def _train(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> list[float]:
    opt = _optimizer(model)
    losses = []
    model.train()
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(100 + step)  # the same dropout / drop-connect draws for both
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _pairs(ft: nn.Module, ada: adafilter.AdaFilterModel) -> list[tuple[str, Tensor, Tensor]]:
    """Every fine-tuned tensor with its AdaFilter counterpart (F copies for gated layers)."""
    out = []
    gated = ada.gated_layers()
    bn_of = {n: b for n, b in adafilter.find_conv_bn_pairs(copy.deepcopy(ft), _x0())}
    for name, conv in gated.items():
        bn = ft.get_submodule(bn_of[name])
        out.append((name, ft.get_submodule(name).weight, conv.conv_f.weight))
        for attr in ("weight", "bias", "running_mean", "running_var"):
            out.append((f"{bn_of[name]}.{attr}", getattr(bn, attr), getattr(conv.bn_f, attr)))
    ada_params = dict(ada.model.named_parameters())
    for name, p in ft.named_parameters():
        if name in ada_params:  # ungated: SE convs, classifier
            out.append((name, p, ada_params[name]))
    return out


def _x0() -> Tensor:
    return torch.zeros(1, 3, 32, 32, dtype=torch.float64)


def _max_rel(pairs: list[tuple[str, Tensor, Tensor]]) -> float:
    with torch.no_grad():
        return max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)) for _, a, b in pairs)


@pytest.mark.parametrize("mode", ["forced", "learned"])
@pytest.mark.parametrize("arch", sorted(NETS))
def test_one_step_equals_finetuning(arch: str, mode: str) -> None:
    ft = NETS[arch]()
    ada = _adafilter(NETS[arch](), mode)
    batches = _data(1)
    loss_ft = _train(ft, batches)
    loss_ada = _train(ada, batches)
    assert all(bool(p.all()) for p in ada.policies.values())  # all F throughout
    assert loss_ada == pytest.approx(loss_ft, rel=1e-12)
    for name, a, b in _pairs(ft, ada):
        torch.testing.assert_close(b, a, **TOL, msg=name)
    ft.eval()
    ada.eval()
    x = _data(2)[1][0]
    with torch.no_grad():
        torch.testing.assert_close(ada(x), ft(x), **TOL)


@pytest.mark.parametrize("arch", sorted(NETS))
def test_divergence_within_noise_floor(arch: str) -> None:
    """After STEPS steps AdaFilter-all-F is no farther from fine-tuning than rounding noise."""
    batches = _data(STEPS)
    ft = NETS[arch]()
    noisy = NETS[arch]()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + 1e-6 * torch.randn(p.shape, generator=gen))
    ada = _adafilter(NETS[arch](), "forced")
    losses = {k: _train(m, batches) for k, m in (("ft", ft), ("noisy", noisy), ("ada", ada))}
    floor = max(abs(a - b) for a, b in zip(losses["ft"], losses["noisy"], strict=True))
    gap = max(abs(a - b) for a, b in zip(losses["ft"], losses["ada"], strict=True))
    assert gap <= max(floor, 1e-12), (gap, floor)
    noisy_pairs = [
        (n, p, q) for (n, p), q in zip(ft.named_parameters(), noisy.parameters(), strict=True)
    ]
    assert _max_rel(_pairs(ft, ada)) <= _max_rel(noisy_pairs)
