"""Which BN statistics a trained fine-tuning run should be evaluated with.

For each run directory: the run's test accuracy with the statistics it stored (precise BN over
its training images, or running averages), then the same weights with every BN's running mean
and variance replaced by the pretrained network's (ImageNet for Lite0) -- the statistics the
pretrained filters were made for. A gated run (AdaFilter, random policy) keeps two BNs per
gated conv (Eq. 5): both branches get the statistics of the pretrained BN they were copied
from. The weights are the same in both rows; only the normalisation statistics differ.

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
    dst = _bn_groups(out)
    if len(src) != len(dst):
        raise SystemExit(
            f"error: {len(dst)} BNs (gated pairs counted once) in the run against {len(src)} "
            f"in the pretrained {backbone}; pass runs of that backbone"
        )
    for a, group in zip(src, dst, strict=True):
        for b in group:
            b.running_mean.copy_(a.running_mean)
            b.running_var.copy_(a.running_var)
    return out


def _bn_groups(model: nn.Module) -> list[list[_BN]]:
    """The model's BNs in order, a gated conv's two branch BNs (``bn_s``, ``bn_f``) as one
    group: the pretrained BN both were copied from."""
    modules = dict(model.named_modules())
    groups: list[list[_BN]] = []
    for name, m in modules.items():
        if not isinstance(m, _BN):
            continue
        sibling = modules.get(name[: -len("bn_f")] + "bn_s") if name.endswith(".bn_f") else None
        if sibling is not None and groups and groups[-1][0] is sibling:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def probe(run: str, data_root: str | None, batch_size: int | None) -> dict[str, object]:
    """Test accuracy of one run with its stored and with the pretrained BN statistics."""
    loaded = adafilter.load(run)
    config = loaded.config.replace(data_root=data_root) if data_root else loaded.config
    batch_size = batch_size or config.batch_size
    _, _, evals, info = run_splits(config)
    # Copied before either evaluation: a random policy's generator starts both at the draws
    # the run's own evaluation made.
    swapped = _with_pretrained_statistics(loaded.model, config.backbone, info.num_classes)
    return {
        "run": run,
        "precise_bn": config.precise_bn,
        "test_acc_stored_statistics": round(_accuracy(loaded.model, evals, batch_size), 2),
        "test_acc_pretrained_statistics": round(_accuracy(swapped, evals, batch_size), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--data-root", default=None, help="the runs' dataset folder here")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="evaluation batch (default: the run's, so that a random policy's draws and the "
        "stored accuracy are reproduced)",
    )
    ap.add_argument("--out", default="", help="write the rows here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        rows.append(probe(run, args.data_root, args.batch_size))
        print(rows[-1], flush=True)
        if args.out:  # after every run: a later run's error loses nothing
            atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
