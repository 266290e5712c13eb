"""Where a forward's policies come from: the learned gate, random draws or a fixed branch."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ..layers import cpu_gate
from ..layers.capture import is_compiling
from ..layers.cpu_gate import LayerStep
from ..layers.gate import CNNGate, RecurrentGate, binarize
from .config import AdaFilterConfig

__all__ = ["ForwardPolicies", "PolicyOwner"]


class PolicyOwner(Protocol):
    """What a forward's policies read from their model (:class:`~.model.AdaFilterModel`)."""

    config: AdaFilterConfig
    gate: nn.Module
    training: bool
    policy_mode: str
    random_p: float
    layer_out_channels: list[int]
    _generator: torch.Generator


class ForwardPolicies:
    """One forward's policy source: the LSTM state and the decisions made so far.

    Each gated layer asks :meth:`policy` for its ``(B, C_out)`` decisions (through
    :func:`~adafilter.layers.gated_conv.policy_source`), in execution order.
    """

    def __init__(self, owner: PolicyOwner, image: Tensor, *, keep_logits: bool = False) -> None:
        self.owner = owner
        self.state: tuple[Tensor, Tensor] | None = None
        self.decisions: dict[int, Tensor] = {}
        self.logits: dict[int, Tensor] | None = {} if keep_logits else None
        # sum of the learned decisions, with gradient, where the usage cost needs it (two
        # launches per layer otherwise wasted: a GPU step is bound by launches)
        self.f_sum: Tensor | None = None
        self.f_count = 0
        self.cnn_logits: list[Tensor] | None = None
        # the shared LSTM packed once for the kernels' training step (RecurrentGate.packed_cell)
        self._packed: Tensor | None = None
        self._packed_asked = False
        if owner.policy_mode == "learned" and isinstance(owner.gate, CNNGate):
            self.cnn_logits = owner.gate(image)
        # decided once per forward, so a model without the built kernel (or on another
        # device or dtype) pays nothing per layer for the compiled path
        self._compilable = (
            owner.policy_mode == "learned"
            and isinstance(owner.gate, RecurrentGate)
            and not owner.training
            and not keep_logits
            and not torch.is_grad_enabled()
            and image.device.type == "cpu"
            and image.dtype == torch.float32
            and not is_compiling()  # a traced forward never reads the host (nor the kernel)
            and cpu_gate.get() is not None
        )

    def policy(self, index: int, x: Tensor) -> Tensor:
        """Gated layer ``index``'s decisions for its input ``x`` (B, C_in, H, W).

        Returns:
            ``(B, C_out)``: 1/True = the fine-tuned filter F, 0/False = the pretrained S
            (floats; bools for learned policies outside training without gradients).
        """
        owner = self.owner
        b, c = x.shape[0], owner.layer_out_channels[index]
        mode = owner.policy_mode
        if mode == "learned":
            g = self._learned(index, x)
        elif mode == "random":
            draw = torch.rand(b, c, generator=owner._generator)
            g = (draw < owner.random_p).to(device=x.device, dtype=x.dtype)
        else:
            g = x.new_full((b, c), 1.0 if mode == "finetuned" else 0.0)
        self.decisions[index] = g.detach() if g.requires_grad else g  # no graph kept alive
        return g

    def _learned(self, index: int, x: Tensor) -> Tensor:
        """The learned gate's (B, C_out) decisions for layer ``index`` (see :meth:`policy`)."""
        owner, cfg = self.owner, self.owner.config
        # training, no noise, nothing reading the logits: the recurrent gate's step returns the
        # policy itself (Eq. 2, identity straight-through), thresholded in the kernels' launch
        binary = (
            owner.training
            and self.cnn_logits is None
            and self.logits is None
            and cfg.gate_noise == 0
            and cfg.ste == "identity"
        )
        if self.cnn_logits is not None:
            logits = self.cnn_logits[index]
        else:
            gate = owner.gate
            assert isinstance(gate, RecurrentGate)
            if not self._packed_asked:  # once per forward: the layers share the packed LSTM
                self._packed, self._packed_asked = gate.packed_cell(x), True
            logits, self.state = gate.step(index, x, self.state, packed=self._packed, binary=binary)
        if binary:
            g = logits  # (B, C) 0./1.
        else:
            if self.logits is not None:
                self.logits[index] = logits.detach()
            if owner.training and cfg.gate_noise > 0:
                u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
                logits = logits + cfg.gate_noise * (u.log() - (-u).log1p())  # logistic
            if not (torch.is_grad_enabled() or owner.training):
                return logits >= 0  # (B, C) bool: inference needs no 0./1. floats (Eq. 2)
            g = binarize(logits, cfg.ste)
        if g.requires_grad and cfg.policy_cost > 0:  # only the usage cost reads the sum
            self.f_sum = g.sum() if self.f_sum is None else self.f_sum + g.sum()
            self.f_count += g.numel()
        return g

    def compiled_state(self) -> tuple[Tensor, Tensor] | None:
        """Where batch-1 gated layers may run the learned gate as compiled code fused with
        their conv: the LSTM state before the next layer (``EMPTY`` twice before the first);
        ``None`` where the policy comes another way (other modes, the CNN gate, training,
        kept logits)."""
        if not self._compilable:
            return None
        return self.state if self.state is not None else (cpu_gate.EMPTY, cpu_gate.EMPTY)

    def compiled_step(self, index: int, x: Tensor) -> LayerStep | None:
        """The learned gate's compiled CPU step for layer ``index`` (see
        :meth:`compiled_state`), or ``None`` where it is not built or cannot run."""
        if not self._compilable:
            return None
        assert isinstance(self.owner.gate, RecurrentGate)
        return self.owner.gate.compiled_step(index, x)

    def record(self, index: int, decisions: Tensor, state: tuple[Tensor, Tensor]) -> None:
        """Layer ``index`` ran the compiled step: its (B, C_out) bool decisions and the LSTM
        state after it."""
        self.decisions[index] = decisions
        self.state = state
