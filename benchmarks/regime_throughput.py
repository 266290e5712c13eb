"""Training and evaluation throughput of fine-tuning and AdaFilter, one CPU thread, per resolution.

Plans the near-domain study (issue 29): one epoch of ``adafilter train`` per (method,
resolution) on an ``imagefolder`` dataset (e.g. imagewoof-mini, 30 training images per class,
20% of them held out for validation), and records the training images per second and the
epoch's wall time with precise BN, validation and test evaluation included.

    python benchmarks/regime_throughput.py --data /tmp/imagewoof-mini --out throughput.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from paths import repo_relative

from adafilter.training.config import TrainConfig
from adafilter.training.fit import fit
from adafilter.utils.io import atomic_write_text


def measure(data: str, method: str, resolution: int, *, per_class: int, backbone: str) -> dict:
    """One epoch of ``method`` at ``resolution``; its throughput and wall times."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            method=method,
            dataset="imagefolder",
            data_root=data,
            backbone=backbone,
            weights="pretrained",
            resolution=resolution,
            batch_size=32,
            epochs=1,
            train_per_class=per_class,
            val_fraction=0.2,
            device="cpu",
            workers=0,
            quiet=True,
            out=out,
        )
        t0 = time.perf_counter()
        s = fit(cfg)
        row = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "method": method,
        "resolution": resolution,
        "train_images": s["num_train"],
        "train_images_per_second": round(row["images_per_second"], 2),
        "epoch_seconds_with_eval": round(row["seconds"], 1),
        "fit_seconds": round(time.perf_counter() - t0, 1),
        "test_acc_after_1_epoch": row["test_acc"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="imagefolder root (train/, test/)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--resolutions", default="128,160,224")
    ap.add_argument("--methods", default="finetune,adafilter")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for res in (int(r) for r in args.resolutions.split(",")):
        for method in args.methods.split(","):
            rows.append(
                measure(args.data, method, res, per_class=args.per_class, backbone=args.backbone)
            )
            print(json.dumps(rows[-1]), flush=True)
            result = {"threads": 1, "backbone": args.backbone, "data": args.data, "rows": rows}
            atomic_write_text(Path(args.out), json.dumps(repo_relative(result), indent=1) + "\n")


if __name__ == "__main__":
    main()
