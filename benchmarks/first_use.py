"""What a user gets out of the box on CPU: ``wrap`` + a batch-1 eval forward, first call to last.

Each phase runs in a fresh Python process with a fresh ``$ADAFILTER_HOME`` (a temporary
directory unless ``--home``): (1) nothing built, as after ``pip install``; (2) ``adafilter
build-kernels``, timed; (3) the same process as (1) with the kernel built. A phase reports
``import adafilter``, ``wrap`` (torchvision ResNet-50, random weights), the first eval forward,
the steady state (median of ``--reps`` forwards after it) beside plain ResNet-50 taking turns,
whether the compiled code ran, and the child processes the library started (must be none).
Prints one JSON object; ``--out FILE`` also writes it.

    OMP_NUM_THREADS=1 python benchmarks/first_use.py --threads 1 --reps 15 \
        --out benchmarks/results/first-use.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import code_commit

# one phase, run as `python -c CHILD THREADS REPS RES`; prints a JSON object
CHILD = r"""
import json, os, statistics, sys, time
t0 = time.perf_counter()
import torch, torchvision
t1 = time.perf_counter()
import adafilter
from adafilter.layers import cpu_gate
t2 = time.perf_counter()
threads, reps, res = (int(v) for v in sys.argv[1:4])
torch.set_num_threads(threads)

def children():
    me, out = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            out.append(pid)
    return out

torch.manual_seed(0)
plain = torchvision.models.resnet50().eval()
net = torchvision.models.resnet50()
t3 = time.perf_counter()
model = adafilter.wrap(net).eval()
t4 = time.perf_counter()
x = torch.randn(1, 3, res, res)
with torch.no_grad():
    t5 = time.perf_counter()
    model(x)
    t6 = time.perf_counter()
    ada, base = [], []
    for _ in range(reps):
        for m, times in ((plain, base), (model, ada)):
            s = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - s)
print(json.dumps({
    "import_torch_s": round(t1 - t0, 3),
    "import_adafilter_s": round(t2 - t1, 3),
    "wrap_s": round(t4 - t3, 3),
    "first_forward_ms": round(1e3 * (t6 - t5), 1),
    "steady_ms": round(1e3 * statistics.median(ada), 1),
    "plain_ms": round(1e3 * statistics.median(base), 1),
    "ratio": round(statistics.median(ada) / statistics.median(base), 3),
    "compiled": cpu_gate.get() is not None,
    "children_started": len(children()),
    "kernel_dir_made": cpu_gate.build_directory().exists(),
}))
"""


def _phase(env: dict[str, str], args: argparse.Namespace) -> dict:
    argv = [str(args.threads), str(args.reps), str(args.res)]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=True
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - start, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--home", type=Path, default=None, help="default: a fresh temporary one")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        env = {**os.environ, "ADAFILTER_HOME": str(home), "OMP_NUM_THREADS": str(args.threads)}
        env.pop("ADAFILTER_CPU_GATE", None)
        result: dict = {"cpu": _cpu(), "threads": args.threads, "reps": args.reps}
        result["out_of_the_box"] = _phase(env, args)
        start = time.perf_counter()
        build = [sys.executable, "-m", "adafilter", "build-kernels"]
        subprocess.run(build, env=env, capture_output=True, check=True)
        result["build_kernels_s"] = round(time.perf_counter() - start, 1)
        result["built"] = _phase(env, args)
    result["commit"] = code_commit(__file__)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
