"""Is a method difference in the transfer benchmark larger than rounding noise?

Trains the same 12 SGD steps (identical batches, identical dropout randomness) for: fine-tuning;
fine-tuning with every weight multiplied by (1 + 1e-6 * noise); AdaFilter with its policy forced
to all-fine-tuned (mathematically fine-tuning with two BNs); AdaFilter as learned. Prints the
per-step losses as JSON and writes ``benchmarks/results/transfer-sensitivity-<backbone>.json``.

    python benchmarks/transfer_sensitivity.py --backbone efficientnet-lite0 --resolution 64
    python benchmarks/transfer_sensitivity.py --backbone cifar-resnet20 --resolution 32

CIFAR ResNet weights come from ``--weights`` (default: the file in ../shared for cifar-resnet20).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from paths import repo_relative

from adafilter.training.build import build_model
from adafilter.training.config import TrainConfig
from adafilter.training.optim import build_optimizer, build_param_groups

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR20 = Path(__file__).resolve().parents[2] / "shared/weights/cifar10-resnet/resnet20-12fca82f.th"
RUNS = (  # (label, method, forced policy mode, relative weight perturbation)
    ("finetune", "finetune", None, 0.0),
    ("finetune, weights x (1 + 1e-6 noise)", "finetune", None, 1e-6),
    ("adafilter, policy forced all-F", "adafilter", "finetuned", 0.0),
    ("adafilter, learned policy", "adafilter", None, 0.0),
)


def run(backbone: str, resolution: int, steps: int, batch: int, weights: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch, 3, resolution, resolution, generator=gen),
            torch.randint(0, 136, (batch,), generator=gen),
        )
        for _ in range(steps)
    ]
    out: dict = {"backbone": backbone, "resolution": resolution, "batch": batch, "losses": {}}
    for label, method, mode, eps in RUNS:
        cfg = TrainConfig(
            method=method,
            dataset="omniglot-small",
            backbone=backbone,
            weights=weights,
            resolution=resolution,
            seed=0,
        )
        prepared, _ = build_model(cfg, num_classes=136)
        model = prepared.model
        if eps:
            noise = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + eps * torch.randn(p.shape, generator=noise))
        if mode:
            model.set_policy_mode(mode)
        groups = build_param_groups(prepared, lr=0.01, gate_lr=0.1, weight_decay=5e-4)
        opt = build_optimizer(groups, momentum=0.9)
        model.train()
        torch.manual_seed(7)  # same dropout / drop-connect draws in every run
        losses = []
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 6))
        out["losses"][label] = losses
        if hasattr(model, "policies"):
            pol = torch.cat([p.float().flatten() for p in model.policies.values()])
            out.setdefault("policy_fraction_F", {})[label] = round(float(pol.mean()), 6)
    ref = out["losses"]["finetune"]
    out["max_abs_loss_diff_vs_finetune"] = {
        k: round(max(abs(a - b) for a, b in zip(v, ref, strict=True)), 6)
        for k, v in out["losses"].items()
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--weights", default=None, help="weights file (default: see the docstring)")
    args = ap.parse_args()
    weights = args.weights or (str(CIFAR20) if args.backbone == "cifar-resnet20" else "pretrained")
    result = run(args.backbone, args.resolution, args.steps, args.batch, weights)
    text = json.dumps(repo_relative(result), indent=1)
    print(text)
    path = RESULTS / f"transfer-sensitivity-{args.backbone}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
