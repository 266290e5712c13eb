"""AdaFilterModel on real torchvision architectures and a depthwise network (CPU, tiny inputs)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from adafilter import (
    AdaFilterConfig,
    AdaFilterError,
    AdaFilterModel,
    GatedConv2dBN,
    binarize,
    wrap,
)
from adafilter.layers.gate import RecurrentGate
from helpers import conv_bn_relu6, perturb_bn


class DepthwiseNet(nn.Module):
    """EfficientNet/MobileNet-style: stem, inverted residual blocks (expand, depthwise, project)."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()

        cbr = conv_bn_relu6

        self.stem = cbr(3, 16, 3, 2)
        self.block1 = nn.Sequential(
            cbr(16, 16, 3, 1, groups=16), nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        )
        self.block2 = nn.Sequential(
            cbr(8, 32),
            cbr(32, 32, 3, 2, groups=32),
            nn.Conv2d(32, 16, 1, bias=False),
            nn.BatchNorm2d(16),
        )
        self.head = nn.Conv2d(16, 32, 1)  # conv with bias and no BN: not gated
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.head(x).mean((2, 3)))


BUILDERS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 20),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 53),
    "depthwise": (lambda: DepthwiseNet(), 6),
}


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_bn(BUILDERS[name][0](), seed)


@pytest.mark.parametrize("gated_bn", [True, False])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_wrapped_equals_original_at_init_in_every_mode(name, gated_bn):
    base = _build(name)
    ref = copy.deepcopy(base).eval()
    model = wrap(base, AdaFilterConfig(gated_bn=gated_bn)).eval()
    assert len(model.gated_layer_names) == BUILDERS[name][1]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
    scale = want.abs().max()
    for mode in ("learned", "random", "finetuned", "pretrained"):
        model.set_policy_mode(mode, seed=1)
        for fast in (True, False):
            with torch.set_grad_enabled(not fast):  # fast path runs without gradients
                got = model(x).detach()
            assert (got - want).abs().max() <= 1e-5 * scale, (mode, fast)
        for layer_name, pol in model.policies.items():
            assert pol.dtype == torch.bool and pol.shape[0] == 3
            assert pol.shape[1] == model.gated_layers()[layer_name].out_channels


def test_finds_pairs_and_respects_target_and_exclude_patterns():
    model = wrap(
        _build("resnet18"),
        AdaFilterConfig(target_modules=[r"layer[34]\..*"], exclude_modules=[r".*downsample.*"]),
    )
    names = model.gated_layer_names
    assert names[0] == "layer3.0.conv1" and "layer4.1.conv2" in names
    assert not any("downsample" in n or n.startswith(("layer1", "layer2")) for n in names)
    assert isinstance(model.model.layer3[0].bn1, nn.Identity)
    assert isinstance(model.model.bn1, nn.BatchNorm2d)  # untouched stem
    dw = wrap(_build("depthwise"))
    groups = [layer.conv_s.groups for layer in dw.gated_layers().values()]
    assert 16 in groups and 32 in groups  # depthwise convs are gated too
    assert isinstance(dw.model.head, nn.Conv2d)  # conv without BN stays plain


def _train_steps(
    model: AdaFilterModel,
    steps: int,
    *,
    lr: float = 0.01,
    seed: int = 0,
    batch: int = 8,
    size: int = 32,
    classes: int = 10,
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.param_groups(lr=lr, gate_lr=10 * lr), momentum=0.9)
    model.train()
    losses = []
    for step in range(steps):
        model.set_policy_mode("random" if step % 2 else "learned", seed=step)
        x = torch.randn(batch, 3, size, size, generator=gen)
        y = torch.randint(0, classes, (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.set_policy_mode("learned")
    return losses


@pytest.mark.parametrize(
    "cfg",
    [
        AdaFilterConfig(),
        AdaFilterConfig(gated_bn=False),
        AdaFilterConfig(ste="sigmoid", gate_bias_init=0.5),
    ],
)
@pytest.mark.parametrize("name", ["resnet18", "depthwise"])
def test_training_freezes_S_and_reaches_every_trainable_parameter(name, cfg):
    model = wrap(_build(name), cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".conv_s." in n for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".conv_s." not in n)
    seen = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.param_groups(lr=0.01, gate_lr=0.1), momentum=0.9)
    model.train()
    for step in range(4):
        model.set_policy_mode("random" if step % 2 else "learned", seed=step)
        x = torch.randn(8, 3, 32, 32, generator=gen)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 7, (8,), generator=gen))
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:  # the gate is unused (no grad) in random-policy steps
                seen[n] += p.grad.abs()
        opt.step()
    no_grad = [n for n, s in seen.items() if not (s > 0).any()]
    assert not no_grad, no_grad
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # S bit-identical
    assert any(
        not torch.equal(layer.conv_f.weight, layer.conv_s.weight)
        for layer in model.gated_layers().values()
    )


def _fixed_and_mixed_gate(model: AdaFilterModel, seed: int = 0) -> None:
    """Gate heads whose filters are mostly fixed to F or to S, a few input-dependent."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.gate.heads:
            r = torch.rand(head.bias.numel(), generator=gen)
            head.bias.copy_(torch.where(r < 0.5, 20.0, -20.0))
            head.bias[r > 0.85] = 0.0
            head.weight.mul_(5.0)


@pytest.mark.parametrize("gated_bn", [True, False])
@pytest.mark.parametrize("policy", ["finetuned", "pretrained", "random", "fixed+mixed"])
@pytest.mark.parametrize("name", ["resnet18", "depthwise"])
def test_gradients_equal_plain_autograd_when_unused_filters_are_skipped(name, policy, gated_bn):
    """Each conv's backward skips the filters no example takes from its branch: gradients
    (zeros included) must equal those of plain autograd through both convs."""
    models = []
    for reference in (False, True):
        model = wrap(_build(name), AdaFilterConfig(gated_bn=gated_bn, gate_bias_init=0.0))
        _fixed_and_mixed_gate(model)
        model.train()
        model.set_policy_mode("learned" if policy == "fixed+mixed" else policy, seed=2)
        if reference:  # ordinary convs: autograd computes every filter's share
            for layer in model.gated_layers().values():
                layer.subset_backward = False
        models.append(model)
    grads = []
    for model in models:
        x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
        x.requires_grad_(True)
        y = torch.arange(6) % 7
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(
            {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}
        )
    fractions = torch.cat([p.float().flatten() for p in models[0].policies.values()])
    if policy == "fixed+mixed":  # fixed filters in both branches, and input-dependent ones
        assert 0.2 < fractions.mean() < 0.8
    # tolerance: summation order only, relative to the largest gradient of the model
    scale = max(g.abs().max() for g in grads[1].values() if g is not None)
    for key, want in grads[1].items():
        got = grads[0][key]
        assert (got is None) == (want is None), key  # zero gradients stay tensors
        if want is None:
            continue
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * scale), key


def test_eval_gate_step_with_fused_input_map_equals_lstm_cell():
    """Eval mode's fused step (embedding folded into the LSTM's input map where that is
    smaller, one sigmoid for four gates, cached weights): same logits and states as the
    training step."""
    gate = RecurrentGate([8, 16, 12], [16, 12, 4], embed_dim=6, hidden_dim=5, bias_init=0.3)
    xs = [torch.randn(3, c, 4, 4) for c in (8, 16, 12)]

    def run() -> list[torch.Tensor]:
        state, outs = None, []
        for i, x in enumerate(xs):
            logits, state = gate.step(i, x, state)
            outs += [logits, *state]
        return outs

    want = run()
    gate.eval()
    with torch.no_grad():  # narrow inputs fold the embedding into the input map, wide keep it
        assert gate._eval_weights(0).emb is None and gate._eval_weights(1).emb is not None
    for grad in (True, False):  # differentiable, and cached without autograd
        with torch.set_grad_enabled(grad):
            for got, ref in zip(run(), want, strict=True):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # an in-place change to a parameter invalidates the cache
        gate.embed[1].weight.mul_(2.0)
        gate.cell.bias_ih.add_(0.5)
        cached = run()
    gate.train()
    for got, ref in zip(cached, run(), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ste", ["identity", "sigmoid"])
def test_straight_through_estimator(ste):
    logits = torch.tensor([[-2.0, -0.1, 0.0, 0.3, 5.0]], requires_grad=True)
    out = binarize(logits, ste)
    assert out.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]  # sigmoid >= 0.5
    upstream = torch.tensor([[0.5, -1.0, 2.0, 3.0, -4.0]])
    out.backward(upstream)
    want = upstream.clone()
    if ste == "sigmoid":
        s = torch.sigmoid(logits.detach())
        want = upstream * s * (1 - s)
    assert torch.equal(logits.grad, want)


def test_gate_logits_receive_gradient_of_binary_policy():
    """In the model, the head's logits get exactly dL/dG (paper STE)."""
    model = wrap(_build("depthwise")).train()
    captured: dict[str, torch.Tensor] = {}
    head = model.gate.heads[2]

    def keep(mod, args, out):
        out.retain_grad()
        captured["logits"] = out

    h = head.register_forward_hook(keep)
    from adafilter.layers import gate as gate_mod

    seen: dict[str, torch.Tensor] = {}
    orig = gate_mod.binarize

    def spy(logits, ste="identity"):
        g = orig(logits, ste)
        if logits is captured.get("logits"):
            g.retain_grad()
            seen["g"] = g
        return g

    import adafilter.tuner.policies as policies_mod

    policies_mod.binarize = gate_mod.binarize = spy  # training thresholds in the gate's step
    try:
        out = model(torch.randn(4, 3, 32, 32))
        out.square().sum().backward()
    finally:
        policies_mod.binarize = gate_mod.binarize = orig
        h.remove()
    assert torch.equal(captured["logits"].grad, seen["g"].grad)
    assert seen["g"].grad.abs().sum() > 0


@pytest.mark.parametrize("gated_bn", [True, False])
@pytest.mark.parametrize("name", ["resnet18", "depthwise"])
def test_fast_eval_path_equals_dual_path_after_training(name, gated_bn):
    model = wrap(_build(name), AdaFilterConfig(gated_bn=gated_bn))
    _train_steps(model, 3, lr=0.05, classes=7)
    model.eval()
    gen = torch.Generator().manual_seed(9)
    for mode in ("learned", "random"):
        model.set_policy_mode(mode, seed=3)
        for batch in (1, 1, 1, 8):  # consecutive batch-1 calls reuse the merged filters
            x = torch.randn(batch, 3, 32, 32, generator=gen)
            model.set_policy_mode(mode, seed=4)
            dual = model(x).detach()
            pol_dual = model.policies
            model.set_policy_mode(mode, seed=4)
            with torch.no_grad():
                fast = model(x)
            for k, v in model.policies.items():
                assert torch.equal(v, pol_dual[k])
            scale = dual.abs().max()
            assert (fast - dual).abs().max() <= 1e-4 * scale, (mode, batch)
    # the policies after training are mixed: both F and S filters are in use
    fractions = torch.cat([p.float().flatten() for p in model.policies.values()])
    assert 0 < fractions.mean() < 1


def test_learned_eval_is_deterministic_and_random_mode_is_seeded():
    model = wrap(_build("depthwise")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        pa = dict(model.policies)
        b = model(x)
    assert torch.equal(a, b)
    assert all(torch.equal(pa[k], v) for k, v in model.policies.items())
    model.set_policy_mode("random", p=0.3, seed=5)
    with torch.no_grad():
        model(x)
    r1 = torch.cat([p.flatten() for p in model.policies.values()])
    model.set_policy_mode("random", p=0.3, seed=5)
    with torch.no_grad():
        model(x)
    r2 = torch.cat([p.flatten() for p in model.policies.values()])
    assert torch.equal(r1, r2)
    assert 0.2 < r1.float().mean() < 0.4
    for mode, value in (("finetuned", True), ("pretrained", False)):
        model.set_policy_mode(mode)
        with torch.no_grad():
            model(x)
        assert all(bool((p == value).all()) for p in model.policies.values())
    with pytest.raises(ValueError, match="policy mode"):
        model.set_policy_mode("sometimes")


def test_cnn_gate_trains_and_predicts_all_layers():
    feats = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    model = wrap(_build("depthwise"), AdaFilterConfig(gate="cnn"), gate_network=(feats, 8))
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert set(model.policies) == set(model.gated_layer_names)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gate.parameters())


def test_cnn_gate_network_defaults_to_the_configured_backbone():
    """Without ``gate_network``, the CNN gate is ``cnn_gate_backbone``, randomly initialised."""
    from adafilter.backbones import BACKBONES

    spec = BACKBONES.get("cifar-resnet20")
    model = wrap(_build("depthwise"), AdaFilterConfig(gate="cnn", cnn_gate_backbone=spec.name))
    assert type(model.gate.features) is type(spec.factory(1))
    assert {head.in_features for head in model.gate.heads} == {spec.feature_dim}
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert set(model.policies) == set(model.gated_layer_names)
    with pytest.raises(AdaFilterError, match="no-such-net"):
        wrap(_build("depthwise"), AdaFilterConfig(gate="cnn", cnn_gate_backbone="no-such-net"))


def test_param_groups_and_counts():
    model = wrap(_build("depthwise"))
    groups = model.param_groups(lr=0.01, gate_lr=0.1, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["network", "gate"]
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    counts = model.parameter_counts()
    layers = model.gated_layers().values()
    # counted independently of parameter_counts(): frozen = every S conv, nothing else
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for m in layers for p in m.conv_s.parameters()) > 0
    assert counts["frozen"] == frozen
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["gate"] == sum(p.numel() for p in model.gate.parameters()) > 0


def test_resnet50_parameter_ratio(capsys):
    """The paper: AdaFilter has 2.2x the parameters of ResNet-50; the README's exact counts
    (printed here): the plain network, one F copy of every gated conv and BN, the gate."""
    torch.manual_seed(0)
    plain = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    model = wrap(torchvision.models.resnet50())
    counts = model.parameter_counts()
    layers = model.gated_layers().values()
    copies = sum(p.numel() for m in layers for p in [*m.conv_f.parameters(), *m.bn_f.parameters()])
    ratio = counts["total"] / plain
    with capsys.disabled():
        print(
            f"\n[param-ratio] resnet50 plain={plain:,} adafilter={counts['total']:,} "
            f"(gate {counts['gate']:,}) ratio={ratio:.2f}x"
        )
    assert counts["total"] == plain + copies + counts["gate"]
    assert (plain, counts["total"], counts["gate"]) == (25_557_032, 52_270_120, 3_205_056)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_three_sgd_steps_stay_finite_and_on_scale(name):
    """Issue's stability check: perturbed BN stats, lr 0.01, momentum 0.9, batch 8, 64 px."""
    base = _build(name, seed=1)
    plain = copy.deepcopy(base)
    model = wrap(base)
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(8, 3, 64, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(3)
    ]
    opt = torch.optim.SGD(model.param_groups(lr=0.01, gate_lr=0.1), momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    model.train(), plain.train()
    for step, (x, y) in enumerate(data):
        model.set_policy_mode("random" if step == 1 else "learned", seed=step)
        for m, o in ((model, opt), (plain, opt_plain)):
            loss = nn.functional.cross_entropy(m(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
    model.eval(), plain.eval()
    model.set_policy_mode("learned")
    x = torch.randn(8, 3, 64, 64, generator=gen)
    with torch.no_grad():
        out, ref = model(x), plain(x)
    assert torch.isfinite(out).all()
    ratio = out.abs().mean() / ref.abs().mean()
    assert 0.1 < ratio < 10, float(ratio)


def test_gated_layer_outside_model_forward_raises():
    layer = GatedConv2dBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), index=0)
    with pytest.raises(RuntimeError, match="outside an AdaFilterModel"):
        layer(torch.randn(1, 3, 8, 8))


def test_bad_config_values_raise_value_error():
    with pytest.raises(ValueError, match="gate"):
        AdaFilterConfig(gate="transformer")
    with pytest.raises(ValueError, match="random_p"):
        AdaFilterConfig(random_p=2.0)
    with pytest.raises(ValueError, match="no Conv2d"):
        wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_wrap_leaves_module_modes_as_it_found_them():
    """Tracing runs the model in eval, then puts every module back in its own mode: a
    submodule the user put in eval (a frozen BN, a head) stays in eval, the rest in train."""
    base = _build("resnet18")
    base.train()
    base.layer1[0].bn1.eval()  # frozen BN; becomes the gated layer's bn_s
    base.layer2.eval()
    base.fc.eval()
    modes = {m: m.training for m in base.modules()}
    assert sum(modes.values()) and not all(modes.values())
    model = wrap(base)
    assert {m: m.training for m in modes} == modes  # every original module, as it was
    gated = model.gated_layers()["layer1.0.conv1"]
    assert not gated.bn_s.training and not gated.bn_f.training  # the frozen BN and its copy
    assert model.model is base
