"""The :class:`Method` interface and what it builds (:class:`Prepared`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..training.policy_stats import PolicyStats


@dataclass
class Prepared:
    """A model ready to train, as built by a :class:`Method`.

    Attributes:
        model: The module the engine calls (an ``AdaFilterModel`` or the plain network).
        method: The method that built it.
        regularizer: ``regularizer(model) -> Tensor`` added to the loss, or ``None``.
        info: Method-specific facts for ``summary.json`` (e.g. which layers are frozen).
    """

    model: nn.Module
    method: Method
    regularizer: nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_policies(self) -> bool:
        return self.method.has_policies


@dataclass(frozen=True)
class Method:
    """Base class: a name, a builder, optimizer groups and per-epoch hooks.

    Attributes:
        name: Registry name (``--method``).
        description: One line for ``--help`` and the README.
        has_policies: The model exposes ``policies`` (writes ``policy.json``).
        trains_gate: A gate parameter group exists (``gate_lr`` is reported).
        find_unused_parameters: DDP must tolerate parameters without gradient.
        logs_param_groups: :meth:`param_groups` logs the group sizes itself.
        graph_capturable: A training step can be captured as a CUDA graph (nothing in the
            forward is decided on the host per step).
    """

    name: str
    description: str
    has_policies: bool = False
    trains_gate: bool = False
    find_unused_parameters: bool = False
    logs_param_groups: bool = False

    @property
    def graph_capturable(self) -> bool:
        return True

    @property
    def uses_gate_backbone(self) -> bool:
        """The model needs ``TrainConfig.gate_backbone`` (a CNN gate)."""
        return False

    def policy_stats(
        self, prepared: Prepared, *, num_classes: int, device: torch.device
    ) -> PolicyStats | None:
        """An accumulator of the evaluation's policies, or ``None`` (no policies)."""
        return None

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        """Turn ``network`` (modified in place) into the model that trains.

        Args:
            network: The backbone with its new classifier head.
            head_name: Qualified name of the classifier module inside ``network``.
            example_input: A small batch the network accepts (for tracing layer order).
            options: Method options from :class:`~adafilter.training.config.TrainConfig`
                (``l2sp_alpha``, ``l2sp_beta``, ``random_p``, ``adafilter`` overrides).
            gate_network: Builds ``(features, feature_dim)`` for a CNN gate, when needed.
        """
        raise NotImplementedError

    def param_groups(
        self, prepared: Prepared, *, lr: float, gate_lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """Optimizer groups ``{"name", "params", "lr", "weight_decay"}`` (trainable only)."""
        params = [p for p in prepared.model.parameters() if p.requires_grad]
        return [{"name": "network", "params": params, "lr": lr, "weight_decay": weight_decay}]

    def on_train_epoch(self, prepared: Prepared, *, seed: int, epoch: int, rank: int) -> None:
        """Called before each training epoch (1-based ``epoch``)."""

    def on_evaluate(self, prepared: Prepared, *, seed: int, rank: int) -> None:
        """Called before each evaluation."""

    def parameter_counts(self, prepared: Prepared) -> dict[str, int]:
        """``{"total", "trainable", "frozen", "gate"}`` parameter counts."""
        params = list(prepared.model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"total": total, "trainable": trainable, "frozen": total - trainable, "gate": 0}


# ---- standard fine-tuning and its variants --------------------------------------------------
