"""Is a learned policy learned? Compare the policies of runs that differ only in their seed.

Every seed starts from the same pretrained filters (S, and F = S), so filter c of layer l is
the same filter in every run; only the gate's initialisation and the data order differ. A
policy that follows the task should therefore agree across seeds, one that follows the gate's
random initialisation (or a random walk) should not. For each run this loads the trained model
and rebuilds the model at initialisation (same config and seed, before any step), runs the
same test images through both in eval mode and records each filter's fine-tuned share (over
images). It prints one JSON object:

- ``layer_corr``: Pearson correlation of the per-layer fine-tuned share between seeds (each
  pair; ``final`` and ``init``), and of each run's final with its own initial shares.
- ``filter_corr``: the same per filter.
- ``filter_majority_agree``: share of filters on which two runs' majority choices (F if more
  than half of the images take F) agree; 0.5 is what two unrelated policies with balanced
  shares give (``chance`` gives the exact expectation from the runs' own F rates).

    python benchmarks/policy_agreement.py benchmarks/results/near/adafilter-s{0,1,2} \\
        --data-root /tmp/cifar10-subset --images 500
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import adafilter
from adafilter.training.build import build_model
from adafilter.training.data import run_datasets


@torch.no_grad()
def filter_shares(model: nn.Module, loader: DataLoader) -> list[Tensor]:
    """Per gated layer, each filter's fine-tuned share over the loader's images: [(C,), ...]."""
    model.eval()
    sums: dict[str, Tensor] = {}
    n = 0
    for x, _ in loader:
        model(x)
        for name, pol in model.policies.items():  # (B, C) bool
            sums[name] = sums.get(name, 0) + pol.float().sum(0)
        n += x.shape[0]
    return [s / n for s in sums.values()]


def run_policies(run: str, data_root: str | None, images: int) -> dict[str, list[Tensor]]:
    """``{"final": shares, "init": shares}`` for one run directory."""
    loaded = adafilter.load(run)
    config = loaded.config.replace(data_root=data_root) if data_root else loaded.config
    _, evals, info = run_datasets(config.replace(val_fraction=0.0, train_per_class=None))
    loader = DataLoader(Subset(evals, range(min(images, len(evals)))), batch_size=50)
    prepared, _ = build_model(config, num_classes=len(loaded.class_names))
    return {
        "final": filter_shares(loaded.model, loader),
        "init": filter_shares(prepared.model, loader),
    }


def _corr(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def _agree(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Majority-choice agreement of two share vectors, and its chance level."""
    ma, mb = a > 0.5, b > 0.5
    pa, pb = float(ma.float().mean()), float(mb.float().mean())
    return float((ma == mb).float().mean()), pa * pb + (1 - pa) * (1 - pb)


def compare(pols: list[dict[str, list[Tensor]]]) -> dict[str, dict[str, list[float]]]:
    """Cross-seed (final, init) and final-vs-init statistics, per layer and per filter."""
    out: dict[str, dict[str, list[float]]] = {
        k: {"final": [], "init": [], "final_vs_init": []}
        for k in ("layer_corr", "filter_corr", "filter_majority_agree", "chance")
    }

    def vecs(p: dict[str, list[Tensor]], key: str) -> tuple[Tensor, Tensor]:
        layers = torch.stack([s.mean() for s in p[key]])  # (L,)
        return layers, torch.cat(p[key])  # (L,), (total filters,)

    def add(kind: str, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> None:
        out["layer_corr"][kind].append(round(_corr(a[0], b[0]), 3))
        out["filter_corr"][kind].append(round(_corr(a[1], b[1]), 3))
        agree, chance = _agree(a[1], b[1])
        out["filter_majority_agree"][kind].append(round(agree, 3))
        out["chance"][kind].append(round(chance, 3))

    for p, q in itertools.combinations(pols, 2):
        for key in ("final", "init"):
            add(key, vecs(p, key), vecs(q, key))
    for p in pols:
        add("final_vs_init", vecs(p, "final"), vecs(p, "init"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories of one setting, different seeds")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--images", type=int, default=500, help="test images (the first N)")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("give at least two runs (seeds) to compare")
    torch.set_num_threads(1)
    pols = [run_policies(r, args.data_root, args.images) for r in args.runs]
    result = compare(pols)
    summary = {
        k: {kind: round(statistics.mean(v), 3) for kind, v in d.items() if v}
        for k, d in result.items()
    }
    mean_f = {
        key: [round(float(torch.cat(p[key]).mean()), 3) for p in pols] for key in ("final", "init")
    }
    print(
        json.dumps(
            {"runs": args.runs, "images": args.images, "mean_f": mean_f, "mean": summary, **result}
        )
    )


if __name__ == "__main__":
    main()
