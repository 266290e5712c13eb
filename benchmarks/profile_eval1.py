"""Where AdaFilter's batch-1 eval time goes on CPU, against plain fine-tuning (issue 14).

Profiles a wrapped torchvision ResNet-50 @224 (random weights, speed.py's trained-like gate
heads: policies that change from one example to the next) and the plain model, a new input
every forward: per-op counts and self CPU time (``torch.profiler``), the Python functions
(``cProfile``) and the wall time per forward. Prints a report; writes nothing.

    python benchmarks/profile_eval1.py --threads 2 --reps 20
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time

import torch
from speed import _build, _make_trained_like, ensure_cpu_gate
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from adafilter import wrap
from adafilter.layers.gate import RecurrentGate
from adafilter.layers.gated_conv import GatedConv2dBN
from adafilter.tuner.policies import ForwardPolicies

# (class, method): inclusive CPU time of each, labelled ``#Class.method`` in the op table
SECTIONS = (
    (ForwardPolicies, "policy"),
    (RecurrentGate, "step"),
    (RecurrentGate, "_eval_weights"),
    (GatedConv2dBN, "forward"),
    (GatedConv2dBN, "_folded"),
    (GatedConv2dBN, "_merge"),
    (GatedConv2dBN, "_conv"),
)


def _label_sections() -> None:
    """Wrap each :data:`SECTIONS` method in a ``record_function`` range."""
    for cls, name in SECTIONS:
        fn = getattr(cls, name, None)
        if fn is None:
            continue
        label = f"#{cls.__name__}.{name}"

        def wrapped(*a: object, _fn=fn, _label=label, **k: object) -> object:
            with record_function(_label):
                return _fn(*a, **k)

        setattr(cls, name, wrapped)


def _forwards(model: nn.Module, xs: list[torch.Tensor], n: int) -> None:
    with torch.no_grad():
        for i in range(n):
            model(xs[i % len(xs)])


def _wall(models: dict[str, nn.Module], xs: list[torch.Tensor], reps: int) -> dict[str, float]:
    """Median ms per forward of each model, interleaved, a new input every repetition."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(reps):
        for k, m in models.items():
            t = time.perf_counter()
            _forwards(m, xs[r % len(xs) :] + xs[: r % len(xs)], 1)
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _ops(model: nn.Module, xs: list[torch.Tensor], n: int, rows: int) -> None:
    """Per-op count and self CPU time over ``n`` forwards, per forward."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _forwards(model, xs, n)
    events = prof.key_averages()
    for e in sorted(events, key=lambda e: e.key):
        if e.key.startswith("#"):
            print(
                f"  {e.key:<38} {e.count / n:7.1f} calls {e.cpu_time_total / n / 1e3:8.3f} ms"
                " inclusive"
            )
    total = sum(e.self_cpu_time_total for e in events) / n / 1e3
    calls = sum(e.count for e in events) / n
    print(f"  total self CPU {total:.1f} ms/forward, {calls:.0f} op calls/forward")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"  {e.key:<38} {e.count / n:7.1f} calls {e.self_cpu_time_total / n / 1e3:8.3f} ms")


def _python(model: nn.Module, xs: list[torch.Tensor], n: int, rows: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    _forwards(model, xs, n)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--resolution", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_cpu_gate()  # the default inference path, not a build landing mid-run
    res = args.resolution
    plain = _build("resnet50", torch.device("cpu")).eval()
    ada = wrap(copy.deepcopy(plain), example_input=torch.zeros(1, 3, res, res)).eval()
    _make_trained_like(ada)
    bypass = copy.deepcopy(ada)
    bypass.set_policy_mode("finetuned")  # the fast path without the gate
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 3, res, res, generator=gen) for _ in range(4)]
    models = {"plain": plain, "adafilter": ada, "gate bypassed": bypass}
    for m in models.values():
        _forwards(m, xs, 4)  # warm-up: caches, oneDNN primitives
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    wall = _wall(models, xs, args.reps)
    for k, v in wall.items():
        print(f"wall {k:<14} {v:7.2f} ms  ({v / wall['plain']:.3f}x plain)")
    _label_sections()
    for k, m in models.items():
        print(f"\n== torch.profiler: {k} ==")
        _ops(m, xs, args.reps, args.rows)
    print("\n== cProfile: adafilter ==")
    _python(ada, xs, args.reps, args.rows)


if __name__ == "__main__":
    main()
