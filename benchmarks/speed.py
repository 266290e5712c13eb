"""Speed and memory of AdaFilter against plain fine-tuning, measured side by side.

Prints one JSON object (and writes it to benchmarks/results/speed.json unless --no-save):
training-step time ratio, peak training memory ratio (RSS on CPU, max_memory_allocated on
GPU), eval latency at batch 1 (fast path, and the naive dual path for reference) and eval time
at batch 32 (trained-like and random policies). Repetitions are interleaved and medians
reported, so machine load affects both sides alike. On CPU the process keeps freed memory
for reuse as `adafilter train` does (`adafilter.utils.allocator`; ADAFILTER_MALLOC=0: glibc's
defaults, under which the interleaved models page-fault one another's freed activations).

    python benchmarks/speed.py                       # ResNet-50 @224 and ResNet-18 @64
    python benchmarks/speed.py --quick               # small sizes, a smoke run
    python benchmarks/speed.py --checkpoint RUN/checkpoint.pt   # policies of a trained model
    python benchmarks/speed.py --only compile --no-save   # eager vs torch.compile, graph breaks
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torchvision
from paths import code_commit, repo_relative
from torch import nn

from adafilter import AdaFilterConfig, AdaFilterModel, wrap
from adafilter.layers import cpu_gate, kernels
from adafilter.utils.allocator import keep_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"


def ensure_cpu_gate() -> bool:
    """Build the compiled CPU code in the foreground where it is missing, so that a timing
    measures the default path from its first repetition (inference itself would start the
    build in the background, landing mid-measurement), and start no build later. ``False``
    where it is turned off (``ADAFILTER_CPU_GATE=0``; ``prebuilt``: only a kernel built before
    is used) or cannot be built (the ATen path is measured)."""
    module = cpu_gate.ensure(say=lambda text: print(text, file=sys.stderr))
    cpu_gate.AUTO_BUILD = False
    return module is not None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved(
    fns: dict[str, Callable[[], None]],
    reps: int,
    device: torch.device,
    warmup: int | None = None,
    *,
    alternate: bool = False,
) -> dict[str, float]:
    """Median seconds of each fn, repetitions interleaved (a, b, a, b, ...); ``alternate``:
    every other round in reversed order (b, a), so no fn always runs right after another."""
    # CUDA: a few warm-up calls keep cuDNN's algorithm search and allocator growth out
    for _ in range(warmup if warmup is not None else (3 if device.type == "cuda" else 1)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in list(fns)[:: -1 if alternate and r % 2 else 1]:
            fn = fns[k]
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _build(arch: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=100)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():  # pretrained-like BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.to(device)


def _train_step_fn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: torch.dtype | None = None,
    *,
    graphed: bool = False,
) -> Callable[[], None]:
    """One SGD step on ``(x, y)``; ``graphed``: forward and backward replayed as CUDA graphs
    (``torch.cuda.make_graphed_callables``), the optimizer eager."""
    base = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model's groups
    if isinstance(base, AdaFilterModel):
        groups = base.param_groups(lr=0.01, gate_lr=0.1)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    model.train()
    forward = torch.cuda.make_graphed_callables(model, (x,)) if graphed else model

    def step() -> None:
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _train_setup(
    arch: str, res: int, batch: int, device: torch.device, policy: str
) -> tuple[nn.Module, AdaFilterModel, torch.Tensor, torch.Tensor]:
    """Plain model, its AdaFilter wrap with ``policy`` (see :func:`bench_train`), a batch."""
    plain = _build(arch, device)
    # "init" is the all-F start the speed figures were measured with (head bias 3: every filter
    # from F, i.e. AdaFilter starting as fine-tuning), whatever the library's default bias.
    cfg = AdaFilterConfig(gate_bias_init=3.0)
    ada = wrap(copy.deepcopy(plain), cfg, example_input=torch.zeros(1, 3, res, res, device=device))
    if policy == "trained-like":
        _make_trained_like(ada)
    elif policy == "random":
        ada.set_policy_mode("random", seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=gen).to(device)
    y = torch.randint(0, 100, (batch,), generator=gen).to(device)
    return plain, ada, x, y


def _without(switch: ModuleType, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with ``switch.ENABLED`` off for the call: the Triton kernels (:mod:`kernels`,
    ``ADAFILTER_TRITON=0``) or the compiled CPU code (:mod:`cpu_gate`, ``ADAFILTER_CPU_GATE=0``)."""

    def run() -> None:
        switch.ENABLED = False
        try:
            fn()
        finally:
            switch.ENABLED = True

    return run


def bench_train(
    arch: str,
    res: int,
    batch: int,
    reps: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    policy: str = "init",
    recompute: bool = False,
) -> dict:
    """Training step time. ``policy``: ``init`` (the gate at head bias 3: every filter from F,
    AdaFilter starting as fine-tuning), ``trained-like`` (most filters' choice fixed, ~20%
    input-dependent) or ``random`` (random-policy mode, p=0.5: every filter needed from both
    branches). ``recompute``: also time ``recompute_pretrained``."""
    plain, ada, x, y = _train_setup(arch, res, batch, device, policy)
    fns = {
        "finetune": _train_step_fn(plain, x, y, amp),
        "adafilter": _train_step_fn(ada, x, y, amp),
    }
    if recompute:  # A/B: S's output recomputed in the backward instead of kept
        again = copy.deepcopy(ada)
        for layer in again.gated_layers().values():
            layer.recompute_s = True
        fns["adafilter_recompute"] = _train_step_fn(again, x, y, amp)
    if device.type == "cuda":  # A/B: the eager gated BN and gate step instead of the kernels
        fns["adafilter_no_triton"] = _without(
            kernels, _train_step_fn(copy.deepcopy(ada), x, y, amp)
        )
        if recompute:  # ... and the gate's step alone (the gated BN's kernels kept)
            eager_gate = copy.deepcopy(ada)
            eager_gate.gate._kernel_step = lambda x: False  # the ATen step, as on CPU
            fns["adafilter_eager_gate"] = _train_step_fn(eager_gate, x, y, amp)
    if device.type == "cpu" and cpu_gate.get() is not None:  # A/B: the gated BN's ATen passes
        fns["adafilter_eager_bn"] = _without(
            cpu_gate, _train_step_fn(copy.deepcopy(ada), x, y, amp)
        )
    if device.type == "cpu":  # A/B: each branch's own transposed conv (no fused dL/dx)
        two = copy.deepcopy(ada)
        for layer in two.gated_layers().values():
            layer.dual_conv = False
        fns["adafilter_two_dgrads"] = _train_step_fn(two, x, y, amp)
    med = _interleaved(fns, reps, device)
    return {
        "arch": arch,
        "resolution": res,
        "batch": batch,
        "autocast": str(amp).replace("torch.", "") if amp else "off",
        "policy": policy,
        "median_s": med,
        "ratio": med["adafilter"] / med["finetune"],
        **{
            f"ratio_{k.removeprefix('adafilter_')}": v / med["finetune"]
            for k, v in med.items()
            if k.startswith("adafilter_")
        },
        **_policy_stats(ada),
    }


def bench_train_graphed(arch: str, res: int, batch: int, reps: int, policy: str) -> dict:
    """CUDA only: the same training step with forward and backward captured as CUDA graphs
    (``torch.cuda.make_graphed_callables``) for both models; the optimizer runs eagerly.

    Eager GPU steps of AdaFilter are bound by launching its many small per-layer operations;
    replaying a graph removes that cost, so this measures what the arithmetic itself costs.
    """
    device = torch.device("cuda")
    plain, ada, x, y = _train_setup(arch, res, batch, device, policy)
    fns = {
        name: _train_step_fn(model, x, y, graphed=True)
        for name, model in (("finetune", plain), ("adafilter", ada))
    }
    med = _interleaved(fns, reps, device)
    return {
        "arch": arch,
        "resolution": res,
        "batch": batch,
        "policy": policy,
        "cuda_graphs": True,
        "median_s": med,
        "ratio": med["adafilter"] / med["finetune"],
    }


def _memory_child(arch: str, res: int, batch: int, method: str, device: str) -> None:
    """Run in a fresh process: a few training steps; print peak memory in bytes.

    CPU: the process's resident-set high-water mark (VmHWM, which, unlike ru_maxrss, is not
    inherited from the parent across fork/exec).
    """
    dev = torch.device(device)
    model = _build(arch, dev)
    if method.startswith("adafilter"):
        cfg = AdaFilterConfig(recompute_pretrained=method == "adafilter-recompute")
        model = wrap(model, cfg, example_input=torch.zeros(1, 3, res, res, device=dev))
    x = torch.randn(batch, 3, res, res, device=dev)
    y = torch.randint(0, 100, (batch,), device=dev)
    step = _train_step_fn(model, x, y)
    # model + inputs, before any activation
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else _status_kb("VmRSS") * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kb("VmHWM") * 1024
    print(json.dumps({"peak_bytes": peak, "before_training_bytes": before}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def bench_memory(arch: str, res: int, batch: int, device: torch.device) -> dict:
    out, before = {}, {}
    for method in ("finetune", "adafilter", "adafilter-recompute"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                arch,
                str(res),
                str(batch),
                method,
                str(device),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        out[method], before[method] = rec["peak_bytes"], rec["before_training_bytes"]
    kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    growth = {m: out[m] - before[m] for m in out}
    return {
        "arch": arch,
        "resolution": res,
        "batch": batch,
        "measure": kind,
        "peak_bytes": out,
        "ratio": out["adafilter"] / out["finetune"],
        "ratio_recompute": out["adafilter-recompute"] / out["finetune"],
        "peak_minus_before_training_bytes": growth,
        "training_growth_ratio": growth["adafilter"] / max(growth["finetune"], 1),
        "training_growth_ratio_recompute": growth["adafilter-recompute"]
        / max(growth["finetune"], 1),
    }


def graph_breaks(arch: str, res: int, batch: int, device: torch.device) -> dict:
    """``torch._dynamo.explain`` of a wrapped model (init gate): graph breaks in training (the
    forward that torch.compile captures with its backward) and eval, at ``batch``."""
    _, ada, x, _ = _train_setup(arch, res, batch, device, "init")
    out: dict = {"arch": arch, "resolution": res, "batch": batch}
    for mode in ("train", "eval"):
        torch._dynamo.reset()
        ada.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            e = torch._dynamo.explain(lambda t: ada(t).sum())(x)
        out[mode] = {"graph_breaks": e.graph_break_count, "graphs": e.graph_count}
    torch._dynamo.reset()
    return out


def bench_compiled(
    arch: str,
    res: int,
    batch: int,
    reps: int,
    device: torch.device,
    mode: str,
    policy: str,
    compile_mode: str | None = None,
) -> dict:
    """Eager vs ``torch.compile`` (inductor) for plain fine-tuning and AdaFilter, interleaved.

    ``mode``: ``train`` (an SGD step, forward and backward compiled) or ``eval`` (no_grad
    forward). ``compile_mode="reduce-overhead"`` (CUDA): compiled code replayed as CUDA graphs.
    Compilation happens in the warm-up calls and is not timed.
    """
    plain, ada, x, y = _train_setup(arch, res, batch, device, policy)
    fns: dict[str, Callable[[], None]] = {}
    for name, model in (("finetune", plain), ("adafilter", ada)):
        compiled = torch.compile(copy.deepcopy(model), mode=compile_mode)
        for tag, m in (("eager", copy.deepcopy(model)), ("compiled", compiled)):
            if mode == "train":
                fns[f"{name}_{tag}"] = _train_step_fn(m, x, y)
            else:
                m.eval()

                def run(m: nn.Module = m) -> None:
                    with torch.no_grad():
                        m(x)

                fns[f"{name}_{tag}"] = run
    med = _interleaved(fns, reps, device, warmup=3)
    torch._dynamo.reset()
    return {
        "arch": arch,
        "resolution": res,
        "batch": batch,
        "mode": mode,
        "policy": policy,
        "compile_mode": compile_mode or "default",
        "median_s": med,
        "ratio_eager": med["adafilter_eager"] / med["finetune_eager"],
        "ratio_compiled": med["adafilter_compiled"] / med["finetune_compiled"],
        "adafilter_compiled_vs_eager": med["adafilter_compiled"] / med["adafilter_eager"],
        "finetune_compiled_vs_eager": med["finetune_compiled"] / med["finetune_eager"],
    }


def _policy_stats(model: AdaFilterModel) -> dict:
    """Fraction of filters the last batch needed from F and from S (any example)."""
    need_f = need_s = total = 0
    for pol in model.policies.values():
        need_f += int(pol.any(0).sum())
        need_s += int((~pol).any(0).sum())
        total += pol.shape[1]
    return {
        "needed_from_F": need_f / total,
        "needed_from_S": need_s / total,
        "computed_vs_plain": (need_f + need_s) / total,
    }


def _time_eval(
    plain: nn.Module, ada: AdaFilterModel, xs: list[torch.Tensor], reps: int, device: torch.device
) -> dict[str, float]:
    """Median eval seconds of the plain model, AdaFilter's fast path and its naive dual path,
    interleaved, a new input every repetition (as in streaming inference); on an accelerator
    at batch > 1 also the fast path with the CPU's filter subsets (``device_subsets``)."""
    dual = copy.deepcopy(ada)
    for layer in dual.gated_layers().values():
        layer.fast_eval = False
    i = {"n": 0}

    def runner(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(xs[i["n"] % len(xs)])

        return run

    def nxt() -> None:
        i["n"] += 1

    fns = {"plain": runner(plain), "fast": runner(ada), "dual": runner(dual)}
    if device.type != "cpu" and xs[0].shape[0] > 1:  # A/B: filter subsets at a host read a layer
        subsets = copy.deepcopy(ada)
        for layer in subsets.gated_layers().values():
            layer.device_subsets = True
        fns["subsets"] = runner(subsets)
    med = _interleaved({**fns, "_next": nxt}, reps, device)
    med.pop("_next")
    return med


def bench_eval(
    arch: str,
    res: int,
    batch: int,
    reps: int,
    device: torch.device,
    checkpoint: str | None,
    policy: str,
) -> dict:
    plain = _build(arch, device).eval()
    ada = wrap(copy.deepcopy(plain), example_input=torch.zeros(1, 3, res, res, device=device))
    ada.eval()
    if checkpoint:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        ada.load_state_dict(state.get("model", state))
    elif policy == "trained-like":
        _make_trained_like(ada)
    ada.set_policy_mode("random" if policy == "random" else "learned", seed=0)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(batch, 3, res, res, generator=gen).to(device) for _ in range(4)]
    med = _time_eval(plain, ada, xs, reps, device)
    with torch.no_grad():
        ada(xs[0])
    return {
        "arch": arch,
        "resolution": res,
        "batch": batch,
        "policy": policy,
        "median_s": med,
        "fast_vs_plain": med["fast"] / med["plain"],
        "dual_vs_plain": med["dual"] / med["plain"],
        **({"subsets_vs_plain": med["subsets"] / med["plain"]} if "subsets" in med else {}),
        **_policy_stats(ada),
    }


def bench_eval_run(checkpoint: str, batch: int, reps: int, device: torch.device) -> dict:
    """Eval time of a trained AdaFilter run (``adafilter train`` checkpoint) on its own
    evaluation images, against the plain backbone (same architecture and head) -- the
    policies are the ones that run learned."""
    from adafilter.checkpoint import load_checkpoint
    from adafilter.training.build import build_model
    from adafilter.training.config import TrainConfig
    from adafilter.training.data import run_datasets

    ckpt = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(ckpt["config"], source=checkpoint)
    n = int(ckpt["num_classes"])
    prepared, _ = build_model(config, num_classes=n, pretrained=False)
    ada = prepared.model
    ada.load_state_dict(ckpt["model"])
    plain = build_model(config.replace(method="finetune"), num_classes=n, pretrained=False)[0]
    _, eval_ds, _ = run_datasets(config.replace(download=False))
    xs = [
        torch.stack([eval_ds[(i * batch + j) % len(eval_ds)][0] for j in range(batch)]).to(device)
        for i in range(8)
    ]
    ada = ada.to(device).eval()
    med = _time_eval(plain.model.to(device).eval(), ada, xs, reps, device)
    needed = {"needed_from_F": 0.0, "needed_from_S": 0.0, "computed_vs_plain": 0.0}
    with torch.no_grad():
        for x in xs:  # filters needed, averaged over the batches
            ada(x)
            for k, v in _policy_stats(ada).items():
                needed[k] += v / len(xs)
    return {
        "run": str(Path(checkpoint).parent),
        "backbone": config.backbone,
        "resolution": config.resolution,
        "batch": batch,
        "median_s": med,
        "fast_vs_plain": med["fast"] / med["plain"],
        "dual_vs_plain": med["dual"] / med["plain"],
        **({"subsets_vs_plain": med["subsets"] / med["plain"]} if "subsets" in med else {}),
        **needed,
    }


def _make_trained_like(model: AdaFilterModel) -> None:
    """Without a checkpoint: give each head a per-filter bias so most filters have a fixed
    choice and ~20% depend on the input, roughly what trained gates show (see README)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for head in model.gate.heads:
            c = head.bias.numel()
            r = torch.rand(c, generator=gen)
            bias = torch.where(r < 0.4, 20.0, -20.0)
            bias[r > 0.8] = 0.0
            head.bias.copy_(bias)
            head.weight.mul_(4.0)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--checkpoint", default=None, help="AdaFilter ResNet-50 state for policies")
    ap.add_argument(
        "--trained-run",
        action="append",
        default=[],
        help="checkpoint.pt of an adafilter train run: eval speed on its data (repeatable)",
    )
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", default=None, help="result file name under benchmarks/results/")
    ap.add_argument("--only", default="train,graphs,memory,eval1,eval32")
    ap.add_argument(
        "--compile-size",
        default=None,
        help="arch,resolution,batch of the compile rows (default resnet18,64,8; quick 32)",
    )
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    return ap.parse_args()


def _training_rows(
    result: dict,
    only: set[str],
    big: tuple[str, int],
    reps: int,
    device: torch.device,
    flush: Callable[[], None],
) -> None:
    """The ``memory``, ``train`` and ``train_cuda_graphs`` rows ``only`` asks for, in that
    order (the targets' rows first); ``flush`` after each row (a run cut short by a time limit
    keeps the rows it finished)."""
    big_batch = 8 if device.type == "cpu" else 64
    if "memory" in only:
        result["memory"] = []
        for size in ((*big, big_batch), ("resnet18", 64, 32)):
            result["memory"].append(bench_memory(*size, device))
            flush()
    if "train" in only:
        rows = [
            (*big, big_batch, reps, device, None, p, p == "trained-like")
            for p in ("init", "trained-like", "random")
        ] + [("resnet18", 64, 32, reps, device, None, p) for p in ("init", "random")]
        if device.type == "cuda":  # what a GPU user runs: bf16 autocast
            rows += [(*big, big_batch, reps, device, torch.bfloat16)]
            rows += [("resnet18", 64, 32, reps, device, torch.bfloat16)]
        result["train"] = []
        for row in rows:
            result["train"].append(bench_train(*row))
            flush()
    if "graphs" in only and device.type == "cuda":
        result["train_cuda_graphs"] = []
        for args_ in (
            # (random-policy mode draws on the host each layer: it cannot be captured)
            (*big, big_batch, reps, "init"),
            (*big, big_batch, reps, "trained-like"),
            ("resnet18", 64, 32, reps, "init"),
        ):
            try:
                result["train_cuda_graphs"].append(bench_train_graphed(*args_))
            except Exception as exc:  # report, keep the other measurements
                result["train_cuda_graphs"].append({"args": list(args_[:2]), "error": repr(exc)})
            flush()


def _inference_rows(
    result: dict,
    only: set[str],
    big: tuple[str, int],
    reps: int,
    device: torch.device,
    args: argparse.Namespace,
    flush: Callable[[], None],
) -> None:
    """The ``eval_batch1``, ``eval_batch32``, compile and trained-run rows ``only`` asks for;
    ``flush`` after each section."""
    kernel = device.type == "cpu" and ensure_cpu_gate()  # the default CPU inference path
    if "eval1" in only:
        result["eval_batch1"] = bench_eval(
            *big, 1, reps * 3, device, args.checkpoint, "trained-like"
        )
        result["eval_batch1"]["cpu_gate_kernel"] = kernel
        flush()
    if "eval32" in only:
        result["eval_batch32"] = [
            bench_eval(*big, 32, reps, device, args.checkpoint, p)
            for p in (("checkpoint",) if args.checkpoint else ("trained-like",)) + ("random",)
        ]
        flush()
    if "compile" in only:  # eager vs torch.compile (issue 14); not in the default --only
        arch, r, b = (args.compile_size or f"resnet18,{32 if args.quick else 64},8").split(",")
        size = (arch, int(r), int(b))
        result["graph_breaks"] = graph_breaks(*size, device)
        result["compiled"] = [
            bench_compiled(*size, reps, device, mode, policy)
            for mode, policy in (
                ("train", "init"),
                ("train", "trained-like"),
                ("eval", "trained-like"),
            )
        ]
        if device.type == "cuda":  # compiled code replayed as CUDA graphs
            result["compiled"] += [
                bench_compiled(*size, reps, device, mode, "trained-like", "reduce-overhead")
                for mode in ("train", "eval")
            ]
        flush()
    if args.trained_run:
        only.add("trained")
        result["eval_trained_runs"] = [
            bench_eval_run(c, b, reps * (3 if b == 1 else 1), device)
            for c in args.trained_run
            for b in (1, 32)
        ]


def _save(
    text: str, *, quick: bool, only: set[str], device: torch.device, out: str | None = None
) -> None:
    """Write the result to ``benchmarks/results/speed-*.json`` or ``out`` (atomically)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "speed-quick.json" if quick else f"speed-{device.type}.json"
    if only == {"trained"}:  # --only trained --trained-run ...: its own file
        name = f"speed-{device.type}-trained-runs.json"
    if only == {"compile"}:  # --only compile: its own file
        name = f"speed-{device.type}-compile{'-quick' if quick else ''}.json"
    name = out or name
    tmp = RESULTS / (name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, RESULTS / name)


def main() -> None:
    args = _parse_args()
    # as `adafilter train` on CPU (ADAFILTER_MALLOC=0: glibc's defaults, children included)
    kept = torch.device(args.device).type == "cpu" and keep_freed_memory()
    if args.memory_child:
        a, r, b, m, d = args.memory_child
        _memory_child(a, int(r), int(b), m, d)
        return
    device = torch.device(args.device)
    only = set(args.only.split(","))
    big = ("resnet18", 64) if args.quick else ("resnet50", 224)
    reps = args.reps or (3 if args.quick else 7)
    result: dict = {
        "torch": torch.__version__,
        "commit": code_commit(__file__),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpu": _cpu_model(),
        "quick": args.quick,
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()

    def flush(complete: bool = False) -> None:  # the rows so far, marked incomplete
        if not args.no_save:
            text = json.dumps(repo_relative({**result, "complete": complete}), indent=2)
            _save(text, quick=args.quick, only=only, device=device, out=args.out)

    if device.type == "cpu":  # the default CPU path (compiled gated BN and gate) throughout
        result["cpu_kernels"] = ensure_cpu_gate()
        result["malloc_keeps_freed_memory"] = kept
    _training_rows(result, only, big, reps, device, flush)
    _inference_rows(result, only, big, reps, device, args, flush)
    result["complete"] = True
    print(json.dumps(repo_relative(result), indent=2))
    flush(complete=True)


if __name__ == "__main__":
    main()
