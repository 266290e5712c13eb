"""AdaFilterModel: finds conv->BN pairs, swaps in gated layers, owns the gate and the policies."""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import POLICY_MODES, AdaFilterConfig
from .layers.gate import CNNGate, RecurrentGate, binarize
from .layers.gated_conv import GatedConv2dBN, policy_source
from .utils.modules import set_submodule

logger = logging.getLogger("adafilter")

__all__ = [
    "NORM_KINDS",
    "AdaFilterModel",
    "GatedPair",
    "GatingSummary",
    "NormActTail",
    "NormKind",
    "SkippedConv",
    "conv_execution_order",
    "find_conv_bn_pairs",
    "norm_kind",
    "plan_gating",
    "wrap",
]


# ---- what follows a conv: the kinds of normalisation that can be gated ---------------------


class NormActTail(nn.Module):
    """What stays in a norm-act module's slot once its BN has moved into a gated layer.

    timm's ``BatchNormAct2d`` (and ``FrozenBatchNormAct2d``) computes ``act(drop(bn(x)))``; the
    gated layer now computes the BN, so the slot keeps the original ``drop`` and ``act``
    modules (the same objects, applied in the same order).
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


@dataclass(frozen=True)
class NormKind:
    """How one kind of normalisation module found right after a conv is gated.

    Attributes:
        name: Description of the kind.
        matches: Whether a module is of this kind (first matching entry of
            :data:`NORM_KINDS` wins).
        adapt: ``module -> (bn, slot, fixed_stats)``: the plain ``BatchNorm2d`` the gated layer
            holds, the module that takes the norm's place in the network (whatever the norm
            computes after normalising) and whether the statistics stay fixed in training.
            ``None``: this kind is never gated.
        refusal: Why this kind is not gated (when ``adapt`` is ``None``).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    adapt: Callable[[Any], tuple[nn.BatchNorm2d, nn.Module, bool]] | None = None
    refusal: str = ""


_FROZEN_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _has_act_drop(m: nn.Module) -> bool:
    return isinstance(getattr(m, "act", None), nn.Module) and isinstance(
        getattr(m, "drop", None), nn.Module
    )


def _is_plain_bn(m: nn.Module) -> bool:
    # A subclass that keeps BatchNorm's forward computes exactly what the gated BN does.
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is _BatchNorm.forward


def _is_norm_act(m: nn.Module) -> bool:
    # timm's BatchNormAct2d and kin: a BatchNorm2d whose forward is act(drop(bn(x))).
    return isinstance(m, nn.BatchNorm2d) and _has_act_drop(m)


def _is_frozen_bn(m: nn.Module) -> bool:
    # torchvision.ops.FrozenBatchNorm2d (timm uses the same class) and timm's
    # FrozenBatchNormAct2d: statistics and affine held as buffers, forward x * scale + shift.
    return (
        not isinstance(m, _BatchNorm)
        and "FrozenBatchNorm" in type(m).__name__
        and all(isinstance(m._buffers.get(k), Tensor) for k in _FROZEN_BN_BUFFERS)
        and isinstance(getattr(m, "eps", None), float)
    )


def _copy_bn(m: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A plain ``BatchNorm2d`` with ``m``'s hyper-parameters, parameters and statistics."""
    ref = m.running_mean if m.running_mean is not None else m.weight
    bn = nn.BatchNorm2d(
        m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    with torch.no_grad():
        for name, t in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            t.copy_(getattr(m, name))
    return bn.train(m.training)


def _adapt_plain(m: nn.BatchNorm2d) -> tuple[nn.BatchNorm2d, nn.Module, bool]:
    return m, nn.Identity(), False


def _adapt_norm_act(m: nn.BatchNorm2d) -> tuple[nn.BatchNorm2d, nn.Module, bool]:
    return _copy_bn(m), NormActTail(m.drop, m.act), False


def _adapt_frozen(m: nn.Module) -> tuple[nn.BatchNorm2d, nn.Module, bool]:
    w = m.weight
    bn = nn.BatchNorm2d(w.numel(), eps=m.eps, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for name in _FROZEN_BN_BUFFERS:
            getattr(bn, name).copy_(getattr(m, name))
    slot = NormActTail(m.drop, m.act) if _has_act_drop(m) else nn.Identity()
    return bn, slot, True  # both branches start from it and keep its statistics


#: Normalisations after a conv, first match wins. Append a :class:`NormKind` to teach
#: :func:`wrap` another one.
NORM_KINDS: list[NormKind] = [
    NormKind(
        "SyncBatchNorm",
        lambda m: isinstance(m, nn.SyncBatchNorm),
        refusal="SyncBatchNorm is not gated (its statistics are reduced across processes); "
        "convert it to BatchNorm2d before wrap()",
    ),
    NormKind("BatchNorm2d", _is_plain_bn, _adapt_plain),
    NormKind("BatchNorm2d + act/drop (timm BatchNormAct2d)", _is_norm_act, _adapt_norm_act),
    NormKind(
        "frozen BatchNorm (FrozenBatchNorm2d, fixed statistics)", _is_frozen_bn, _adapt_frozen
    ),
    NormKind(
        "other BatchNorm",
        lambda m: isinstance(m, _BatchNorm),
        refusal="a BatchNorm with its own forward (what it computes is unknown)",
    ),
]


def norm_kind(module: nn.Module) -> NormKind | None:
    """The :data:`NORM_KINDS` entry ``module`` belongs to, or ``None`` (not a BatchNorm)."""
    return next((k for k in NORM_KINDS if k.matches(module)), None)


# ---- tracing ---------------------------------------------------------------------------------


@dataclass
class _Trace:
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


def _trace(model: nn.Module, example_input: Tensor, skip_prefix: str | None = None) -> _Trace:
    """Run ``model`` once (eval mode, running statistics untouched) and record its convs.

    Forward pre-hooks on every module record which modules are called with a conv's output
    tensor (the same object, so ``bn(conv(x))`` but not ``bn(conv(x) + y)``); the autograd
    graph of the pass (the input requires grad, no backward runs) tells whether anything else
    also reads that output, e.g. a residual ``torch.cat``.
    """
    names = {m: n for n, m in model.named_modules()}
    tr = _Trace()
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
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            out = model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    counts = _consumer_counts(_tensors(out))
    tr.shared = {n for n, _, _, node in produced.values() if counts.get(node, 0) > 1}
    return tr


def _first_norm(model: nn.Module, consumers: Sequence[str]) -> str | None:
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
    tr = _trace(model, example_input, skip_prefix)
    out: list[tuple[str, str | None]] = []
    for conv in tr.order:
        norm = _first_norm(model, tr.consumers.get(conv, []))
        once = norm is not None and tr.calls.get(conv) == 1 and tr.calls.get(norm) == 1
        out.append((conv, norm if once else None))
    return out


# ---- the gating plan -------------------------------------------------------------------------


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
    model: nn.Module, tr: _Trace, conv_name: str
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
    norm_name = _first_norm(model, consumers)
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
    tr = _trace(model, example_input)
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


class _Runtime:
    """Per-forward policy state: the LSTM state, the decisions made so far."""

    def __init__(self, owner: AdaFilterModel, image: Tensor, *, keep_logits: bool = False) -> None:
        self.owner = owner
        self.state: tuple[Tensor, Tensor] | None = None
        self.decisions: dict[int, Tensor] = {}
        self.logits: dict[int, Tensor] | None = {} if keep_logits else None
        self.f_sum: Tensor | None = None  # sum of the learned decisions, with gradient
        self.f_count = 0
        self.cnn_logits: list[Tensor] | None = None
        if owner.policy_mode == "learned" and isinstance(owner.gate, CNNGate):
            self.cnn_logits = owner.gate(image)

    def policy(self, index: int, x: Tensor) -> Tensor:
        owner = self.owner
        b, c = x.shape[0], owner.layer_out_channels[index]
        mode = owner.policy_mode
        if mode == "learned":
            if self.cnn_logits is not None:
                logits = self.cnn_logits[index]
            else:
                assert isinstance(owner.gate, RecurrentGate)
                logits, self.state = owner.gate.step(index, x, self.state)
            if self.logits is not None:
                self.logits[index] = logits.detach()
            if owner.training and owner.config.gate_noise > 0:
                u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
                logits = logits + owner.config.gate_noise * (u.log() - (-u).log1p())  # logistic
            if torch.is_grad_enabled() or owner.training:
                g = binarize(logits, owner.config.ste)
                if g.requires_grad:
                    self.f_sum = g.sum() if self.f_sum is None else self.f_sum + g.sum()
                    self.f_count += g.numel()
            else:
                g = logits >= 0  # (B, C) bool: inference needs no 0./1. floats (Eq. 2)
        elif mode == "random":
            draw = torch.rand(b, c, generator=owner._generator)
            g = (draw < owner.random_p).to(device=x.device, dtype=x.dtype)
        else:
            g = x.new_full((b, c), 1.0 if mode == "finetuned" else 0.0)
        self.decisions[index] = g.detach() if g.requires_grad else g  # no graph kept alive
        return g


class AdaFilterModel(nn.Module):
    """A conv-BN network whose gated convs pick each filter from F or S per example.

    Build it with :func:`wrap`. ``policies`` holds the last forward's decisions
    ``{conv name: bool (B, C_out)}`` (True = fine-tuned filter).

    Args:
        model: The pretrained network; modified in place.
        config: What to gate and how.
        pairs: ``(conv_name, bn_name)`` to gate, in execution order; the BN may be any
            gateable :data:`NORM_KINDS` entry (e.g. timm's ``BatchNormAct2d``).
        gate_network: For ``config.gate == "cnn"``: ``(features, feature_dim)``.
        summary: What :func:`plan_gating` found (returned by :meth:`gating_summary`);
            default: the gated pairs only.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdaFilterConfig,
        pairs: Sequence[tuple[str, str]],
        *,
        gate_network: tuple[nn.Module, int] | None = None,
        summary: GatingSummary | None = None,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("no Conv2d directly followed by a BatchNorm2d was found to gate")
        self.config = config
        self.model = model
        self.gated_layer_names: list[str] = []
        in_ch: list[int] = []
        found: list[GatedPair] = []
        for index, (conv_name, bn_name) in enumerate(pairs):
            conv = model.get_submodule(conv_name)
            norm = model.get_submodule(bn_name)
            kind = norm_kind(norm)
            if kind is None or kind.adapt is None:
                why = f": {kind.refusal}" if kind is not None else ""
                raise ValueError(
                    f"cannot gate {conv_name!r}: {bn_name!r} is a {type(norm).__name__}, not a "
                    f"BatchNorm that can be gated{why}"
                )
            found.append(GatedPair(conv_name, bn_name, type(norm).__name__))
            # norm-act modules keep their act/drop in the slot; frozen BNs keep their statistics
            bn, slot, fixed_stats = kind.adapt(norm)
            layer = GatedConv2dBN(
                conv,
                bn,
                index=index,
                gated_bn=config.gated_bn,
                bn_min_examples=config.bn_min_examples,
                bn_min_values=config.bn_min_values,
                fast_eval=config.fast_eval,
                fixed_stats=fixed_stats,
            )
            set_submodule(model, conv_name, layer)
            set_submodule(model, bn_name, slot)  # the BN now lives in `layer`
            self.gated_layer_names.append(conv_name)
            in_ch.append(conv.in_channels)
        self._gating_summary = summary or GatingSummary(type(model).__name__, tuple(found))
        self.layer_out_channels: list[int] = [
            model.get_submodule(n).out_channels for n in self.gated_layer_names
        ]
        self.gate: nn.Module
        if config.gate == "lstm":
            self.gate = RecurrentGate(
                in_ch,
                self.layer_out_channels,
                embed_dim=config.embed_dim,
                hidden_dim=config.hidden_dim,
                bias_init=config.gate_bias_init,
                detach_input=not config.gate_input_grad,
            )
        else:
            features, dim = gate_network if gate_network is not None else _default_cnn_gate()
            self.gate = CNNGate(
                features, dim, self.layer_out_channels, bias_init=config.gate_bias_init
            )
        # The gate lives where the wrapped model does (device and float dtype, as the F copies).
        first = next(model.parameters(), None)
        if first is not None:
            self.gate.to(device=first.device, dtype=first.dtype)
        self.policy_mode = "learned"
        self.random_p = config.random_p
        self._generator = torch.Generator().manual_seed(0)
        self._decisions: dict[int, Tensor] = {}
        mark_trainable(self)

    @property
    def capturable(self) -> bool:
        """Every gated layer and the gate run their capturable path (see the setter)."""
        layers = [*self.gated_layers().values(), self.gate]
        return all(getattr(m, "capturable", True) for m in layers)

    @capturable.setter
    def capturable(self, value: bool) -> None:
        """Run without host synchronisation, caches or data-dependent shapes.

        For ``torch.compile(model, fullgraph=True)`` and CUDA-graph capture: masks and counts
        stay on the device and every rule (the gated BN's min-examples and whole-branch rules)
        is a tensor ``where``. Results equal the default path's, which keeps the faster CPU
        tricks (statistics through ATen's BN kernels, a backward on the used filters only, the
        batch-1 merged filters cached across calls). ``torch.compile`` takes this path while
        it traces even when the flag is off.
        """
        for m in [*self.gated_layers().values(), self.gate]:
            if hasattr(m, "capturable"):
                m.capturable = bool(value)

    def gating_summary(self) -> GatingSummary:
        """Which convs were gated (and the norm after each) and which were skipped, and why.

        ``print(model.gating_summary())`` lists every conv; ``.brief()`` is one line.
        """
        return self._gating_summary

    def gated_layers(self) -> dict[str, GatedConv2dBN]:
        """The gated layers by conv name, in execution order."""
        return {n: self.model.get_submodule(n) for n in self.gated_layer_names}  # type: ignore[misc]

    def set_policy_mode(
        self, mode: str, *, p: float | None = None, seed: int | None = None
    ) -> None:
        """Choose where policies come from.

        Args:
            mode: ``learned`` (the gate, default), ``random`` (Bernoulli(p) per example and
                filter: the paper's Random Policy baseline), ``finetuned`` (all F) or
                ``pretrained`` (all S).
            p: Probability of a fine-tuned filter in ``random`` mode (default: config's).
            seed: Seeds the ``random`` mode's generator; ``None`` keeps its current state.
        """
        if mode not in POLICY_MODES:
            raise ValueError(f"policy mode must be one of {', '.join(POLICY_MODES)}, got {mode!r}")
        if p is not None:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"p must be in [0, 1], got {p!r}")
            self.random_p = p
        if seed is not None:
            self._generator.manual_seed(seed)
        self.policy_mode = mode

    def forward(self, x: Tensor) -> Any:
        runtime = _Runtime(self, x)
        with policy_source(runtime):
            out = self.model(x)  # (B, num_classes)
        self._decisions = runtime.decisions
        # Kept (with its graph) only until policy_loss() reads it, and only when it costs.
        self._f_share = None
        if runtime.f_sum is not None and self.config.policy_cost > 0:
            self._f_share = runtime.f_sum / runtime.f_count
        return out

    def policy_loss(self) -> Tensor:
        """``config.policy_cost`` x the last training forward's share of fine-tuned filters.

        Differentiable through the straight-through estimator (a zero tensor when the cost
        is 0 or the last forward had no learned, differentiable policy).
        """
        share, self._f_share = getattr(self, "_f_share", None), None
        if share is None:
            return torch.zeros((), device=self.gate_device())
        return self.config.policy_cost * share

    def gate_device(self) -> torch.device:
        p = next(self.gate.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @contextlib.contextmanager
    def without_gate_noise(self) -> Iterator[None]:
        """Inside the block, training-mode policies are the deterministic ones (no noise)."""
        noise, self.config.gate_noise = self.config.gate_noise, 0.0
        try:
            yield
        finally:
            self.config.gate_noise = noise

    @torch.no_grad()
    def policy_logits(self, x: Tensor) -> dict[str, Tensor]:
        """The learned gate's logits for ``x``: ``{conv name: (B, C_out)}`` (> 0 = F).

        Runs the model once in its current mode (without noise); empty unless the policy
        mode is ``learned``.
        """
        runtime = _Runtime(self, x, keep_logits=True)
        with self.without_gate_noise(), policy_source(runtime):
            self.model(x)
        assert runtime.logits is not None
        return {self.gated_layer_names[i]: v for i, v in runtime.logits.items()}

    @property
    def policies(self) -> dict[str, Tensor]:
        """The last forward's decisions: ``{conv name: bool (B, C_out)}``, True = F."""
        return {self.gated_layer_names[i]: g > 0.5 for i, g in self._decisions.items()}

    def param_groups(
        self, *, lr: float = 0.01, gate_lr: float = 0.1, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """Optimizer groups: the network's trainable parameters and the gate's.

        The paper trains the network at lr 0.01 and the gate at 0.1. Frozen S copies are in
        neither group. The size of each group is logged.
        """
        gate_ids = {id(p) for p in self.gate.parameters()}
        net = [p for p in self.parameters() if p.requires_grad and id(p) not in gate_ids]
        gate = [p for p in self.gate.parameters() if p.requires_grad]
        groups = [
            {"name": "network", "params": net, "lr": lr, "weight_decay": weight_decay},
            {"name": "gate", "params": gate, "lr": gate_lr, "weight_decay": weight_decay},
        ]
        log_param_groups(groups)
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: total, trainable, frozen (the S copies) and gate."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "total": total,
            "trainable": trainable,
            "frozen": total - trainable,
            "gate": sum(p.numel() for p in self.gate.parameters()),
        }


def log_param_groups(groups: Sequence[dict[str, Any]]) -> None:
    """Log each optimizer group's name, tensor and parameter count, lr and weight decay."""
    for grp in groups:
        logger.info(
            "param group %-8s %4d tensors %12s parameters lr %g weight_decay %g",
            grp.get("name", "?"),
            len(grp["params"]),
            f"{sum(p.numel() for p in grp['params']):,}",
            grp["lr"],
            grp.get("weight_decay", 0.0),
        )


def mark_trainable(model: AdaFilterModel) -> None:
    """The one place that decides what trains: everything except the pretrained filters S."""
    for p in model.parameters():
        p.requires_grad_(True)
    for layer in model.gated_layers().values():
        layer.conv_s.requires_grad_(False)


def _default_cnn_gate() -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def wrap(
    model: nn.Module,
    config: AdaFilterConfig | None = None,
    *,
    example_input: Tensor | None = None,
    gate_network: tuple[nn.Module, int] | None = None,
) -> AdaFilterModel:
    """Turn every conv directly followed by a BN into an AdaFilter layer.

    Gated: convs whose output goes straight into a ``BatchNorm2d``, timm's ``BatchNormAct2d``
    (act and drop stay after the selection) or a ``FrozenBatchNorm2d`` (fixed statistics) that
    only they feed (see :func:`plan_gating`). The summary of what was gated and what was
    skipped and why is logged (INFO: one line, DEBUG: every conv) and kept as
    :meth:`AdaFilterModel.gating_summary`.

    Args:
        model: A pretrained conv-BN network (modified in place and owned by the result).
        config: Options; defaults to :class:`AdaFilterConfig`'s defaults (the paper's method).
        example_input: A batch the model accepts, used once to trace conv->BN pairs;
            default ``torch.zeros(1, 3, 64, 64)``.
        gate_network: ``(features, feature_dim)`` for ``config.gate == "cnn"``; default a
            randomly initialised torchvision ResNet-18 trunk.

    Returns:
        The wrapped model. At initialisation its outputs equal the original model's in every
        policy mode (F = S and both BNs are copies of the pretrained one).

    Raises:
        ValueError: Nothing can be gated (e.g. a BN-free network such as ConvNeXt or a ViT).
    """
    config = config or AdaFilterConfig()
    if example_input is None:
        try:
            p = next(model.parameters())
            example_input = torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype)
        except StopIteration:
            example_input = torch.zeros(1, 3, 64, 64)
    summary = plan_gating(
        model,
        example_input,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
    )
    logger.info("adafilter.wrap: %s", summary.brief())
    logger.debug("%s", summary)
    if not summary.gated:
        why = "; ".join(f"{r}: {n}" for r, n in summary.skip_reasons().items())
        raise ValueError(
            f"no Conv2d directly followed by a BatchNorm2d was found to gate in {summary.model} "
            f"({why or 'it has no Conv2d'}); AdaFilter needs conv->BatchNorm layers"
        )
    return AdaFilterModel(model, config, summary.pairs, gate_network=gate_network, summary=summary)
