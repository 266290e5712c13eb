"""Methods: registry, optimizer groups, frozen parameters, L2-SP, per-example parameter count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from adafilter.methods import (
    METHODS,
    L2SPRegularizer,
    Prepared,
    conv_execution_order,
    trainable_per_example,
)
from adafilter.training.loop import train_one_epoch
from adafilter.training.optim import build_optimizer, build_param_groups

EXPECTED = {
    "adafilter",
    "finetune",
    "finetune-half",
    "random-policy",
    "l2sp",
    "standard-bn",
    "cnn-gate",
    "adafilter-all-f",
    "linear-probe",
}


class Net(nn.Module):
    """Four conv-BN blocks *defined* in a different order than they run, plus a head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.late = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # runs 4th
        self.late_bn = nn.BatchNorm2d(8)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # runs 1st
        self.stem_bn = nn.BatchNorm2d(4)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)  # runs 2nd, bias, no BN after it
        self.mid2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # runs 3rd
        self.mid2_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.mid(x))
        x = torch.relu(self.mid2_bn(self.mid2(x)))
        x = torch.relu(self.late_bn(self.late(x)))
        return self.fc(x.mean((2, 3)))


def tiny_gate() -> tuple[nn.Module, int]:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4


def build(method: str, **options: object) -> Prepared:
    torch.manual_seed(0)
    opts = {
        "l2sp_alpha": 0.01,
        "l2sp_beta": 0.01,
        "random_p": 0.5,
        "adafilter": {"embed_dim": 8, "hidden_dim": 8},
        **options,
    }
    return METHODS.get(method).build(
        Net(),
        head_name="fc",
        example_input=torch.randn(2, 3, 8, 8),
        options=opts,
        gate_network=tiny_gate,
    )


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
        for _ in range(n)
    ]


def train(prepared: Prepared, *, weight_decay: float = 5e-4) -> None:
    groups = build_param_groups(prepared, lr=0.1, gate_lr=0.5, weight_decay=weight_decay)
    opt = build_optimizer(groups, momentum=0.9)
    train_one_epoch(
        prepared.model,
        batches(),
        opt,
        device=torch.device("cpu"),
        epoch=1,
        regularizer=prepared.regularizer,
        regularized_module=prepared.model,
    )


def test_registry_holds_every_method() -> None:
    assert set(METHODS.names()) == EXPECTED


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_param_groups_carry_intended_learning_rates(method: str) -> None:
    p = build(method)
    groups = build_param_groups(p, lr=0.01, gate_lr=0.1, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["network"]["lr"] == 0.01
    m = METHODS.get(method)
    if m.trains_gate:
        assert by_name["gate"]["lr"] == 0.1
        gate_ids = {id(q) for q in p.model.gate.parameters()}
        assert {id(q) for q in by_name["gate"]["params"]} == gate_ids
    else:
        assert "gate" not in by_name
    expected_wd = 0.0 if method == "l2sp" else 5e-4
    assert all(g["weight_decay"] == expected_wd for g in groups)
    in_groups = [id(q) for g in groups for q in g["params"]]
    assert len(in_groups) == len(set(in_groups))  # no parameter twice
    assert set(in_groups) == {id(q) for q in p.model.parameters() if q.requires_grad}


def test_linear_probe_trains_only_the_head_on_frozen_features() -> None:
    """Every backbone tensor (parameters and BN statistics) bit-identical after training; the
    head moves; the features equal the pretrained network's in eval mode."""
    p = build("linear-probe")
    assert p.info["frozen_bns"] == 3
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    ref = Net().eval()
    torch.testing.assert_close(p.model.eval()(x), ref(x))
    before = {n: t.clone() for n, t in p.model.state_dict().items()}
    train(p)
    after = p.model.state_dict()
    for n, t in before.items():
        assert torch.equal(after[n], t) != n.startswith("fc."), n


def test_conv_execution_order_and_following_bn() -> None:
    order = conv_execution_order(Net(), torch.randn(2, 3, 8, 8), skip_prefix="fc")
    assert order == [("stem", "stem_bn"), ("mid", None), ("mid2", "mid2_bn"), ("late", "late_bn")]


def test_finetune_half_freezes_first_half_bit_identically() -> None:
    p = build("finetune-half")
    info = p.info["finetune_half"]
    assert info["frozen_convs"] == ["stem", "mid"] and info["frozen_bns"] == ["stem_bn"]
    frozen = {
        n: t.detach().clone()
        for n, t in p.model.named_parameters()
        if n.split(".")[0] in ("stem", "stem_bn", "mid")
    }
    assert len(frozen) == 5 and not any(
        t.requires_grad for n, t in p.model.named_parameters() if n in frozen
    )
    before = {n: t.detach().clone() for n, t in p.model.named_parameters()}
    running = p.model.stem_bn.running_mean.clone()
    train(p)
    after = dict(p.model.named_parameters())
    for n, t in frozen.items():
        assert torch.equal(after[n], t), n  # bit-identical
    assert not torch.equal(after["late.weight"], before["late.weight"])
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    # Documented choice: frozen BNs keep updating running statistics in train mode.
    assert not torch.equal(p.model.stem_bn.running_mean, running)


@pytest.mark.parametrize("method", ["adafilter", "random-policy", "standard-bn", "cnn-gate"])
def test_adafilter_variants_keep_s_copies_and_train_f(method: str) -> None:
    p = build(method)
    layers = p.model.gated_layers()
    assert list(layers) == ["stem", "mid2", "late"]
    s_before = {n: layer.conv_s.weight.detach().clone() for n, layer in layers.items()}
    f_before = {n: layer.conv_f.weight.detach().clone() for n, layer in layers.items()}
    gate_before = [q.detach().clone() for q in p.model.gate.parameters()]
    train(p)
    for n, layer in layers.items():
        assert torch.equal(layer.conv_s.weight, s_before[n]), n
        assert not layer.conv_s.weight.requires_grad
    assert any(not torch.equal(layer.conv_f.weight, f_before[n]) for n, layer in layers.items())
    gate_changed = any(
        not torch.equal(a, b) for a, b in zip(gate_before, p.model.gate.parameters(), strict=True)
    )
    assert gate_changed == METHODS.get(method).trains_gate


def test_l2sp_penalty_matches_hand_computation_and_is_zero_at_init() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2, 2))
    reg = L2SPRegularizer(net, head_name="2", alpha=0.3, beta=0.7)
    t = reg.terms(net)
    assert t["sp"].item() == 0.0  # the starting-point term vanishes at initialisation
    head2 = net[2].weight.pow(2).sum() + net[2].bias.pow(2).sum()
    assert reg(net).item() == pytest.approx(0.35 * head2.item(), rel=1e-6)
    assert L2SPRegularizer(net, head_name="2", alpha=0.3, beta=0.0)(net).item() == 0.0

    w0 = net[0].weight.detach().clone()
    b0 = net[0].bias.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(0.5)
        net[0].bias.sub_(torch.tensor([1.0, 2.0]))
        net[2].weight.mul_(2)
    sp = (net[0].weight - w0).pow(2).sum() + (net[0].bias - b0).pow(2).sum()
    hd = net[2].weight.pow(2).sum() + net[2].bias.pow(2).sum()
    hand = 0.3 / 2 * sp + 0.7 / 2 * hd
    assert reg(net).item() == pytest.approx(hand.item(), rel=1e-6)
    # Gradient: alpha * (w - w0) on pretrained weights, beta * w on the head.
    reg(net).backward()
    torch.testing.assert_close(net[0].weight.grad, 0.3 * (net[0].weight - w0).detach())
    torch.testing.assert_close(net[2].weight.grad, 0.7 * net[2].weight.detach())


def test_l2sp_method_defaults_and_no_weight_decay() -> None:
    p = build("l2sp")
    assert p.regularizer.alpha == 0.01 and p.regularizer.beta == 0.01
    assert p.regularizer.terms(p.model)["sp"].item() == 0.0
    groups = build_param_groups(p, lr=0.01, gate_lr=0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in groups] == [0.0]


def test_trainable_per_example_bounds() -> None:
    p = build("adafilter")
    m = p.model
    trainable = m.parameter_counts()["trainable"]
    n_layers = len(m.gated_layer_names)
    assert trainable_per_example(m, [1.0] * n_layers) == trainable
    f_branch = sum(
        q.numel()
        for layer in m.gated_layers().values()
        for q in [*layer.conv_f.parameters(), *layer.bn_f.parameters()]
    )
    assert trainable_per_example(m, [0.0] * n_layers) == trainable - f_branch
    half = trainable_per_example(m, [0.5] * n_layers)
    assert half == pytest.approx(trainable - f_branch / 2)


def test_unknown_adafilter_option_is_a_user_error(tmp_path: Path) -> None:
    from adafilter.errors import AdaFilterError

    with pytest.raises(AdaFilterError, match="invalid adafilter option"):
        build("adafilter", adafilter={"no_such_option": 1})
