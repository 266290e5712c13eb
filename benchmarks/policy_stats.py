"""What a trained AdaFilter run's policy is on its test set: per-layer fine-tuned share and
per-example diversity.

For each run directory: the run is loaded (``adafilter.load``), its evaluation split is run
once in eval mode, and the decisions of every test image are pooled. Prints one JSON object per
run: ``layer_f`` (fine-tuned share per gated layer), ``layers_below_0.9``,
``layers_outside_0.4_0.6``, ``fraction_std`` (std over test images of each image's fine-tuned
share), ``hamming`` (mean pairwise share of filters on which two test images' policies differ),
``filter_consistency`` (share of (filter) decisions that all but 10% of the images agree on).

    python benchmarks/policy_stats.py benchmarks/results/near/adafilter-s0 --data-root DIR
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader

import adafilter
from adafilter.training.data import run_datasets
from adafilter.training.telemetry import policy_diversity


@torch.no_grad()
def stats(run: str, data_root: str | None, batch_size: int) -> dict:
    loaded = adafilter.load(run)
    model = loaded.model
    config = loaded.config.replace(data_root=data_root) if data_root else loaded.config
    _, evals, _ = run_datasets(config.replace(val_fraction=0.0, train_per_class=None))
    decisions: dict[str, list[torch.Tensor]] = {}
    correct = 0
    for x, y in DataLoader(evals, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
        for name, pol in model.policies.items():
            decisions.setdefault(name, []).append(pol)
    pooled = {k: torch.cat(v) for k, v in decisions.items()}  # {layer: (N, C) bool}
    layer_f = [float(v.float().mean()) for v in pooled.values()]
    p = torch.cat([v.float().mean(0) for v in pooled.values()])  # per filter share of images
    return {
        "run": run,
        "test_acc": 100.0 * correct / len(evals),
        "layers": len(layer_f),
        "mean_f": sum(layer_f) / len(layer_f),
        "layers_below_0.9": sum(f < 0.9 for f in layer_f),
        "layers_outside_0.4_0.6": sum(f < 0.4 or f > 0.6 for f in layer_f),
        "filter_consistency": float(((p <= 0.1) | (p >= 0.9)).float().mean()),
        **policy_diversity(pooled),
        "layer_f": [round(f, 3) for f in layer_f],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        print(json.dumps(stats(run, args.data_root, args.batch_size)), flush=True)


if __name__ == "__main__":
    main()
