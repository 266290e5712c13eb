"""Figures behind the core's tests, printed as JSON (not a test: the tests assert bounds).

* max |wrapped - original| / max |original| at initialisation, every policy mode, fast and dual
  eval paths (ResNet-18/50, MobileNetV2 as the depthwise network);
* max |fast - dual| / max |dual| after 3 training steps, batch 1 and 8;
* parameter counts of AdaFilter ResNet-50 against plain ResNet-50.

    python benchmarks/core_checks.py
"""

from __future__ import annotations

import copy
import json

import torch
import torchvision
from torch import nn

from adafilter import AdaFilterModel, wrap


def _pretrained_like(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model


def init_equality(arch: str) -> dict[str, float]:
    torch.manual_seed(0)
    base = _pretrained_like(getattr(torchvision.models, arch)(num_classes=10)).eval()
    model = wrap(copy.deepcopy(base)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)
    out = {}
    for mode in ("learned", "random", "finetuned", "pretrained"):
        model.set_policy_mode(mode, seed=0)
        with torch.no_grad():
            fast = model(x)
        dual = model(x).detach()  # gradients on: the dual path
        scale = ref.abs().max()
        out[f"{mode}/fast"] = float((fast - ref).abs().max() / scale)
        out[f"{mode}/dual"] = float((dual - ref).abs().max() / scale)
    return out


def fast_vs_dual(arch: str) -> dict[str, float]:
    torch.manual_seed(0)
    base = _pretrained_like(getattr(torchvision.models, arch)(num_classes=10))
    model: AdaFilterModel = wrap(base)
    opt = torch.optim.SGD(model.param_groups(lr=0.05, gate_lr=0.5), momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):
        x = torch.randn(8, 3, 64, 64, generator=gen)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = {}
    for batch in (1, 8):
        x = torch.randn(batch, 3, 64, 64, generator=gen)
        dual = model(x).detach()
        with torch.no_grad():
            fast = model(x)
        out[f"batch{batch}"] = float((fast - dual).abs().max() / dual.abs().max())
    pol = torch.cat([p.float().flatten() for p in model.policies.values()])
    out["fraction_finetuned_filters"] = float(pol.mean())
    return out


def main() -> None:
    plain = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    counts = wrap(torchvision.models.resnet50()).parameter_counts()
    result = {
        "init_max_rel_diff": {
            a: init_equality(a) for a in ("resnet18", "resnet50", "mobilenet_v2")
        },
        "fast_vs_dual_after_training": {a: fast_vs_dual(a) for a in ("resnet18", "mobilenet_v2")},
        "resnet50_params": {"plain": plain, **counts, "ratio": counts["total"] / plain},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
