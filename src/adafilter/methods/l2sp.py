"""L2-SP (Li et al. 2018): fine-tuning pulled towards the pretrained weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import Prepared
from .finetune import FineTune


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
