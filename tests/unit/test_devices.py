"""Devices and precisions: CUDA (skipped without a GPU), autocast (CPU bf16, CUDA fp16/bf16).

The CPU float32 path is checked against a per-channel reference in ``test_gated_bn``; here every
other device/dtype is checked against that path run in float64 on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from adafilter import AdaFilterConfig, wrap
from adafilter.layers.gated_bn import gated_batch_norm
from helpers import perturb_bn, random_bns

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (device, activation dtype, relative tolerance of activation-sized outputs (one rounding to
# dtype), of per-channel results (statistics and BN parameter gradients, kept in float32))
PRECISIONS = [
    ("cpu", torch.float32, 1e-5, 1e-5),
    ("cpu", torch.bfloat16, 5e-3, 1e-5),
    pytest.param("cuda", torch.float32, 1e-5, 1e-5, marks=needs_cuda),
    pytest.param("cuda", torch.float16, 1.5e-3, 2e-4, marks=needs_cuda),
    pytest.param("cuda", torch.bfloat16, 5e-3, 2e-3, marks=needs_cuda),
]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach()
    return float((got.detach().double().cpu() - want).norm() / want.norm().clamp(min=1e-30))


@pytest.mark.parametrize("device,dtype,tol,tol_stats", PRECISIONS)
def test_gated_bn_matches_float64_cpu(
    device: str, dtype: torch.dtype, tol: float, tol_stats: float
) -> None:
    gen = torch.Generator().manual_seed(1)
    b, c, h, w = 12, 9, 6, 6
    xf64 = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * 2 + 1
    xs64 = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * 0.5 - 1
    g64 = (torch.rand(b, c, generator=gen) < 0.5).double()
    dy64 = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    # the inputs are rounded to `dtype` once, so the reference sees the same numbers
    xf64, xs64, dy64 = (t.to(dtype).double() for t in (xf64, xs64, dy64))

    results = []
    for dev, dt in ((device, dtype), ("cpu", torch.float64)):
        bn_f, bn_s = (
            bn.to(dev, torch.float32 if dt != torch.float64 else dt) for bn in random_bns(c)
        )
        xf = xf64.to(dev, dt).requires_grad_()
        xs = xs64.to(dev, dt).requires_grad_()
        g = g64.to(dev, dt).requires_grad_()
        y = gated_batch_norm(xf, xs, g, bn_f, bn_s, training=True)
        assert y.dtype == dt and y.device.type == dev
        y.backward(dy64.to(dev, dt))
        results.append(
            [y, xf.grad, xs.grad, g.grad, bn_f.weight.grad, bn_s.bias.grad, bn_f.running_mean]
        )
        assert bn_f.running_var.dtype == bn_f.weight.dtype  # buffers keep their dtype
    for name, got, want in zip(
        ("y", "dxf", "dxs", "dg", "dgamma_f", "dbeta_s", "running_mean"), *results, strict=True
    ):
        assert torch.isfinite(got).all(), name
        bound = tol if name in ("y", "dxf", "dxs", "dg") else tol_stats
        assert _rel(got, want) <= bound, (name, _rel(got, want))


def _tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_bn(torchvision.models.resnet18(num_classes=5), seed)


AUTOCAST = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=needs_cuda),
    pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
]


def _step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, amp: torch.dtype | None
) -> torch.Tensor:
    """One SGD step under autocast ``amp`` (``None``: float32); returns the float logits."""
    model.train()
    opt = torch.optim.SGD(model.param_groups(lr=0.01, gate_lr=0.1), momentum=0.9)
    # fp16: a moderate loss scale, so this one step is not skipped for overflow
    scaler = torch.amp.GradScaler(device, init_scale=128.0) if amp == torch.float16 else None
    with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
    opt.zero_grad()
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
        if model.policy_mode == "learned" and p.requires_grad:  # every parameter is reached
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_var.dtype == torch.float32 and torch.isfinite(m.running_var).all()
    return out.float().detach()


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_training_step_is_close_to_float32(device: str, dtype: torch.dtype) -> None:
    # gate bias 0: the learned policy mixes F and S, so every parameter gets a gradient
    cfg = AdaFilterConfig(gate_bias_init=0.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 5, (8,), generator=gen).to(device)
    low = wrap(_tiny_resnet(), cfg).to(device)
    # F != S, as after any training step (at initialisation, where a branch falls back to
    # running statistics, both branch outputs coincide and the gate's gradient is exactly 0)
    with torch.no_grad():
        for layer in low.gated_layers().values():
            layer.conv_f.weight.mul_(1.05)
    frozen = {k: v.clone() for k, v in low.state_dict().items() if "conv_s" in k}
    _step(low, x, y, device, dtype)  # learned policy: all gradients finite and non-zero
    for k, v in frozen.items():
        assert torch.equal(low.state_dict()[k], v), k  # S untouched
    # same (seeded random) policies in both precisions: outputs and updates agree
    outs, deltas = [], []
    for amp in (None, dtype):
        model = wrap(_tiny_resnet(), cfg).to(device)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        model.set_policy_mode("random", seed=5)
        outs.append(_step(model, x, y, device, amp))
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        deltas.append(torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)]))
    assert (outs[1] - outs[0]).norm() / outs[0].norm() < 0.05
    assert nn.functional.cosine_similarity(deltas[0], deltas[1], dim=0) > 0.95


@needs_cuda
@pytest.mark.parametrize("gated_bn", [True, False])
def test_cuda_wrapped_equals_original_and_fast_equals_dual(gated_bn: bool) -> None:
    base = _tiny_resnet()
    ref = copy.deepcopy(base).cuda().eval()
    model = wrap(base.cuda(), AdaFilterConfig(gated_bn=gated_bn))  # wrapped on the GPU
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    x = torch.randn(4, 3, 32, 32, device="cuda")
    torch.backends.cudnn.allow_tf32 = False  # exact float32 convs for the comparison
    try:
        with torch.no_grad():
            want = ref(x)
            model.eval()
            for mode in ("learned", "random", "finetuned", "pretrained"):
                model.set_policy_mode(mode, seed=1)
                assert _rel(model(x), want.double().cpu()) < 1e-5, mode
        # a few training steps make F differ from S; the fast path must equal the dual path
        opt = torch.optim.SGD(model.param_groups(lr=0.05, gate_lr=0.5), momentum=0.9)
        for step in range(3):
            model.train()
            model.set_policy_mode("random", seed=step)
            loss = nn.functional.cross_entropy(model(x), torch.arange(4, device="cuda") % 5)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        for mode in ("learned", "random"):
            for batch in (1, 1, 4):
                xb = x[:batch] + 0.1 * torch.randn_like(x[:batch])
                model.set_policy_mode(mode, seed=7)
                dual = model(xb).detach()
                for subsets in (False, True):  # the opt-in host-read filter subsets too
                    for layer in model.gated_layers().values():
                        layer.device_subsets = subsets
                    model.set_policy_mode(mode, seed=7)
                    with torch.no_grad():
                        fast = model(xb)
                    assert _rel(fast, dual.double().cpu()) < 1e-4, (mode, batch, subsets)
    finally:
        torch.backends.cudnn.allow_tf32 = True
