"""CPU training step with the gated BN's compiled passes vs its ATen passes, in one process.

Plain fine-tuning and, twice each, AdaFilter with the compiled passes (``cpu_gate``'s
``bn_*``, built under ``$ADAFILTER_HOME`` first where missing) and with the ATen passes take
turns on the same batch, the order reversed every round (the two copies of each variant show
the spread from model copies and order alone); medians. Policies: the gate at head bias 0
(each example takes about half of each layer's filters from each branch). Networks: the
demo's CIFAR ResNet-20 @28 batch 32, torchvision ResNet-18 @64 batch 32 and ResNet-50 @224
batch 8, random weights. The process keeps freed memory as a CPU training run does
(``ADAFILTER_MALLOC=0``: glibc's defaults). Prints one JSON object; ``--out FILE`` writes it
(atomically).

    python benchmarks/cpu_bn_ab.py --out benchmarks/results/cpu-bn-ab.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from paths import code_commit
from speed import _build, _cpu_model, _interleaved, _train_step_fn, _without, ensure_cpu_gate
from torch import nn

from adafilter import AdaFilterConfig, wrap
from adafilter.backbones import build_backbone
from adafilter.layers import cpu_gate
from adafilter.utils.allocator import keep_freed_memory
from adafilter.utils.io import atomic_write_json

# name -> (input size, batch, repetitions)
SIZES = {"cifar-resnet20": (28, 32, 40), "resnet18": (64, 32, 20), "resnet50": (224, 8, 8)}


def _network(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "cifar-resnet20":
        return build_backbone(name, num_classes=10)[0]
    return _build(name, torch.device("cpu"))


def measure(name: str, reps: int | None = None) -> dict:
    """One network's row: medians (s) and each variant's ratio to plain fine-tuning."""
    res, batch, default_reps = SIZES[name]
    plain = _network(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    ada = wrap(copy.deepcopy(plain), AdaFilterConfig(gate_bias_init=0.0), example_input=x[:1])
    fns = {"finetune": _train_step_fn(plain, x, y)}
    for copy_ in ("a", "b"):
        fns[f"compiled_{copy_}"] = _train_step_fn(copy.deepcopy(ada), x, y)
        fns[f"aten_{copy_}"] = _without(cpu_gate, _train_step_fn(copy.deepcopy(ada), x, y))
    med = _interleaved(fns, reps or default_reps, torch.device("cpu"), alternate=True)
    ratio = {k: v / med["finetune"] for k, v in med.items() if k != "finetune"}
    return {
        "network": name,
        "resolution": res,
        "batch": batch,
        "reps": reps or default_reps,
        "median_s": med,
        "ratio": ratio,
        "compiled_vs_aten": (ratio["compiled_a"] + ratio["compiled_b"])
        / (ratio["aten_a"] + ratio["aten_b"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--networks", default=",".join(SIZES))
    ap.add_argument("--reps", type=int, default=None, help="default: per network (40/20/8)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    kept = keep_freed_memory()  # as a CPU training run (ADAFILTER_MALLOC=0: glibc's defaults)
    if not ensure_cpu_gate():
        raise SystemExit("error: the compiled CPU code cannot be built or is turned off here")
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "cpu_bn_ab",
        "commit": code_commit(cpu_gate.__file__),
        "cpu": _cpu_model(),
        "threads": args.threads,
        "malloc_keeps_freed_memory": kept,
        "torch": torch.__version__,
        "rows": [measure(n, args.reps) for n in args.networks.split(",")],
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
