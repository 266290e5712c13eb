"""Model zoo: torchvision and timm conv-BN families wrapped exactly, trained, fast == dual path.

Every model is built at a tiny width/depth where its constructor allows (random weights, BN
statistics perturbed as a pretrained network has them) and checked at 32-64 px:

* wrapped == original at initialisation in every policy mode, fast and dual path (rel 1e-5);
* two training steps with random policies leave S bit-identical, then the fast eval path
  equals the dual path (batch 1 and 4, learned and random policies);
* BN-free networks (ConvNeXt, ViT) and SyncBatchNorm are refused with one clear line.

Run with ``-s`` to see a line per model (gated / skipped convs, differences, seconds). The timm
half skips when timm is not installed (``pip install 'adafilter[timm]'``).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import efficientnet as tv_effnet
from torchvision.models import regnet as tv_regnet
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from adafilter import AdaFilterConfig, wrap
from adafilter.tuner import NormActTail, plan_gating

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm not installed (adafilter[timm])")
NUM_CLASSES = 10
MODES = ("learned", "random", "finetuned", "pretrained")


@dataclass(frozen=True)
class Case:
    """One zoo entry: how to build it, at which input size, what it must gate at least."""

    build: Callable[[], nn.Module]
    min_gated: int
    size: int = 32
    slow: bool = False  # the zoo_slow tier: deselected by default (pytest -m zoo_slow)


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return partial(
        torchvision.models.get_model, name, weights=None, num_classes=NUM_CLASSES, **kwargs
    )


def _tiny_vgg11_bn() -> nn.Module:
    # vgg11_bn's layer pattern at 1/16 width; VGG's fixed 25088 -> 4096 classifier is replaced
    m = tv_vgg.VGG(tv_vgg.make_layers([8, "M", 16, "M", 32, 32, "M"], batch_norm=True))
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Linear(32, NUM_CLASSES)
    return m


def _tiny_regnet(se_ratio: float | None) -> nn.Module:
    params = tv_regnet.BlockParams.from_init_params(
        depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=se_ratio
    )
    return tv_regnet.RegNet(params, num_classes=NUM_CLASSES)


def _timm(name: str, *, frozen: bool = False, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        from timm.layers import freeze_batch_norm_2d

        model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)
        return freeze_batch_norm_2d(model) if frozen else model

    return build


TV_ZOO: dict[str, Case] = {
    "resnet18": Case(_tv("resnet18"), 20),
    "resnet18-FrozenBatchNorm2d": Case(
        _tv("resnet18", norm_layer=torchvision.ops.FrozenBatchNorm2d), 20
    ),
    "resnext50_32x4d-1-block-per-stage": Case(
        partial(
            tv_resnet.ResNet,
            tv_resnet.Bottleneck,
            [1, 1, 1, 1],
            groups=32,
            width_per_group=4,
            num_classes=NUM_CLASSES,
        ),
        17,
    ),
    "wide_resnet50_2-1-block-per-stage": Case(
        partial(
            tv_resnet.ResNet,
            tv_resnet.Bottleneck,
            [1, 1, 1, 1],
            width_per_group=128,
            num_classes=NUM_CLASSES,
        ),
        17,
        slow=True,
    ),
    "mobilenet_v2-x0.25": Case(_tv("mobilenet_v2", width_mult=0.25), 52),
    "mobilenet_v3_small-x0.25": Case(_tv("mobilenet_v3_small", width_mult=0.25), 34),
    "mobilenet_v3_large-x0.25": Case(_tv("mobilenet_v3_large", width_mult=0.25), 46),
    "efficientnet_b0": Case(_tv("efficientnet_b0"), 49),
    "efficientnet_v2-tiny": Case(
        partial(
            tv_effnet.EfficientNet,
            [
                tv_effnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1),
                tv_effnet.FusedMBConvConfig(4, 3, 2, 8, 16, 2),
                tv_effnet.MBConvConfig(4, 3, 2, 16, 24, 2),
            ],
            dropout=0.2,
            last_channel=64,
            num_classes=NUM_CLASSES,
            norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
        ),
        13,
    ),
    "regnet_y-tiny": Case(partial(_tiny_regnet, 0.25), 15),
    "regnet_x-tiny": Case(partial(_tiny_regnet, None), 15),
    "densenet-tiny": Case(
        partial(
            torchvision.models.DenseNet,
            growth_rate=8,
            block_config=(2, 2, 2, 2),
            num_init_features=16,
            bn_size=2,
            num_classes=NUM_CLASSES,
        ),
        9,
    ),
    "shufflenet_v2_x0_5": Case(_tv("shufflenet_v2_x0_5"), 56),
    "mnasnet0_5": Case(_tv("mnasnet0_5"), 52),
    "googlenet": Case(_tv("googlenet", aux_logits=False, init_weights=True), 57),
    "inception_v3": Case(
        _tv("inception_v3", aux_logits=False, init_weights=True), 94, size=75, slow=True
    ),
    "vgg11_bn-x1/16": Case(_tiny_vgg11_bn, 4),
}

_TINY_XCEPTION = [  # xception41's entry/middle/exit flow pattern at 1/16-1/20 width
    {"in_chs": 64, "out_chs": 32, "stride": 2},
    {"in_chs": 32, "out_chs": 48, "stride": 2},
    {"in_chs": 48, "out_chs": 48, "stride": 1},
    {"in_chs": 48, "out_chs": (48, 64, 64), "stride": 2},
    {"in_chs": 64, "out_chs": (64, 64, 96), "stride": 1, "no_skip": True, "start_with_relu": False},
]

# timm: the smallest registered variant of each family, shrunk through constructor kwargs where
# the variant passes them on.
TIMM_ZOO: dict[str, Case] = {
    "resnet10t": Case(_timm("resnet10t", channels=(16, 32, 64, 128)), 15),
    "resnet18d": Case(_timm("resnet18d", channels=(16, 32, 64, 128)), 23),
    "efficientnet_b0": Case(_timm("efficientnet_b0"), 49),
    "tf_efficientnetv2_b0": Case(_timm("tf_efficientnetv2_b0"), 54),
    "mobilenetv2_035": Case(_timm("mobilenetv2_035"), 52),
    "mobilenetv3_small_050": Case(_timm("mobilenetv3_small_050"), 34),
    "regnety_002": Case(_timm("regnety_002"), 44),
    "cspresnet50": Case(_timm("cspresnet50"), 55),
    "cs3darknet_s": Case(_timm("cs3darknet_s"), 32),
    "dla46_c": Case(_timm("dla46_c"), 48),
    "ghostnet_050": Case(_timm("ghostnet_050"), 80),
    "rexnet_100-x0.5": Case(_timm("rexnet_100", width_mult=0.5), 62),
    "densenet121-tiny": Case(_timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2)), 9),
    "hrnet_w18_small": Case(_timm("hrnet_w18_small"), 91),
    "xception41-tiny": Case(_timm("xception41", block_cfg=_TINY_XCEPTION), 35),
    "test_efficientnet-FrozenBatchNormAct2d": Case(_timm("test_efficientnet", frozen=True), 10),
}


def _params(zoo: dict[str, Case]) -> list[Any]:
    return [
        pytest.param(name, marks=[pytest.mark.zoo_slow] if case.slow else [])
        for name, case in zoo.items()
    ]


def perturb_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affine (BatchNorm*, norm-act, frozen BNs), as if pretrained."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)):
            continue
        c = mean.numel()
        with torch.no_grad():
            mean.copy_(0.1 * torch.randn(c, generator=gen))
            var.copy_(0.5 + torch.rand(c, generator=gen))
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def check_zoo_model(label: str, base: nn.Module, case: Case) -> dict[str, Any]:
    """All zoo checks on one model; returns the figures for the table."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, case.size, case.size, generator=gen)
    perturb_bn(base)
    ref = copy.deepcopy(base).eval()
    model = wrap(base, AdaFilterConfig(), example_input=x[:1]).eval()
    summary = model.gating_summary()
    assert len(summary.gated) >= case.min_gated, summary.brief()
    with torch.no_grad():
        want = ref(x)
    init_diff = 0.0
    for mode in MODES:
        for fast in (True, False):
            model.set_policy_mode(mode, seed=1)
            with torch.set_grad_enabled(not fast):  # the fast path runs without gradients
                got = model(x).detach()
            init_diff = max(init_diff, _rel(got, want))
            assert init_diff <= 1e-5, (label, mode, fast, init_diff)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".conv_s." in n for n in frozen)
    opt = torch.optim.SGD(model.param_groups(lr=0.01, gate_lr=0.1), momentum=0.9)
    model.train()
    for step in range(2):
        model.set_policy_mode("random", p=0.5, seed=step)
        xb = torch.randn(4, 3, case.size, case.size, generator=gen)
        yb = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
        loss = nn.functional.cross_entropy(model(xb), yb)
        assert torch.isfinite(loss), label
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), (label, n)  # S bit-identical
    model.eval()
    fast_diff = 0.0
    for mode in ("learned", "random"):
        for batch in (1, 4):  # batch 1 merges filters, batch 4 computes the used ones
            xe = torch.randn(batch, 3, case.size, case.size, generator=gen)
            model.set_policy_mode(mode, seed=3)
            dual = model(xe).detach()
            model.set_policy_mode(mode, seed=3)
            with torch.no_grad():
                fast = model(xe)
            fast_diff = max(fast_diff, _rel(fast, dual))
            assert fast_diff <= 1e-4, (label, mode, batch, fast_diff)
    return {
        "model": label,
        "gated": len(summary.gated),
        "skipped": len(summary.skipped),
        "skip_reasons": summary.skip_reasons(),
        "init_rel_diff": init_diff,
        "fast_dual_rel_diff": fast_diff,
        "seconds": time.perf_counter() - start,
    }


def _report(capsys: pytest.CaptureFixture[str], row: dict[str, Any]) -> None:
    with capsys.disabled():
        print(
            f"\n[zoo] {row['model']:40s} gated {row['gated']:3d} skipped {row['skipped']:3d} "
            f"init {row['init_rel_diff']:.1e} fast-dual {row['fast_dual_rel_diff']:.1e} "
            f"{row['seconds']:.1f}s {row['skip_reasons'] or ''}"
        )


@pytest.mark.parametrize("name", _params(TV_ZOO))
def test_torchvision_zoo(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    case = TV_ZOO[name]
    _report(capsys, check_zoo_model(f"tv:{name}", case.build(), case))


@needs_timm
@pytest.mark.parametrize("name", _params(TIMM_ZOO))
def test_timm_zoo(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    case = TIMM_ZOO[name]
    _report(capsys, check_zoo_model(f"timm:{name}", case.build(), case))


# ---- refused and skipped -------------------------------------------------------------------


def _tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=NUM_CLASSES)


def _tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(32, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16)


BN_FREE: dict[str, Callable[[], nn.Module]] = {
    "tv:convnext-tiny": _tiny_convnext,
    "tv:vit-tiny": _tiny_vit,
    "timm:test_convnext": _timm("test_convnext"),
    "timm:test_vit": _timm("test_vit", img_size=32),
}


@pytest.mark.parametrize("name", list(BN_FREE))
def test_bn_free_models_are_refused_with_one_line(name: str) -> None:
    if name.startswith("timm:") and not HAS_TIMM:
        pytest.skip("timm not installed")
    model = BN_FREE[name]()
    with pytest.raises(ValueError, match="no Conv2d directly followed by a BatchNorm2d") as err:
        wrap(model, example_input=torch.randn(1, 3, 32, 32))
    msg = str(err.value)
    assert "\n" not in msg and type(model).__name__ in msg
    assert "no BatchNorm directly after it" in msg  # the reason, counted


def test_sync_batchnorm_is_refused_with_the_reason() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18())
    with pytest.raises(ValueError, match="followed by SyncBatchNorm: 20") as err:
        wrap(model, example_input=torch.randn(1, 3, 32, 32))
    assert "\n" not in str(err.value)
    summary = plan_gating(model, torch.randn(1, 3, 32, 32))
    assert "convert it to BatchNorm2d" in summary.skipped[0].detail


class Awkward(nn.Module):
    """Each conv but the last has something that forbids gating it."""

    def __init__(self) -> None:
        super().__init__()
        self.residual = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # output also added back
        self.residual_bn = nn.BatchNorm2d(4)
        self.inplace = nn.Conv2d(4, 4, 3, padding=1, bias=False)  # output changed before its BN
        self.inplace_bn = nn.BatchNorm2d(4)
        self.group = nn.Conv2d(4, 4, 1, bias=False)  # GroupNorm after it
        self.gn = nn.GroupNorm(2, 4)
        self.twice = nn.Conv2d(4, 4, 1, bias=False)  # shared weights: runs twice
        self.twice_bn = nn.BatchNorm2d(4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.reflect_bn = nn.BatchNorm2d(4)
        self.ok = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.ok_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.residual(x)
        x = torch.relu(self.residual_bn(y) + y)
        y = self.inplace(x)
        y.mul_(2.0)
        x = torch.relu(self.inplace_bn(y))
        x = torch.relu(self.gn(self.group(x)))
        x = self.twice_bn(self.twice(self.twice(x)))
        x = torch.relu(self.reflect_bn(self.reflect(x)))
        x = torch.relu(self.ok_bn(self.ok(x)))
        return self.fc(x.mean((2, 3)))


def test_what_cannot_be_gated_is_skipped_with_the_reason_and_logged() -> None:
    base = perturb_bn(Awkward())
    ref = copy.deepcopy(base).eval()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("adafilter")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        model = wrap(base, example_input=torch.randn(1, 3, 16, 16)).eval()
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    summary = model.gating_summary()
    assert [p.conv for p in summary.gated] == ["ok"]
    reasons = {s.conv: s.reason for s in summary.skipped}
    assert reasons == {
        "residual": "its output also feeds something other than its BatchNorm",
        "inplace": "its output is modified in place before its BatchNorm",
        "group": "no BatchNorm directly after it",
        "twice": "runs more than once per forward",
        "reflect": "not zero-padded",
    }
    text = str(summary)
    assert "gated    ok -> ok_bn (BatchNorm2d)" in text and "followed by GroupNorm 'gn'" in text
    logged = " ".join(r.getMessage() for r in records)
    assert "Awkward: gated 1 of 6 convs" in logged and "not zero-padded: 1" in logged
    x = torch.randn(2, 3, 16, 16)
    for mode in MODES:
        model.set_policy_mode(mode, seed=0)
        with torch.no_grad():
            assert _rel(model(x), ref(x)) <= 1e-5


# ---- norm kinds in both BN modes ---------------------------------------------------------------


def _norm_net(norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        norm(8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        norm(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )


def _bn_act(c: int) -> nn.Module:
    from timm.layers import BatchNormAct2d

    return BatchNormAct2d(c, act_layer=nn.SiLU)


def _frozen_bn_act(c: int) -> nn.Module:
    from timm.layers import FrozenBatchNormAct2d

    return FrozenBatchNormAct2d(c, act_layer=nn.ReLU)


NORMS: dict[str, tuple[Callable[[int], nn.Module], bool, bool]] = {  # norm, fixed, timm
    "BatchNorm2d": (nn.BatchNorm2d, False, False),
    "FrozenBatchNorm2d": (torchvision.ops.FrozenBatchNorm2d, True, False),
    "timm BatchNormAct2d": (_bn_act, False, True),
    "timm FrozenBatchNormAct2d": (_frozen_bn_act, True, True),
}


@pytest.mark.parametrize("gated_bn", [True, False])
@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_kinds_exact_at_init_and_statistics_after_a_step(kind: str, gated_bn: bool) -> None:
    norm, fixed, uses_timm = NORMS[kind]
    if uses_timm and not HAS_TIMM:
        pytest.skip("timm not installed")
    torch.manual_seed(0)
    base = perturb_bn(_norm_net(norm))
    acts = [m.act for m in base.modules() if hasattr(m, "act")]
    ref = copy.deepcopy(base).eval()
    model = wrap(base, AdaFilterConfig(gated_bn=gated_bn), example_input=torch.randn(1, 3, 8, 8))
    assert len(model.gated_layer_names) == 2
    if acts:  # the act stays in the norm's slot, after the gated selection
        assert [model.model[i].act for i in (1, 3)] == acts
        assert all(isinstance(model.model[i], NormActTail) for i in (1, 3))
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    for mode in MODES:
        model.set_policy_mode(mode, seed=0)
        with torch.no_grad():
            assert _rel(model(x), ref(x)) <= 1e-5, mode
    layer = model.gated_layers()["0"]
    bn = layer.bn_f if gated_bn else layer.bn
    before = bn.running_var.clone()
    model.train()
    model.set_policy_mode("random", seed=0)
    model(x).sum().backward()
    assert torch.equal(bn.running_var, before) == fixed  # frozen BNs keep their statistics
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
