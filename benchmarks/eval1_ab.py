"""Batch-1 eval of two versions of adafilter in one process: plain vs baseline vs this checkout.

A loaded machine moves single ``speed.py`` runs by ~0.1x; importing the baseline beside the
current code (its package copied under another name) and interleaving plain / baseline / current
forwards on identical weights, inputs and decisions compares them under the same load.

    git worktree add /tmp/base a6d0fac
    python benchmarks/eval1_ab.py --baseline-src /tmp/base/src --threads 2 --reps 50
"""

from __future__ import annotations

import argparse
import copy
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from speed import _build, _make_trained_like, ensure_cpu_gate

import adafilter


def _baseline(src: Path) -> object:
    """The ``adafilter`` package under ``src``, imported as ``adafilter_base`` (its imports
    inside the package are relative, so a renamed copy is self-contained)."""
    root = Path(tempfile.mkdtemp(prefix="adafilter-base-"))
    shutil.copytree(src / "adafilter", root / "adafilter_base")
    sys.path.insert(0, str(root))
    return importlib.import_module("adafilter_base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", type=Path, required=True, help="another checkout's src/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_cpu_gate()  # the default inference path, not a build landing mid-run
    base_pkg = _baseline(args.baseline_src)
    plain = _build("resnet50", torch.device("cpu")).eval()
    example = torch.zeros(1, 3, 224, 224)
    base = base_pkg.wrap(copy.deepcopy(plain), example_input=example).eval()  # type: ignore[attr-defined]
    _make_trained_like(base)
    current = adafilter.wrap(copy.deepcopy(plain), example_input=example).eval()
    current.load_state_dict(base.state_dict())  # identical gate, hence identical decisions
    models = {"plain": plain, "baseline": base, "current": current}
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(4)]
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for x in xs:  # warm-up, and the two versions agree
            torch.testing.assert_close(current(x), base(x), rtol=1e-4, atol=1e-4)
        for r in range(args.reps):
            for k, m in models.items():
                t = time.perf_counter()
                m(xs[r % len(xs)])
                times[k].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(
        f"threads {torch.get_num_threads()}, {args.reps} reps, medians: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
        + f" | baseline/plain {med['baseline'] / med['plain']:.3f}"
        f" current/plain {med['current'] / med['plain']:.3f}"
        f" current/baseline {med['current'] / med['baseline']:.3f}"
    )


if __name__ == "__main__":
    main()
