"""Issue 15: where could all-F AdaFilter and fine-tuning differ on EfficientNet-Lite0?

Two checks, one JSON object (also ``benchmarks/results/allf-checks.json``):

* ``eval``: the evaluation path. A trained fine-tuning run's network is wrapped (F = S = its
  weights, both BNs = its BN with the stored, calibrated running statistics), forced all-F,
  and both are evaluated on the same test images: accuracy, argmax agreement, max logit gap.
* ``grad``: float32 rounding. One training-mode gradient of ImageNet Lite0 at 64 px on 64 real
  training images (dropout and drop-connect off), in float32 and float64, for fine-tuning and
  for AdaFilter-all-F: the float32 error against float64 (global and per tensor, tensors whose
  gradient is below 1% of the median norm skipped).

    python benchmarks/allf_checks.py --cifar10 DIR --run benchmarks/results/allf/finetune-s0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import adafilter
from adafilter.backbones import build_backbone
from adafilter.deploy import load

RESULTS = Path(__file__).resolve().parent / "results"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _files(root: Path, per_class: int | None = None) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())[:per_class]]


def _all_f(net: torch.nn.Module, res: int) -> Any:
    model = adafilter.wrap(
        copy.deepcopy(net), adafilter.AdaFilterConfig(), example_input=torch.zeros(1, 3, res, res)
    )
    model.set_policy_mode("finetuned")
    return model


@torch.no_grad()
def check_eval(run_dir: Path, data: Path) -> dict[str, Any]:
    run = load(run_dir)
    plain = run.model.eval()
    wrapped = _all_f(plain, run.resolution).eval()
    files = _files(data / "test")
    ok_p = ok_w = agree = 0
    gap = 0.0
    for s in range(0, len(files), 100):
        chunk = files[s : s + 100]
        x = torch.stack([run.transform(Image.open(f).convert("RGB")) for f, _ in chunk])
        y = torch.tensor([t for _, t in chunk])
        a, b = plain(x), wrapped(x)  # (B, K) each
        ok_p += int((a.argmax(1) == y).sum())
        ok_w += int((b.argmax(1) == y).sum())
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        gap = max(gap, float((a - b).abs().max()))
    n = len(files)
    return {
        "run": os.path.relpath(run_dir, RESULTS.parent.parent),
        "test_images": n,
        "acc_finetune_path": 100 * ok_p / n,
        "acc_allf_wrapper": 100 * ok_w / n,
        "argmax_agreement": agree / n,
        "max_logit_gap": gap,
    }


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> dict:
    model = copy.deepcopy(model).to(dtype).train()
    F.cross_entropy(model(x.to(dtype)), y).backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def check_grad(data: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    tf = T.Compose([T.Resize(64), T.ToTensor(), T.Normalize(MEAN, STD)])
    files = _files(data / "train", per_class=7)[:64]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f, _ in files])  # (64, 3, 64, 64)
    y = torch.tensor([t for _, t in files])
    net, _ = build_backbone("efficientnet-lite0", num_classes=10, weights="pretrained")
    for m in net.modules():  # no dropout / drop-connect noise in this comparison
        if hasattr(m, "drop_connect_rate"):
            m.drop_connect_rate = 0.0
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    out: dict[str, Any] = {}
    for name, model in (("finetune", net), ("adafilter-all-f", _all_f(net, 64))):
        g32, g64 = _grads(model, x, y, torch.float32), _grads(model, x, y, torch.float64)
        norms = sorted(float(g.norm()) for g in g64.values())
        floor = 1e-2 * norms[len(norms) // 2]
        errs = {
            n: float((g32[n] - g64[n]).norm()) / float(g64[n].norm())
            for n in g64
            if float(g64[n].norm()) > floor
        }
        diff = sum(float(((g32[n] - g64[n]) ** 2).sum()) for n in g64) ** 0.5
        ref = sum(float((g**2).sum()) for g in g64.values()) ** 0.5
        vals = sorted(errs.values())
        out[name] = {
            "global_rel_err": diff / ref,
            "tensors": len(vals),
            "median_rel_err": vals[len(vals) // 2],
            "max_rel_err": vals[-1],
            "tensors_over_1pct": sum(v > 1e-2 for v in vals),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar10", type=Path, required=True, help="extracted cifar10-subset")
    ap.add_argument("--run", type=Path, action="append", default=[], help="fine-tuning run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {
        "eval": [check_eval(r, args.cifar10) for r in args.run],
        "grad": check_grad(args.cifar10),
    }
    from adafilter.utils.io import atomic_write_json

    atomic_write_json(RESULTS / "allf-checks.json", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
