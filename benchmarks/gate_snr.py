"""Is there a signal for the gate to learn? Signal-to-noise of its task gradient on a trained run.

Loads a run (``adafilter.load``), passes its training data ``--passes`` times in training mode
(batch 32, the run's training transform) and records, per mini-batch, the task loss's gradient
with respect to every policy head's bias (one number per filter: the batch-summed
d loss / d logit) and weight. Per parameter it forms the t statistic of the mean over batches
(mean / (std / sqrt(n))) and reports the share with |t| > 2 (about 0.046 for pure noise) and
|t| > 3 (0.0027), the median |mean| / std, and per layer the t statistic of the summed bias
gradient (a per-layer signal). Prints one JSON line per run and writes
``benchmarks/results/gate-snr.json``.

    R=benchmarks/results
    python benchmarks/gate_snr.py $R/near/adafilter-s0 $R/gate-pilot/ada-adam-s0
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from paths import stored_path

from adafilter.deploy import load
from adafilter.training.data import run_datasets

RESULTS = Path(__file__).resolve().parent / "results"


def _share_significant(x: torch.Tensor, level: float) -> float:
    n = x.shape[0]
    t = x.mean(0) / (x.std(0) / n**0.5 + 1e-30)
    return round(float((t.abs() > level).float().mean()), 4)


def measure(run_dir: str, *, passes: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    run = load(run_dir)
    model = run.model
    train, _, _ = run_datasets(run.config)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    model.train()
    heads = list(model.gate.heads)
    biases, weights = [], []
    for _ in range(passes):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, [h.bias for h in heads] + [h.weight for h in heads])
            biases.append(torch.cat(grads[: len(heads)]))
            weights.append(torch.cat([g.flatten() for g in grads[len(heads) :]]))
    b = torch.stack(biases)  # (batches, filters)
    n = b.shape[0]
    per_layer = torch.stack([c.sum(1) for c in b.split([h.bias.numel() for h in heads], 1)], 1)
    t_layer = per_layer.mean(0) / (per_layer.std(0) / n**0.5)
    return {
        "run": stored_path(str(Path(run_dir).resolve())),
        "batches": n,
        "filters": b.shape[1],
        "bias_share_abs_t_gt_2": _share_significant(b, 2.0),
        "bias_share_abs_t_gt_3": _share_significant(b, 3.0),
        "bias_median_abs_mean_over_std": round(float((b.mean(0).abs() / b.std(0)).nanmedian()), 4),
        "head_weight_share_abs_t_gt_2": _share_significant(torch.stack(weights), 2.0),
        "layer_sum_t": [round(float(v), 2) for v in t_layer],
        "layers_abs_t_gt_2": int((t_layer.abs() > 2).sum()),
        "chance_abs_t_gt_2": 0.0455,
        "chance_abs_t_gt_3": 0.0027,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders of AdaFilter runs")
    ap.add_argument("--passes", type=int, default=2, help="passes over the training data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = []
    for r in args.runs:
        row = measure(r, passes=args.passes)
        print(json.dumps(row), flush=True)
        out.append(row)
    path = RESULTS / "gate-snr.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
