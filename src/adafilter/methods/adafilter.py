"""AdaFilter and its ablations: gated layers, their policies and the gate's groups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..training.policy_stats import PolicyStats
from ..utils.seeding import derive_seed
from .base import Method, Prepared


class PolicyCost(nn.Module):
    """``model.policy_loss()``: the learned gate's usage cost (``AdaFilterConfig.policy_cost``)."""

    def forward(self, model: nn.Module) -> Tensor:  # type: ignore[override]
        return model.policy_loss()


@dataclass(frozen=True)
class AdaFilterMethod(Method):
    """AdaFilter with fixed :class:`~adafilter.AdaFilterConfig` overrides and a policy source.

    Attributes:
        overrides: AdaFilterConfig fields this method fixes (they win over user overrides).
        policy: ``"learned"`` (the gate) or ``"random"`` (Bernoulli(``random_p``), no gate).
    """

    overrides: dict[str, Any] = field(default_factory=dict)
    policy: str = "learned"
    has_policies: bool = True
    trains_gate: bool = True
    find_unused_parameters: bool = True
    logs_param_groups: bool = True  # AdaFilterModel.param_groups logs them

    @property
    def graph_capturable(self) -> bool:
        return self.policy != "random"  # random policies are drawn on the host per layer

    @property
    def uses_gate_backbone(self) -> bool:
        return self.overrides.get("gate") == "cnn"

    def policy_stats(
        self, prepared: Prepared, *, num_classes: int, device: torch.device
    ) -> PolicyStats | None:
        model = prepared.model
        if not model.gated_layer_names:
            return None
        return PolicyStats(
            model.gated_layer_names,
            model.layer_out_channels,
            lambda: model.policies,
            num_classes=num_classes,
            device=device,
        )

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        from ..tuner import wrap
        from ..tuner.config import AdaFilterConfig

        values = {**dict(options.get("adafilter") or {}), **self.overrides}
        if "random_p" in options:  # else AdaFilterConfig's default
            values.setdefault("random_p", options["random_p"])
        if "gate_backbone" in options:
            values["cnn_gate_backbone"] = options["gate_backbone"]
        try:
            cfg = AdaFilterConfig(**values)
        except (TypeError, ValueError) as e:
            from ..errors import AdaFilterError

            raise AdaFilterError(f"invalid adafilter option: {e}") from None
        gate_net = gate_network() if cfg.gate == "cnn" and gate_network is not None else None
        try:
            m = wrap(network, config=cfg, example_input=example_input, gate_network=gate_net)
        except ValueError as e:  # e.g. a BN-free backbone: nothing to gate
            from ..errors import AdaFilterError

            raise AdaFilterError(f"method {self.name!r}: {e}") from None
        if self.policy != "learned":
            m.gate.requires_grad_(False)  # never used: keep it out of DDP and the optimizer
            m.set_policy_mode(self.policy, p=cfg.random_p, seed=0)
        info = {
            "adafilter": cfg.to_dict(),
            "policy_mode": self.policy,
            "gated_layers": len(m.gated_layer_names),
        }
        cost = PolicyCost() if self.policy == "learned" and cfg.policy_cost > 0 else None
        return Prepared(model=m, method=self, regularizer=cost, info=info)

    def param_groups(
        self, prepared: Prepared, *, lr: float, gate_lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        groups = prepared.model.param_groups(lr=lr, gate_lr=gate_lr, weight_decay=weight_decay)
        if not self.trains_gate:
            groups = [g for g in groups if g["name"] != "gate"]
        return groups

    def on_train_epoch(self, prepared: Prepared, *, seed: int, epoch: int, rank: int) -> None:
        # Each epoch's random policies depend only on (seed, epoch, rank): resume-exact.
        if self.policy == "random":
            prepared.model.set_policy_mode("random", seed=derive_seed(seed, epoch, rank, "pol"))

    def on_evaluate(self, prepared: Prepared, *, seed: int, rank: int) -> None:
        # The same evaluation draws every time, so `adafilter eval` reproduces test_acc.
        if self.policy == "random":
            prepared.model.set_policy_mode("random", seed=derive_seed(seed, rank, "eval"))

    def parameter_counts(self, prepared: Prepared) -> dict[str, int]:
        counts = prepared.model.parameter_counts()
        if not self.trains_gate:
            counts["gate"] = 0
        return counts


def trainable_per_example(model: nn.Module, overall: list[float]) -> float:
    """Trainable parameters one evaluation example uses on average (AdaFilter models).

    Every trainable parameter outside the gated layers' F branch counts fully (including the
    gate, which runs for every example, and a standard-BN ablation's shared BN); a gated
    layer's F filters (conv_f weight and bias) and, with gated BN, its F-branch BN affine
    parameters count with the layer's fraction of (image, filter) decisions that chose F.

    Args:
        model: An ``AdaFilterModel``.
        overall: Per gated layer (execution order), the fraction of decisions that chose F.
    """
    layers = list(model.gated_layers().values())
    per_filter: set[int] = set()
    total = 0.0
    for layer, frac in zip(layers, overall, strict=True):
        branch = list(layer.conv_f.parameters())
        if layer.gated_bn:
            branch += list(layer.bn_f.parameters())
        total += frac * sum(p.numel() for p in branch if p.requires_grad)
        per_filter |= {id(p) for p in branch}
    total += sum(
        p.numel() for p in model.parameters() if p.requires_grad and id(p) not in per_filter
    )
    return float(total)
