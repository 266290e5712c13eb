"""The run's optimizer: SGD for the network, SGD or Adam for the gate, seen as one optimizer;
its parameter groups (the method decides) and the step schedule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

if TYPE_CHECKING:
    from ..methods import Prepared

__all__ = [
    "HybridOptimizer",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "group_lr",
]


class HybridOptimizer(Optimizer):
    """Several optimizers over disjoint parameter groups, presented as one.

    ``param_groups`` holds the children's own group dicts, so a learning-rate scheduler that
    scales ``group["lr"]`` reaches every child; ``step``, ``zero_grad`` and the state dict
    go to each child in turn.

    Args:
        optimizers: The children, each owning some of the groups.
    """

    def __init__(self, optimizers: list[Optimizer]) -> None:
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        states = state_dict.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(
                "optimizer state is not from the same gate optimizer; resume with the same "
                "gate_optimizer"
            )
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)
        # Loading gives each child new group dicts: share those, or a scheduler would scale
        # the stale ones and never reach the children (found by the kill -9 resume test).
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


def build_optimizer(
    groups: list[dict[str, Any]], *, momentum: float, gate_optimizer: str = "sgd"
) -> Optimizer:
    """SGD with momentum over ``groups``; with ``gate_optimizer="adam"`` the group named
    ``gate`` trains with Adam at its own lr instead.

    The policy gradient of Eq. 5 is proportional to the difference between the F and S
    outputs, zero at initialisation and small for a long time; SGD's step follows that
    magnitude, Adam's does not (see the README's gate diagnosis).
    """
    if gate_optimizer not in ("sgd", "adam"):
        raise ValueError(f"gate_optimizer must be 'sgd' or 'adam', got {gate_optimizer!r}")
    gate = [g for g in groups if g.get("name") == "gate"]
    if gate_optimizer == "sgd" or not gate:
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    rest = [g for g in groups if g.get("name") != "gate"]
    adam = torch.optim.Adam(gate, lr=gate[0]["lr"])
    if not rest:
        return adam
    sgd = torch.optim.SGD(rest, lr=rest[0]["lr"], momentum=momentum)
    return HybridOptimizer([sgd, adam])


def build_param_groups(
    prepared: Prepared, *, lr: float, gate_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for ``prepared`` (the method decides), sizes logged.

    Args:
        prepared: A built model.
        lr: Network learning rate.
        gate_lr: Gate learning rate (methods with a trained gate).
        weight_decay: Weight decay where the method applies one.

    Returns:
        ``[{"name", "params", "lr", "weight_decay"}, ...]``, empty groups dropped.
    """
    from ..tuner import log_param_groups

    groups = prepared.method.param_groups(
        prepared, lr=lr, gate_lr=gate_lr, weight_decay=weight_decay
    )
    groups = [g for g in groups if g["params"]]
    if not prepared.method.logs_param_groups:
        log_param_groups(groups)
    return groups


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, milestones: Iterable[int], gamma: float = 0.1
) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply every group's lr by ``gamma`` after each milestone epoch.

    Stepped once per epoch, so with milestones 30, 60, 90 epochs 1-30 run at the initial lr,
    31-60 at 0.1x, 61-90 at 0.01x and 91+ at 0.001x -- every decay, for every group.
    """
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(int(m) for m in milestones), gamma=gamma
    )


def group_lr(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    """Current lr of the group called ``name`` (``None`` if there is none)."""
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return float(g["lr"])
    return None
