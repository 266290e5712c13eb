"""Batch-1 eval with the compiled CPU gate step vs the ATen step, in one process (issue 14).

Plain fine-tuning, AdaFilter with the ATen gate step and AdaFilter with the kernel
(built under ``$ADAFILTER_HOME`` first where missing) take turns on the
same inputs (torchvision ResNet-50 @224, speed.py's trained-like gate); medians. Prints one
JSON line; ``--out FILE`` also appends it to FILE (a JSON list, written atomically).

    python benchmarks/cpu_gate_ab.py --threads 2 --reps 40 --out benchmarks/results/cpu-gate-ab.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from speed import _build, _cpu_model, _make_trained_like, ensure_cpu_gate

from adafilter import wrap
from adafilter.layers import cpu_gate
from adafilter.utils.io import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not ensure_cpu_gate():
        raise SystemExit("error: the CPU gate kernel cannot be built or is turned off here")
    torch.set_num_threads(args.threads)
    plain = _build("resnet50", torch.device("cpu")).eval()
    ada = wrap(copy.deepcopy(plain), example_input=torch.zeros(1, 3, 224, 224)).eval()
    _make_trained_like(ada)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(4)]
    cases = {"plain": (plain, True), "aten_step": (ada, False), "kernel": (ada, True)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for r in range(-4, args.reps):  # 4 warm-up rounds
            for k, (model, kernel) in cases.items():
                cpu_gate.ENABLED = kernel
                t = time.perf_counter()
                model(xs[r % len(xs)])
                if r >= 0:
                    times[k].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row = {
        "cpu": _cpu_model(),
        "threads": args.threads,
        "reps": args.reps,
        "median_ms": med,
        "aten_step_vs_plain": med["aten_step"] / med["plain"],
        "kernel_vs_plain": med["kernel"] / med["plain"],
    }
    print(json.dumps(row))
    if args.out is not None:
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
        atomic_write_json(args.out, rows + [row])


if __name__ == "__main__":
    main()
