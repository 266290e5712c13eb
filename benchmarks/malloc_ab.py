"""CPU training with glibc's default allocator vs freed memory kept (``keep_freed_memory``).

A setting cannot be undone inside a process, so every measurement is a fresh process that
trains ONE model, as a training run does: fine-tuning or AdaFilter (trained-like policies, see
``speed.py``), with ``ADAFILTER_MALLOC=0`` (glibc's defaults) or the default (thresholds fixed,
what ``adafilter train`` does on CPU). The four processes of a round run one after another, the
order reversed every other round; per process the median step after warm-up, the page faults
per step (``getrusage``) and the peak RSS. Reported: medians over rounds, and each setting's
AdaFilter / fine-tuning ratio. Prints one JSON object; ``--out FILE`` writes it (atomically).

    python benchmarks/malloc_ab.py --out benchmarks/results/malloc-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from paths import code_commit
from speed import _cpu_model, _train_setup, _train_step_fn, ensure_cpu_gate

from adafilter.utils.allocator import ENV, keep_freed_memory
from adafilter.utils.io import atomic_write_json

# name -> (input size, batch)
SIZES = {"resnet50": (224, 8), "resnet18": (64, 32)}
SETTINGS = {"glibc_default": "0", "kept": "1"}


def _child(arch: str, method: str, warmup: int, steps: int) -> dict:
    """One process's measurement (the allocator already set, or not, by the environment)."""
    kept = keep_freed_memory()
    ensure_cpu_gate()
    res, batch = SIZES[arch]
    plain, ada, x, y = _train_setup(arch, res, batch, torch.device("cpu"), "trained-like")
    model = ada if method == "adafilter" else plain
    del plain, ada
    step = _train_step_fn(model, x, y, None)
    for _ in range(warmup):
        step()
    times, faults = [], []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {
        "kept": kept,
        "step_s": statistics.median(times),
        "faults_per_step": statistics.median(faults),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_child(arch: str, method: str, setting: str, warmup: int, steps: int) -> dict:
    env = {**os.environ, ENV: SETTINGS[setting]}
    cmd = [sys.executable, __file__, "--child", arch, method, str(warmup), str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(arch: str, rounds: int, warmup: int, steps: int) -> dict:
    """``rounds`` rounds of the four processes for ``arch``; medians and ratios."""
    cases = [(s, m) for s in SETTINGS for m in ("finetune", "adafilter")]
    runs: dict[str, list[dict]] = {f"{s}/{m}": [] for s, m in cases}
    for r in range(rounds):
        for s, m in cases if r % 2 == 0 else cases[::-1]:
            runs[f"{s}/{m}"].append(_run_child(arch, m, s, warmup, steps))
    med = {
        k: {f: statistics.median(v[f] for v in rs) for f in ("step_s", "faults_per_step")}
        | {"peak_rss_mb": max(v["peak_rss_mb"] for v in rs), "kept": rs[0]["kept"]}
        for k, rs in runs.items()
    }
    res, batch = SIZES[arch]
    return {
        "arch": arch,
        "resolution": res,
        "batch": batch,
        "policy": "trained-like",
        "median": med,
        "ratio": {
            s: med[f"{s}/adafilter"]["step_s"] / med[f"{s}/finetune"]["step_s"] for s in SETTINGS
        },
        "kept_vs_default": {
            m: med[f"kept/{m}"]["step_s"] / med[f"glibc_default/{m}"]["step_s"]
            for m in ("finetune", "adafilter")
        },
        "step_s_per_round": {k: [round(v["step_s"], 4) for v in rs] for k, rs in runs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50,resnet18")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch, method, warmup, steps = args.child
        print(json.dumps(_child(arch, method, int(warmup), int(steps))))
        return
    ensure_cpu_gate()  # built once here, not in the first child's timing
    result = {
        "what": "CPU training step, glibc malloc defaults vs freed memory kept, fresh processes",
        "command": "python benchmarks/malloc_ab.py " + " ".join(sys.argv[1:]),
        "commit": code_commit(__file__),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": [measure(a, args.rounds, args.warmup, args.steps) for a in args.arch.split(",")],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
