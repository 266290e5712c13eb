"""Activation memory of a training step: what autograd keeps for the backward, AdaFilter (with
and without ``recompute_pretrained``) against plain fine-tuning.

Counted, not sampled: every tensor saved for the backward (``save_for_backward`` and the ATen
operations' saved tensors) through ``torch.autograd.graph.saved_tensors_hooks``, each storage
once; parameters, buffers and the input excluded (resident anyway). This is the part of a GPU
step's peak memory that grows with the batch, so its ratio is what ``max_memory_allocated``'s
ratio approaches at large batches. Runs the GPU path (``capturable``: no CPU-only filter
subsets) on any device; the Triton kernels are off (they save the same tensors).

    python benchmarks/activation_memory.py      # ResNet-50 @224 b8, ResNet-18 @64 b32
    python benchmarks/activation_memory.py --cases resnet18,32,2 --no-save
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torchvision
from paths import code_commit
from torch import nn

import adafilter
from adafilter import AdaFilterConfig, wrap
from adafilter.layers import kernels
from adafilter.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


class SavedBytes:
    """Bytes autograd keeps for the backward, each storage once; ``resident`` tensors
    (parameters, buffers, the input) not counted. Use :meth:`pack` as a saved-tensors hook."""

    def __init__(self, resident: list[torch.Tensor]) -> None:
        self.resident = {t.untyped_storage().data_ptr() for t in resident}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.resident:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Activation bytes one training forward keeps for its backward (then runs the backward)."""
    model.train()
    saved = SavedBytes([*model.parameters(), *model.buffers(), x])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return saved.total


def measure(arch: str, res: int, batch: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    plain = getattr(torchvision.models, arch)(num_classes=100).to(device)
    example = torch.zeros(1, 3, res, res, device=device)
    models: dict[str, nn.Module] = {"finetune": plain}
    for name, recompute in (("adafilter", False), ("adafilter_recompute", True)):
        cfg = AdaFilterConfig(recompute_pretrained=recompute)  # default gate: mixed policies
        ada = wrap(copy.deepcopy(plain), cfg, example_input=example)
        ada.capturable = True  # the GPU's path
        models[name] = ada
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=gen).to(device)
    y = torch.randint(0, 100, (batch,), generator=gen).to(device)
    got = {name: saved_bytes(m, x, y) for name, m in models.items()}
    trainable = {
        name: sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
        for name, m in models.items()
    }
    return {
        "arch": arch,
        "resolution": res,
        "batch": batch,
        "saved_bytes": got,
        "ratio": got["adafilter"] / got["finetune"],
        "ratio_recompute": got["adafilter_recompute"] / got["finetune"],
        "trainable_parameter_bytes": trainable,
    }


def _case(text: str) -> tuple[str, int, int]:
    arch, res, batch = text.split(",")
    return arch, int(res), int(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--cases",
        default="resnet50,224,8;resnet18,64,32",
        help="arch,resolution,batch;... (torchvision architectures)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "activation-memory.json")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    kernels.ENABLED = False  # the same tensors saved; the interpreter would be slow on CPU
    device = torch.device(args.device)
    rows = [measure(*_case(c), device) for c in args.cases.split(";")]
    result = {
        "benchmark": "activation_memory",
        "commit": code_commit(adafilter.__file__),
        "device": args.device + " (GPU path: capturable)",
        "torch": torch.__version__,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if not args.no_save:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
