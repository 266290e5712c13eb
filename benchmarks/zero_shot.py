"""S's zero-shot accuracy on a target whose classes are ImageNet classes (a reference line).

An ImageNet backbone keeps its own 1000-way head; its logits are restricted to the target's
classes (Imagewoof's 10 breeds are ImageNet classes; folder names ``<wnid>_<name>`` are matched
to torchvision's ImageNet category names) and evaluated on the target's test split with the
evaluation transform of the study (resize R*256/224, centre crop R) at each resolution.

    python benchmarks/zero_shot.py --data /tmp/data/imagewoof-mini --out results/zero-shot.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from paths import repo_relative
from torchvision.models import ResNet50_Weights

from adafilter.backbones import build_backbone
from adafilter.data.api import build_datasets
from adafilter.utils.io import atomic_write_text


def _key(name: str) -> str:
    return re.sub(r"[^a-z]+", "_", name.lower()).strip("_")


def imagenet_indices(class_names: list[str]) -> list[int]:
    """ImageNet index of each ``<wnid>_<name>`` (or ``<name>``) class folder."""
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    categories = {_key(c): i for i, c in enumerate(names)}
    out = []
    for name in class_names:
        key = _key(re.sub(r"^n\d{8}_?", "", name))
        if key not in categories:
            raise SystemExit(f"class {name!r} is not an ImageNet category name")
        out.append(categories[key])
    return out


@torch.no_grad()
def zero_shot(data: str, backbone: str, resolution: int, batch: int = 50) -> dict:
    """Accuracy (%) of the backbone's ImageNet head restricted to the target's classes."""
    model, info = build_backbone(backbone, num_classes=1000, weights="pretrained", keep_head=True)
    model.eval()
    _, ds, dinfo = build_datasets(
        "imagefolder",
        data,
        resolution=resolution,
        mean=info.mean,
        std=info.std,
        augment="random-crop",
    )
    idx = torch.tensor(imagenet_indices(list(dinfo.class_names)))
    correct = total = 0
    loader = torch.utils.data.DataLoader(ds, batch_size=batch)
    for x, y in loader:
        pred = model(x)[:, idx].argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
    return {
        "resolution": resolution,
        "test_acc": round(100.0 * correct / total, 2),
        "images": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="imagefolder root whose classes are ImageNet's")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--resolutions", default="96,128,160,224")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for r in (int(v) for v in args.resolutions.split(",")):
        rows.append(zero_shot(args.data, args.backbone, r))
        print(json.dumps(rows[-1]), flush=True)
    result = {"backbone": args.backbone, "data": args.data, "split": "test", "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(repo_relative(result), indent=1) + "\n")


if __name__ == "__main__":
    main()
