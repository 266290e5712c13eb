"""The gating plan: which convs :func:`~adafilter.tuner.wrap` gates, which it skips and why."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .norms import norm_kind
from .trace import Trace, first_norm, trace_convs

__all__ = ["GatedPair", "GatingSummary", "SkippedConv", "find_conv_bn_pairs", "plan_gating"]


@dataclass(frozen=True)
class GatedPair:
    """A conv that is gated, with the norm after it (``norm_type``: its class as found)."""

    conv: str
    norm: str
    norm_type: str


@dataclass(frozen=True)
class SkippedConv:
    """A conv left as it is: ``reason`` (a short category) and ``detail``."""

    conv: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class GatingSummary:
    """Which convs :func:`wrap` gates and which it leaves alone, and why.

    ``str(summary)`` lists every conv; :meth:`brief` is one line (what :func:`wrap` logs).
    """

    model: str
    gated: tuple[GatedPair, ...]
    skipped: tuple[SkippedConv, ...] = ()

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``(conv_name, norm_name)`` of the gated convs, in execution order."""
        return [(p.conv, p.norm) for p in self.gated]

    def skip_reasons(self) -> dict[str, int]:
        """How many convs were skipped for each reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def brief(self) -> str:
        """One line: gated count by norm type, skipped count by reason."""
        total = len(self.gated) + len(self.skipped)
        kinds = ", ".join(f"{k} {n}" for k, n in Counter(p.norm_type for p in self.gated).items())
        line = f"{self.model}: gated {len(self.gated)} of {total} convs"
        line += f" ({kinds})" if kinds else ""
        if self.skipped:
            why = "; ".join(f"{r}: {n}" for r, n in self.skip_reasons().items())
            line += f"; skipped {len(self.skipped)} ({why})"
        return line

    def __str__(self) -> str:
        rows = [self.brief()]
        rows += [f"  gated    {p.conv} -> {p.norm} ({p.norm_type})" for p in self.gated]
        rows += [
            f"  skipped  {s.conv}: {s.reason}" + (f" ({s.detail})" if s.detail else "")
            for s in self.skipped
        ]
        return "\n".join(rows)


def _why_not_gated(
    model: nn.Module, tr: Trace, conv_name: str
) -> tuple[str | None, str, str | None]:
    """``(reason or None, detail, norm name)`` for one traced conv."""
    conv = model.get_submodule(conv_name)
    assert isinstance(conv, nn.Conv2d)
    if tr.calls.get(conv_name, 0) > 1:
        return "runs more than once per forward", f"{tr.calls[conv_name]} calls", None
    if type(conv).forward is not nn.Conv2d.forward:
        return "a Conv2d subclass with its own forward", type(conv).__name__, None
    if conv.padding_mode != "zeros":
        return "not zero-padded", f"padding_mode {conv.padding_mode!r}", None
    consumers = tr.consumers.get(conv_name, [])
    norm_name = first_norm(model, consumers)
    if norm_name is None:
        detail = (
            f"followed by {type(model.get_submodule(consumers[-1])).__name__} {consumers[-1]!r}"
            if consumers
            else "its output goes into a functional operation, not a module"
        )
        return "no BatchNorm directly after it", detail, None
    norm = model.get_submodule(norm_name)
    kind = norm_kind(norm)
    assert kind is not None
    if kind.adapt is None:
        return f"followed by {type(norm).__name__}", f"{norm_name!r}: {kind.refusal}", None
    if tr.calls.get(norm_name, 0) > 1:
        return "its BatchNorm runs more than once per forward", repr(norm_name), None
    if norm._buffers.get("running_mean") is None:
        return "its BatchNorm has no running statistics", repr(norm_name), None
    features = norm.running_mean.numel()
    if features != conv.out_channels:
        detail = f"{norm_name!r} has {features} features, the conv {conv.out_channels} filters"
        return "its BatchNorm does not match the conv", detail, None
    if conv_name in tr.shared:
        return "its output also feeds something other than its BatchNorm", repr(norm_name), None
    if conv_name in tr.modified:
        return "its output is modified in place before its BatchNorm", repr(norm_name), None
    return None, "", norm_name


def plan_gating(
    model: nn.Module,
    example_input: Tensor,
    *,
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] = (),
) -> GatingSummary:
    """Decide which convs :func:`wrap` gates: traced once, every conv gated or skipped with why.

    A conv is gated when its output goes straight into a BatchNorm it alone feeds: a plain
    ``BatchNorm2d`` (or a subclass keeping its forward), timm's ``BatchNormAct2d`` (its act and
    drop stay after the gated selection) or a ``FrozenBatchNorm2d`` (statistics stay fixed),
    each conv and BN running once per forward. See :data:`NORM_KINDS`.

    Args:
        model: The network (not modified).
        example_input: A batch the model accepts.
        target_modules: Regular expressions; only matching conv names are gated.
        exclude_modules: Regular expressions of conv names never gated.

    Returns:
        The :class:`GatingSummary`.
    """
    tr = trace_convs(model, example_input)
    gated: list[GatedPair] = []
    skipped: list[SkippedConv] = []
    for conv_name in tr.order:
        if (target_modules is not None and not _matches(conv_name, target_modules)) or _matches(
            conv_name, exclude_modules
        ):
            skipped.append(SkippedConv(conv_name, "excluded by target_modules/exclude_modules"))
            continue
        reason, detail, norm_name = _why_not_gated(model, tr, conv_name)
        if reason is not None or norm_name is None:
            skipped.append(SkippedConv(conv_name, reason or "", detail))
        else:
            norm_type = type(model.get_submodule(norm_name)).__name__
            gated.append(GatedPair(conv_name, norm_name, norm_type))
    return GatingSummary(type(model).__name__, tuple(gated), tuple(skipped))


def find_conv_bn_pairs(model: nn.Module, example_input: Tensor) -> list[tuple[str, str]]:
    """Convs whose output goes straight into a BatchNorm they alone feed, in execution order.

    The BN may be a plain ``BatchNorm2d``, timm's ``BatchNormAct2d`` or a
    ``FrozenBatchNorm2d``; see :func:`plan_gating` for the rules and the reasons a conv is
    skipped.
    """
    return plan_gating(model, example_input).pairs


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is not None and any(re.fullmatch(p, name) for p in patterns)
