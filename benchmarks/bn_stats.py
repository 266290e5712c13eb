"""Which BN statistics a trained fine-tuning run should be evaluated with.

For each run directory (a plain-BN network, e.g. ``--method finetune``): the run's test
accuracy with the statistics it stored (precise BN over its training images, or running
averages), then the same weights with every BN's running mean and variance replaced by the
pretrained network's (ImageNet for Lite0) -- the statistics the pretrained filters were made
for. The weights are the same in both rows; only the normalisation statistics differ.

    python benchmarks/bn_stats.py benchmarks/results/woof30/finetune-s0 \\
        --data-root DIR --out benchmarks/results/bn-stats-woof30.json
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader

import adafilter
from adafilter.backbones import build_backbone
from adafilter.training.data import run_splits
from adafilter.utils.io import atomic_write_json

_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def _accuracy(model: nn.Module, data: object, batch_size: int) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def _with_pretrained_statistics(model: nn.Module, backbone: str, num_classes: int) -> nn.Module:
    """A copy of ``model`` whose BNs carry the pretrained network's running statistics."""
    pretrained, _ = build_backbone(backbone, num_classes=num_classes, weights="pretrained")
    src = [m for m in pretrained.modules() if isinstance(m, _BN)]
    out = copy.deepcopy(model)
    dst = [m for m in out.modules() if isinstance(m, _BN)]
    if len(src) != len(dst):
        raise SystemExit(
            f"error: {len(dst)} BNs in the run against {len(src)} in the pretrained "
            f"{backbone}; pass plain-BN runs (e.g. --method finetune)"
        )
    for a, b in zip(src, dst, strict=True):
        b.running_mean.copy_(a.running_mean)
        b.running_var.copy_(a.running_var)
    return out


def probe(run: str, data_root: str | None, batch_size: int) -> dict[str, object]:
    """Test accuracy of one run with its stored and with the pretrained BN statistics."""
    loaded = adafilter.load(run)
    config = loaded.config.replace(data_root=data_root) if data_root else loaded.config
    _, _, evals, info = run_splits(config)
    stored = _accuracy(loaded.model, evals, batch_size)
    swapped = _with_pretrained_statistics(loaded.model, config.backbone, info.num_classes)
    return {
        "run": run,
        "precise_bn": config.precise_bn,
        "test_acc_stored_statistics": round(stored, 2),
        "test_acc_pretrained_statistics": round(_accuracy(swapped, evals, batch_size), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories of plain-BN methods")
    ap.add_argument("--data-root", default=None, help="the runs' dataset folder here")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", default="", help="write the rows here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        rows.append(probe(run, args.data_root, args.batch_size))
        print(rows[-1], flush=True)
    if args.out:
        atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
