"""Fine-tuning methods: AdaFilter, its ablations and the paper's baselines (Table 2-4).

A :class:`Method` says how to turn a backbone into the model that trains (:meth:`Method.build`),
which parameters train with which learning rate (:meth:`Method.param_groups`), what extra loss
it adds (``Prepared.regularizer``) and whether it has per-example policies. Methods are small
frozen dataclasses registered in :data:`METHODS`; the engine never branches on a method name.

=================  ===========================================================================
``adafilter``      recurrent (LSTM) gate + gated BN: the paper's method
``finetune``       standard fine-tuning of every parameter
``finetune-half``  freeze the first ``floor(n/2)`` convs (execution order) and their BNs
``random-policy``  AdaFilter with Bernoulli(``random_p``) policies (train and eval), no gate
``l2sp``           fine-tuning + L2-SP penalty (Li et al. 2018), no weight decay
``standard-bn``    AdaFilter with one standard BN after the selection (Table 3)
``cnn-gate``       AdaFilter whose policy comes from a CNN that sees the image (Table 4)
=================  ===========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .training.policy_stats import PolicyStats
from .tuner import conv_execution_order
from .utils.registry import Registry
from .utils.seeding import derive_seed

logger = logging.getLogger("adafilter")

__all__ = [
    "METHODS",
    "AdaFilterMethod",
    "FineTune",
    "FineTuneHalf",
    "L2SP",
    "L2SPRegularizer",
    "Method",
    "Prepared",
    "conv_execution_order",
    "derive_seed",
    "freeze_first_half",
    "trainable_per_example",
]


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


@dataclass(frozen=True)
class FineTune(Method):
    """Standard fine-tuning: every parameter of the backbone and the new head trains."""

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        network.requires_grad_(True)
        return Prepared(model=network, method=self)


def freeze_first_half(model: nn.Module, example_input: Tensor, *, head_name: str) -> dict[str, Any]:
    """Freeze the first ``floor(n / 2)`` of the ``n`` backbone convs and the BNs after them.

    "First" is execution order on ``example_input`` (:func:`conv_execution_order`; the head is
    never frozen). Frozen means ``requires_grad=False`` for the conv's weight/bias and the
    directly-following BN's affine weight/bias. The frozen BNs' running statistics keep
    updating in training mode, exactly as in standard fine-tuning (the paper's setting: only
    the listed parameters are excluded from training).

    Returns:
        ``{"num_convs", "frozen_convs", "frozen_bns", "bn_running_stats"}`` for the summary.
    """
    order = conv_execution_order(model, example_input, skip_prefix=head_name)
    k = len(order) // 2
    frozen_convs, frozen_bns = [], []
    for conv_name, bn_name in order[:k]:
        model.get_submodule(conv_name).requires_grad_(False)
        frozen_convs.append(conv_name)
        if bn_name is not None:
            model.get_submodule(bn_name).requires_grad_(False)
            frozen_bns.append(bn_name)
    return {
        "num_convs": len(order),
        "frozen_convs": frozen_convs,
        "frozen_bns": frozen_bns,
        "bn_running_stats": "updated in training mode (only affine parameters are frozen)",
    }


@dataclass(frozen=True)
class FineTuneHalf(FineTune):
    """Fine-tune the second half of the backbone's convs and the head; freeze the first half."""

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        network.requires_grad_(True)
        info = freeze_first_half(network, example_input, head_name=head_name)
        logger.info(
            "finetune-half: froze %d of %d convs (+%d BNs)",
            len(info["frozen_convs"]),
            info["num_convs"],
            len(info["frozen_bns"]),
        )
        return Prepared(model=network, method=self, info={"finetune_half": info})


def _in_module(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class L2SPRegularizer(nn.Module):
    """L2-SP (Li, Grandvalet, Davoine 2018): ``alpha/2 ||w - w0||^2 + beta/2 ||w_head||^2``.

    ``w0`` is a copy of the pretrained (non-head) trainable parameters taken at construction;
    the second term covers the new classifier head. Call it as ``regularizer(model)``.

    Args:
        model: The network at its pretrained starting point.
        head_name: Qualified name of the new classifier head.
        alpha: Weight of the starting-point term.
        beta: Weight of the head term.
    """

    def __init__(self, model: nn.Module, *, head_name: str, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.sp_names = [n for n, _ in named if not _in_module(n, head_name)]
        self.head_names = [n for n, _ in named if _in_module(n, head_name)]
        if not self.head_names:
            raise ValueError(f"head {head_name!r} has no trainable parameters in the model")
        params = dict(named)
        for i, n in enumerate(self.sp_names):
            self.register_buffer(f"w0_{i}", params[n].detach().clone())

    @property
    def covered_names(self) -> list[str]:
        """Every parameter the penalty covers (these get no weight decay)."""
        return self.sp_names + self.head_names

    def terms(self, model: nn.Module) -> dict[str, Tensor]:
        """The two terms separately: ``{"sp": ..., "head": ...}`` (float32 scalars)."""
        params = dict(model.named_parameters())
        sp = sum(
            ((params[n].float() - getattr(self, f"w0_{i}").float()) ** 2).sum()
            for i, n in enumerate(self.sp_names)
        )
        head = sum((params[n].float() ** 2).sum() for n in self.head_names)
        zero = next(iter(params.values())).new_zeros((), dtype=torch.float32)
        return {"sp": 0.5 * self.alpha * (sp + zero), "head": 0.5 * self.beta * (head + zero)}

    def forward(self, model: nn.Module) -> Tensor:  # type: ignore[override]
        t = self.terms(model)
        return t["sp"] + t["head"]


@dataclass(frozen=True)
class L2SP(FineTune):
    """Fine-tuning with the L2-SP penalty and no weight decay on the penalised parameters."""

    def build(
        self,
        network: nn.Module,
        *,
        head_name: str,
        example_input: Tensor,
        options: dict[str, Any],
        gate_network: Callable[[], tuple[nn.Module, int]] | None = None,
    ) -> Prepared:
        network.requires_grad_(True)
        reg = L2SPRegularizer(
            network,
            head_name=head_name,
            alpha=options.get("l2sp_alpha", 0.01),
            beta=options.get("l2sp_beta", 0.01),
        )
        info = {
            "l2sp": {
                "alpha": reg.alpha,
                "beta": reg.beta,
                "head": head_name,
                "pretrained_tensors": len(reg.sp_names),
                "head_tensors": len(reg.head_names),
            }
        }
        return Prepared(model=network, method=self, regularizer=reg, info=info)

    def param_groups(
        self, prepared: Prepared, *, lr: float, gate_lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        assert isinstance(prepared.regularizer, L2SPRegularizer)
        covered = set(prepared.regularizer.covered_names)
        named = [(n, p) for n, p in prepared.model.named_parameters() if p.requires_grad]
        groups = [
            {
                "name": "network",
                "params": [p for n, p in named if n in covered],
                "lr": lr,
                "weight_decay": 0.0,
            }
        ]
        rest = [p for n, p in named if n not in covered]
        if rest:  # parameters the penalty does not cover keep ordinary weight decay
            groups.append(
                {"name": "network-decay", "params": rest, "lr": lr, "weight_decay": weight_decay}
            )
        return groups


# ---- AdaFilter and its ablations ------------------------------------------------------------


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
        from . import AdaFilterConfig, wrap

        values = {**dict(options.get("adafilter") or {}), **self.overrides}
        if "random_p" in options:  # else AdaFilterConfig's default
            values.setdefault("random_p", options["random_p"])
        if "gate_backbone" in options:
            values["cnn_gate_backbone"] = options["gate_backbone"]
        try:
            cfg = AdaFilterConfig(**values)
        except (TypeError, ValueError) as e:
            from .errors import AdaFilterError

            raise AdaFilterError(f"invalid adafilter option: {e}") from None
        gate_net = gate_network() if cfg.gate == "cnn" and gate_network is not None else None
        try:
            m = wrap(network, config=cfg, example_input=example_input, gate_network=gate_net)
        except ValueError as e:  # e.g. a BN-free backbone: nothing to gate
            from .errors import AdaFilterError

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


METHODS: Registry[Method] = Registry("method")
METHODS.add(
    "adafilter",
    AdaFilterMethod(
        "adafilter", "AdaFilter: recurrent (LSTM) gate + gated BN (the paper's method)"
    ),
)
METHODS.add("finetune", FineTune("finetune", "standard fine-tuning of all parameters"))
METHODS.add(
    "finetune-half",
    FineTuneHalf(
        "finetune-half", "freeze the first half of the convs (execution order) and their BNs"
    ),
)
METHODS.add(
    "random-policy",
    AdaFilterMethod(
        "random-policy",
        "AdaFilter with random Bernoulli(0.5) policies, no gate",
        policy="random",
        trains_gate=False,
    ),
)
METHODS.add(
    "adafilter-all-f",
    AdaFilterMethod(
        "adafilter-all-f",
        "AdaFilter with every filter forced to F, no gate: equals fine-tuning (a check)",
        policy="finetuned",
        trains_gate=False,
    ),
)
METHODS.add("l2sp", L2SP("l2sp", "fine-tuning with the L2-SP penalty (alpha=beta=0.01)"))
METHODS.add(
    "standard-bn",
    AdaFilterMethod(
        "standard-bn",
        "AdaFilter with one standard BN instead of gated BN (Table 3)",
        overrides={"gated_bn": False},
    ),
)
METHODS.add(
    "cnn-gate",
    AdaFilterMethod(
        "cnn-gate",
        "AdaFilter whose policy comes from a separate CNN on the image (Table 4)",
        overrides={"gate": "cnn"},
    ),
)
