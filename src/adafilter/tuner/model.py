"""AdaFilterModel: a conv-BN network with gated layers, owning the gate and the policies."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.gate import CNNGate, RecurrentGate
from ..layers.gated_conv import GatedConv2dBN, policy_source
from ..utils.modules import set_submodule
from .config import POLICY_MODES, AdaFilterConfig
from .norms import norm_kind
from .plan import GatedPair, GatingSummary
from .policies import ForwardPolicies

logger = logging.getLogger("adafilter")

__all__ = [
    "AdaFilterModel",
    "build_gate",
    "default_gate_network",
    "log_param_groups",
    "mark_trainable",
]


class AdaFilterModel(nn.Module):
    """A conv-BN network whose gated convs pick each filter from F or S per example.

    Build it with :func:`wrap`. ``policies`` holds the last forward's decisions
    ``{conv name: bool (B, C_out)}`` (True = fine-tuned filter).

    Args:
        model: The pretrained network; modified in place.
        config: What to gate and how.
        pairs: ``(conv_name, bn_name)`` to gate, in execution order; the BN may be any
            gateable :data:`NORM_KINDS` entry (e.g. timm's ``BatchNormAct2d``).
        gate_network: For ``config.gate == "cnn"``: ``(features, feature_dim)``; default
            ``config.cnn_gate_backbone``, randomly initialised.
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
        self.gated_layer_names = [conv_name for conv_name, _ in pairs]
        in_ch = [model.get_submodule(conv_name).in_channels for conv_name, _ in pairs]
        found = [_gate_pair(model, config, i, *pair) for i, pair in enumerate(pairs)]
        self._gating_summary = summary or GatingSummary(type(model).__name__, tuple(found))
        self.layer_out_channels: list[int] = [
            model.get_submodule(n).out_channels for n in self.gated_layer_names
        ]
        self.gate = build_gate(config, in_ch, self.layer_out_channels, gate_network)
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

    @property
    def policy_generator(self) -> torch.Generator:
        """The ``random`` mode's generator (its state goes into mid-epoch checkpoints)."""
        return self._generator

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
        return self.forward_with_policies(x)[0]

    def forward_with_policies(self, x: Tensor) -> tuple[Any, dict[str, Tensor]]:
        """The forward and this call's own decisions ``{conv name: bool (B, C_out)}``.

        Unlike :attr:`policies` (the last forward of any thread), the decisions come from
        this call's policy source: right when threads share the model (a server).
        """
        runtime = ForwardPolicies(self, x)
        with policy_source(runtime):
            out = self.model(x)  # (B, num_classes)
        self._decisions = runtime.decisions
        # Kept (with its graph) only until policy_loss() reads it, and only when it costs.
        self._f_share = None
        if runtime.f_sum is not None and self.config.policy_cost > 0:
            self._f_share = runtime.f_sum / runtime.f_count
        return out, self._named(runtime.decisions)

    def _named(self, decisions: dict[int, Tensor]) -> dict[str, Tensor]:
        return {self.gated_layer_names[i]: g > 0.5 for i, g in decisions.items()}

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
        runtime = ForwardPolicies(self, x, keep_logits=True)
        with self.without_gate_noise(), policy_source(runtime):
            self.model(x)
        assert runtime.logits is not None
        return {self.gated_layer_names[i]: v for i, v in runtime.logits.items()}

    @property
    def policies(self) -> dict[str, Tensor]:
        """The last forward's decisions: ``{conv name: bool (B, C_out)}``, True = F."""
        return self._named(self._decisions)

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


def _gate_pair(
    model: nn.Module, config: AdaFilterConfig, index: int, conv_name: str, bn_name: str
) -> GatedPair:
    """Put one :class:`GatedConv2dBN` (conv + norm) in the conv's slot; the norm's slot keeps
    what the norm computes after normalising (norm-act modules: act and drop)."""
    conv = model.get_submodule(conv_name)
    norm = model.get_submodule(bn_name)
    kind = norm_kind(norm)
    if kind is None or kind.adapt is None:
        why = f": {kind.refusal}" if kind is not None else ""
        raise ValueError(
            f"cannot gate {conv_name!r}: {bn_name!r} is a {type(norm).__name__}, not a "
            f"BatchNorm that can be gated{why}"
        )
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
        recompute_s=config.recompute_pretrained,
    )
    set_submodule(model, conv_name, layer)
    set_submodule(model, bn_name, slot)  # the BN now lives in `layer`
    return GatedPair(conv_name, bn_name, type(norm).__name__)


def build_gate(
    config: AdaFilterConfig,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    gate_network: tuple[nn.Module, int] | None = None,
) -> nn.Module:
    """The policy network ``config.gate`` names.

    Args:
        config: The model's options.
        in_channels: Input channels of each gated conv, in execution order.
        out_channels: Filters of each gated conv, in execution order.
        gate_network: ``(features, feature_dim)`` of a CNN gate; default
            :func:`default_gate_network`.

    Returns:
        A :class:`RecurrentGate` (``"lstm"``) or a :class:`CNNGate` (``"cnn"``).
    """
    if config.gate == "lstm":
        return RecurrentGate(
            in_channels,
            out_channels,
            embed_dim=config.embed_dim,
            hidden_dim=config.hidden_dim,
            bias_init=config.gate_bias_init,
            detach_input=not config.gate_input_grad,
        )
    features, dim = gate_network if gate_network is not None else default_gate_network(config)
    return CNNGate(features, dim, out_channels, bias_init=config.gate_bias_init)


def default_gate_network(config: AdaFilterConfig) -> tuple[nn.Module, int]:
    """``config.cnn_gate_backbone`` as a randomly initialised feature extractor.

    Returns:
        ``(features, feature_dim)``: the registered backbone with its classifier replaced by
        ``nn.Identity``.

    Raises:
        AdaFilterError: ``cnn_gate_backbone`` is not a registered backbone.
    """
    from ..backbones import build_feature_extractor

    return build_feature_extractor(config.cnn_gate_backbone)
