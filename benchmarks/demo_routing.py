"""Does the demo's AdaFilter route by image kind? Per gated layer, the fine-tuned share of
positives and of negatives in the ``fashion-mnist-negatives`` test split.

The demo's target mixes plain Fashion-MNIST images (for which the pretrained filters S are
right) with relabelled negatives (for which they are wrong). This reads trained runs (the
demo's ``OUT/runs/adafilter``, one per thread count or seed) and prints one JSON object: per
run the test accuracy on positives and negatives and, for AdaFilter runs, per layer the share
of filters taken from F by positives and by negatives, and their difference.

    python benchmarks/demo_routing.py demo-out/runs/finetune demo-out/runs/adafilter
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from adafilter.data.fashion_mnist import default_root, load_negatives, negative_mask
from adafilter.deploy import load


@torch.no_grad()
def routing(run_dir: Path, data_root: Path) -> dict[str, Any]:
    """Accuracy and per-layer fine-tuned share for positives vs negatives of one run."""
    run = load(run_dir)
    _, test = load_negatives(data_root, seed=0)  # the whole test split (10,000 images)
    keys = [key for key, _ in test.samples]
    neg = torch.from_numpy(negative_mask(len(keys), "eval"))  # (N,) bool
    correct, shares = [], {}
    for start in range(0, len(test), 200):
        idx = range(start, min(start + 200, len(test)))
        x = torch.stack([run.transform(test.source.open(keys[i])) for i in idx])  # (B, 3, R, R)
        y = torch.tensor([test.samples[i][1] for i in idx])
        correct.append(run.model(x).argmax(1) == y)
        for name, pol in getattr(run.model, "policies", {}).items():  # (B, C) bool
            shares.setdefault(name, []).append(pol.float().mean(1))
    ok = torch.cat(correct)
    out: dict[str, Any] = {
        "method": run.method,
        "test_images": len(test),
        "negatives": int(neg.sum()),
        "acc_positives": round(100 * float(ok[~neg].float().mean()), 2),
        "acc_negatives": round(100 * float(ok[neg].float().mean()), 2),
        "acc_all": round(100 * float(ok.float().mean()), 2),
    }
    if shares:
        per = {k: torch.cat(v) for k, v in shares.items()}  # layer -> (N,) F share per image
        pos_f = [round(float(v[~neg].mean()), 3) for v in per.values()]
        neg_f = [round(float(v[neg].mean()), 3) for v in per.values()]
        out["f_share_positives"] = pos_f
        out["f_share_negatives"] = neg_f
        out["difference"] = [round(b - a, 3) for a, b in zip(pos_f, neg_f, strict=True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-root", type=Path, default=default_root(), help="Fashion-MNIST folder")
    args = ap.parse_args()
    if args.data_root is None:
        ap.error("no Fashion-MNIST folder: pass --data-root")
    torch.set_num_threads(1)
    print(json.dumps({str(r): routing(r, args.data_root) for r in args.runs}))


if __name__ == "__main__":
    main()
