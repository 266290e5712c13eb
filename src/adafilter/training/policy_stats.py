"""Per-class policy statistics of an evaluation: the share of fine-tuned (F) filters per layer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import DistEnv, all_reduce_sum

__all__ = ["PolicyStats"]


class PolicyStats:
    """Accumulates, per class, how many filters of each gated layer chose F.

    Built by the method (:meth:`adafilter.methods.Method.policy_stats`), so the evaluation loop
    never needs to know what a gated model looks like inside.

    Args:
        layers: Gated layer names, in execution order.
        out_channels: Filters per gated layer.
        read: Returns the last forward's policies ``{layer: bool (B, C_out)}``.
        num_classes: Number of classes.
        device: Where the sums live.
    """

    def __init__(
        self,
        layers: Sequence[str],
        out_channels: Sequence[int],
        read: Callable[[], Mapping[str, Tensor]],
        *,
        num_classes: int,
        device: torch.device,
    ) -> None:
        self.layers = list(layers)
        self.out_channels = [int(c) for c in out_channels]
        self.read = read
        self.chosen = torch.zeros(num_classes, len(layers), dtype=torch.float64, device=device)
        self.per_class = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def update(self, labels: Tensor) -> None:
        """Add the last forward's policies (its examples labelled ``labels``)."""
        pol = self.read()
        counts = torch.stack([pol[name].sum(1) for name in self.layers], 1).double()  # (B, L)
        self.chosen.index_add_(0, labels, counts)
        self.per_class += torch.bincount(labels, minlength=self.per_class.numel()).double()

    def result(self, env: DistEnv) -> dict[str, Any]:
        """``{"layers", "out_channels", "overall", "per_class_fraction", "per_class_count"}``,
        summed over ranks."""
        all_reduce_sum(self.chosen, env)
        all_reduce_sum(self.per_class, env)
        channels = torch.tensor(self.out_channels, dtype=torch.float64, device=self.chosen.device)
        overall = self.chosen.sum(0) / (self.per_class.sum().clamp(min=1) * channels)
        frac = self.chosen / (self.per_class[:, None].clamp(min=1) * channels[None, :])
        return {
            "layers": self.layers,
            "out_channels": self.out_channels,
            "overall": overall.tolist(),
            "per_class_fraction": [
                row if n > 0 else None
                for row, n in zip(frac.tolist(), self.per_class.tolist(), strict=True)
            ],
            "per_class_count": [int(n) for n in self.per_class.tolist()],
        }
