"""Tracing: one forward pass with hooks tells which module reads each conv's output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .norms import norm_kind

__all__ = ["Trace", "conv_execution_order", "first_norm", "trace_convs"]


@dataclass
class Trace:
    """What one traced forward pass shows about every conv."""

    order: list[str] = field(default_factory=list)  # convs in the order they first run
    calls: dict[str, int] = field(default_factory=dict)  # module name -> calls
    consumers: dict[str, list[str]] = field(default_factory=dict)  # conv -> modules fed its output
    shared: set[str] = field(default_factory=set)  # output feeds more than one operation
    modified: set[str] = field(default_factory=set)  # output changed in place before use


def _tensors(obj: Any) -> list[Tensor]:
    """Every tensor in a (nested) model output."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _consumer_counts(outputs: Sequence[Tensor]) -> dict[Any, int]:
    """For every autograd node reachable from ``outputs``: how many operations use its result."""
    counts: dict[Any, int] = {}
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child in {c for c, _ in node.next_functions if c is not None}:
            counts[child] = counts.get(child, 0) + 1
            stack.append(child)
    return counts


def _version(t: Tensor) -> int:
    # Inference tensors have no version counter (and cannot be changed in place outside it).
    return -1 if t.is_inference() else t._version


def trace_convs(model: nn.Module, example_input: Tensor, skip_prefix: str | None = None) -> Trace:
    """Run ``model`` once (eval mode, running statistics untouched) and record its convs.

    Forward pre-hooks on every module record which modules are called with a conv's output
    tensor (the same object, so ``bn(conv(x))`` but not ``bn(conv(x) + y)``); the autograd
    graph of the pass (the input requires grad, no backward runs) tells whether anything else
    also reads that output, e.g. a residual ``torch.cat``.
    """
    names = {m: n for n, m in model.named_modules()}
    tr = Trace()
    produced: dict[int, tuple[str, Tensor, int, Any]] = {}  # id -> (conv, out, version, node)

    def skipped(name: str) -> bool:
        return bool(skip_prefix) and (name == skip_prefix or name.startswith(f"{skip_prefix}."))

    def pre_hook(mod: nn.Module, args: Any) -> None:
        name = names[mod]
        tr.calls[name] = tr.calls.get(name, 0) + 1
        for a in args:
            hit = produced.get(id(a)) if isinstance(a, Tensor) else None
            if hit is not None and hit[1] is a:
                tr.consumers.setdefault(hit[0], []).append(name)
                if _version(a) != hit[2]:
                    tr.modified.add(hit[0])

    def conv_hook(mod: nn.Module, args: Any, out: Any) -> None:
        name = names[mod]
        if skipped(name) or not isinstance(out, Tensor):
            return
        if name not in tr.order:
            tr.order.append(name)
        produced[id(out)] = (name, out, _version(out), out.grad_fn)  # keeps `out` (its id) alive

    hooks = []
    for mod in model.modules():
        if mod is not model:
            hooks.append(mod.register_forward_pre_hook(pre_hook))
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
    x = example_input.detach()
    if x.is_floating_point() and not torch.is_inference_mode_enabled():
        # every conv output then has an autograd node; a non-leaf copy, so in-place ops work
        x = x.clone().requires_grad_(True).clone()
    modes = [(m, m.training) for m in model.modules()]  # each as the user left it
    try:
        model.eval()
        with torch.enable_grad():
            out = model(x)
    finally:
        for m, training in modes:  # not model.train(): a submodule in eval (a frozen BN) stays
            m.training = training
        for h in hooks:
            h.remove()
    counts = _consumer_counts(_tensors(out))
    tr.shared = {n for n, _, _, node in produced.values() if counts.get(node, 0) > 1}
    return tr


def first_norm(model: nn.Module, consumers: Sequence[str]) -> str | None:
    return next((n for n in consumers if norm_kind(model.get_submodule(n)) is not None), None)


def conv_execution_order(
    model: nn.Module, example_input: Tensor, *, skip_prefix: str | None = None
) -> list[tuple[str, str | None]]:
    """Every ``Conv2d`` in the order it first runs, with the BN that directly follows it.

    Runs ``model`` once on ``example_input`` (eval mode, so BN running statistics are
    untouched) with hooks: a BN (any :data:`NORM_KINDS` entry) "directly follows" a conv when
    its input is the very tensor the conv returned (``bn(conv(x))``). A conv or BN that runs
    more than once in a forward (shared weights) gets no follower.

    Args:
        model: Any network built from ``nn.Module``s.
        example_input: A batch the model accepts, e.g. ``torch.zeros(1, 3, 64, 64)``.
        skip_prefix: Module name whose convs are ignored (e.g. a conv classifier head).

    Returns:
        ``[(conv_name, bn_name or None), ...]`` in execution order.
    """
    tr = trace_convs(model, example_input, skip_prefix)
    out: list[tuple[str, str | None]] = []
    for conv in tr.order:
        norm = first_norm(model, tr.consumers.get(conv, []))
        once = norm is not None and tr.calls.get(conv) == 1 and tr.calls.get(norm) == 1
        out.append((conv, norm if once else None))
    return out
