"""Kernel launches per training step on the GPU path, AdaFilter against plain fine-tuning.

On a GPU the eager AdaFilter step is bound by launching small operations, not by arithmetic
(README, *Speed and memory*), so the launches a gated layer adds per step predict its eager
cost there. This counts them without a GPU: every ATen operation dispatched in one forward +
backward that would launch a kernel (views and allocations excluded) plus every Triton
launch, and the host synchronisations (``_local_scalar_dense``). Optimizer steps are not
counted.

Without CUDA the GPU path is emulated on CPU: Triton's interpreter runs the kernels
(``TRITON_INTERPRET=1``, set here before Triton is imported) and the model is
``capturable`` (no CPU-only host reads or filter subsets, as on a GPU). With ``--device
cuda`` the real path runs. A CIFAR ResNet-20 @16, batch 2, keeps the interpreter fast; the
code per gated layer is the same in any network.

    python benchmarks/launch_count.py --out benchmarks/results/launch-count.json
    PYTHONPATH=<old checkout>/src python benchmarks/launch_count.py --no-save   # before
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch  # (imports no Triton)
from torch import nn


def _emulated(argv: list[str]) -> bool:
    """The run is on CPU: ``--device cpu``, or no ``--device`` and no CUDA."""
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1] == "cpu"
        if a.startswith("--device="):
            return a.split("=", 1)[1] == "cpu"
    return not torch.cuda.is_available()


if _emulated(sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

from activation_memory import SavedBytes  # noqa: E402 (this directory, like the script)
from paths import code_commit  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from adafilter import AdaFilterConfig, AdaFilterModel, wrap  # noqa: E402
from adafilter.backbones.arch import cifar_resnet  # noqa: E402
from adafilter.layers import kernels  # noqa: E402
from adafilter.utils.io import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Operations that launch nothing on a GPU: views, metadata, allocations (and the
# interpreter's own storage juggling, which ``_Counter`` never sees inside a Triton launch).
_FREE = frozenset(
    "view _unsafe_view reshape _reshape_alias expand t transpose select slice unsqueeze "
    "squeeze as_strided detach alias permute split split_with_sizes unsafe_split chunk unbind "
    "empty empty_like empty_strided new_empty new_empty_strided lift_fresh set_".split()
)


class _Counter(TorchDispatchMode):
    """Counts dispatched ATen operations by name, except inside a Triton launch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.triton = 0
        self.inside = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        if not self.inside:
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


_ACTIVE: list[_Counter] = []


def _count_triton_launches() -> None:
    """Wrap the kernel objects' launch (``JITFunction.run`` on CUDA, the interpreter's on
    CPU) so that each counts once and the ATen calls inside it not at all."""
    if kernels.triton is None:
        return
    cls = type(kernels.bn_planes._plane_stats_kernel)
    run = cls.run

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _ACTIVE:
            return run(self, *args, **kwargs)
        counter = _ACTIVE[-1]
        counter.triton += 1
        counter.inside, was = True, counter.inside
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.inside = was

    cls.run = counted


def _step_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Launches of one training forward + backward (after one uncounted warm-up step), and
    the bytes saved for its backward."""
    model.train()
    for counted in (False, True):
        model.zero_grad(set_to_none=True)
        counter = _Counter()
        saved = SavedBytes([*model.parameters(), *model.buffers(), x])
        _ACTIVE.append(counter)
        try:
            with counter, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss = nn.functional.cross_entropy(model(x), y)
            with counter:
                loss.backward()
        finally:
            _ACTIVE.pop()
        if counted:
            aten = {k: v for k, v in counter.ops.items() if k not in _FREE}
            return {
                "launches": sum(aten.values()) + counter.triton,
                "triton": counter.triton,
                "host_syncs": counter.ops.get("_local_scalar_dense", 0),
                "saved_bytes": saved.total,
                "ops": dict(collections.Counter(aten).most_common()),
            }
    raise AssertionError("unreachable")


def _models(policy: str, device: torch.device) -> tuple[nn.Module, AdaFilterModel]:
    torch.manual_seed(0)
    plain = cifar_resnet(20, num_classes=10).to(device)
    cfg = AdaFilterConfig(gate_bias_init=3.0)  # "init": every filter from F (speed.py's)
    ada = wrap(copy.deepcopy(plain), cfg, example_input=torch.zeros(1, 3, 16, 16, device=device))
    if policy == "random":
        ada.set_policy_mode("random", seed=0)
    elif policy == "mixed":  # each head's bias: ~half the filters F, half S, per example mixed
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for head in ada.gate.heads:
                head.bias.copy_(torch.randn(head.bias.shape, generator=gen))
    if device.type == "cpu":
        ada.capturable = True  # no CPU-only host reads or filter subsets: the GPU's path
    return plain, ada


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "launch-count.json")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and not kernels.interpreted():
        raise SystemExit("error: TRITON_INTERPRET=0 is set; the CPU emulation needs it at 1")
    _count_triton_launches()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    rows = []
    for policy in ("init", "mixed", "random"):
        plain, ada = _models(policy, device)
        layers = len(ada.gated_layers())
        p, a = _step_counts(plain, x, y), _step_counts(ada, x, y)
        extra = collections.Counter(a["ops"])
        extra.subtract(p["ops"])
        rows.append(
            {
                "policy": policy,
                "gated_layers": layers,
                "plain": {k: p[k] for k in ("launches", "host_syncs", "saved_bytes")},
                "adafilter": {k: a[k] for k in ("launches", "triton", "host_syncs", "saved_bytes")},
                "saved_bytes_ratio": round(a["saved_bytes"] / p["saved_bytes"], 3),
                "extra_launches_per_gated_layer": round(
                    (a["launches"] - p["launches"]) / layers, 1
                ),
                "plain_launches_per_conv_bn": round(p["launches"] / layers, 1),
                "top_extra_ops": dict(extra.most_common(12)),
            }
        )
    result = {
        "benchmark": "launch_count",
        "commit": code_commit(kernels.__file__),
        "device": args.device
        + (" (GPU path emulated: Triton interpreter, capturable)" if device.type == "cpu" else ""),
        "torch": torch.__version__,
        "model": f"cifar_resnet20 @{args.resolution}",
        "batch": args.batch,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if not args.no_save:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
