"""Gate telemetry: is the learned policy moving, and does it differ between examples?

Cheap enough to stay on: gradient norms are read after each backward (one reduction per
parameter), everything else comes from one forward of a fixed probe batch per epoch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GateTelemetry", "policy_diversity"]


def policy_diversity(decisions: dict[str, Tensor]) -> dict[str, float]:
    """How much the per-example policies differ.

    Args:
        decisions: ``{layer: bool (B, C)}``, True = fine-tuned filter.

    Returns:
        ``fraction_std``: the std over examples of each example's fine-tuned fraction (all
        layers' filters pooled); ``hamming``: the mean over pairs of examples of the share of
        filters on which their policies differ (0 = every example has the same policy).
    """
    if not decisions:
        return {"fraction_std": 0.0, "hamming": 0.0}
    d = torch.cat([v.float() for v in decisions.values()], 1)  # (B, total filters)
    b = d.shape[0]
    frac = d.mean(1)
    if b < 2:
        return {"fraction_std": 0.0, "hamming": 0.0}
    # mean over pairs of |d_i - d_j| per filter = 2 p (1 - p) * B / (B - 1) per filter
    p = d.mean(0)
    hamming = float((2 * p * (1 - p)).mean() * b / (b - 1))
    return {"fraction_std": float(frac.std(correction=0)), "hamming": hamming}


class GateTelemetry:
    """Per-epoch gate statistics for ``metrics.jsonl``.

    Args:
        model: An ``AdaFilterModel`` with a learned gate.
        probe: A fixed batch of images (B, 3, H, W) on the model's device, e.g. training
            images through the evaluation transform.
    """

    def __init__(self, model: nn.Module, probe: Tensor) -> None:
        self.model = model
        self.probe = probe
        gate_ids = {id(p) for p in model.gate.parameters()}
        self._gate = [p for p in model.gate.parameters() if p.requires_grad]
        self._net = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        self._sums = torch.zeros(2, dtype=torch.float64)
        self._steps = 0
        self._previous: dict[str, Tensor] | None = None

    @torch.no_grad()
    def after_backward(self) -> None:
        """Accumulate the gate's and the network's gradient norms of this step."""
        norms = []
        for params in (self._gate, self._net):
            grads = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
            norms.append(torch.stack(grads).sum() if grads else torch.zeros(()))
        self._sums += torch.stack(norms).double().cpu().sqrt()
        self._steps += 1

    def state_dict(self) -> dict[str, Any]:
        """The accumulators and the last epoch's decisions (for checkpoints)."""
        return {"sums": self._sums.clone(), "steps": self._steps, "previous": self._previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self._sums.copy_(state["sums"])
        self._steps = int(state["steps"])
        previous = state["previous"]
        if previous is not None:
            previous = {k: v.to(self.probe.device) for k, v in previous.items()}
        self._previous = previous

    @torch.no_grad()
    def epoch_end(self) -> dict[str, Any]:
        """The epoch's telemetry; resets the gradient accumulators."""
        steps = max(self._steps, 1)
        gate_norm, net_norm = (float(v) / steps for v in self._sums)
        self._sums.zero_()
        self._steps = 0
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model.policy_logits(self.probe)  # {layer: (B, C)}
        finally:
            self.model.train(was_training)
        decisions = {k: v >= 0 for k, v in logits.items()}
        changed = None
        if self._previous is not None:
            flips = sum(int((decisions[k] != self._previous[k]).sum()) for k in decisions)
            changed = flips / max(sum(v.numel() for v in decisions.values()), 1)
        self._previous = decisions
        return {
            "gate_grad_norm": gate_norm,
            "net_grad_norm": net_norm,
            "grad_norm_ratio": gate_norm / net_norm if net_norm > 0 else math.nan,
            "fraction_finetuned": [float(v.float().mean()) for v in decisions.values()],
            "logit_mean": [float(v.mean()) for v in logits.values()],
            "logit_std": [float(v.std(correction=0)) for v in logits.values()],
            "changed": changed,
            **policy_diversity(decisions),
        }
