"""Configuration dataclasses. Validation raises ``ValueError`` naming the bad field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

GateKind = Literal["lstm", "cnn"]
SteKind = Literal["identity", "sigmoid"]
PolicyMode = Literal["learned", "random", "finetuned", "pretrained"]
POLICY_MODES: tuple[str, ...] = ("learned", "random", "finetuned", "pretrained")


@dataclass
class AdaFilterConfig:
    """How :func:`adafilter.wrap` turns a conv-BN network into an AdaFilter model.

    Attributes:
        target_modules: Regular expressions (``re.fullmatch`` on the conv's qualified name);
            only matching convs are gated. ``None`` gates every conv that is directly
            followed by a BatchNorm2d.
        exclude_modules: Regular expressions of conv names never gated (wins over targets).
        gate: ``"lstm"`` -- the paper's recurrent gate (one LSTM cell shared by all layers,
            Eq. 2) -- or ``"cnn"``: a separate CNN sees the image and predicts every layer's
            policy at once (the paper's Table 4 ablation).
        embed_dim: Size of the per-layer embedding fed to the LSTM (the paper's 1x1 conv on
            the globally pooled input). Default 64.
        hidden_dim: LSTM hidden size. Default 64.
        ste: Straight-through estimator. ``"identity"`` passes dE/dG unchanged to the
            sigmoid's input (the paper's Eq. 2); ``"sigmoid"`` multiplies it by the
            sigmoid's derivative.
        gate_bias_init: Initial bias of each policy head. The paper does not give it; 0.0
            (default, also the ``paper`` preset) starts every filter at the threshold, so the
            first policy gradients decide (how it was chosen: the README's gate diagnosis).
        gate_noise: Scale of logistic noise added to the policy logits in training (the
            binary analogue of SpotTune's Gumbel sampling: exploration of both branches);
            0 (default) is the paper's deterministic threshold. Evaluation never adds noise.
        policy_cost: Weight of a training-loss term ``policy_cost * (share of fine-tuned
            filters)`` over every (example, filter) decision of the learned gate: a prior for the
            pretrained filters S, which a filter leaves only where F lowers the loss by more
            (SpotTune/BlockDrop-style usage cost; not in the paper). 0 (default) = the paper.
        gate_input_grad: Let the gate's gradient flow into the backbone activations it pools.
            Off by default (with it on, training diverged in the README's runs). The gate
            itself always trains.
        gated_bn: Two BNs selected by the policy (Eq. 5). ``False`` keeps one standard BN
            after the selection (the paper's Table 3 ablation).
        bn_min_examples: Gated BN uses a branch's batch statistics for channel ``c`` only if
            at least this many examples were routed to that branch for ``c``...
        bn_min_values: ...and those examples hold at least this many values
            (examples x H x W). Otherwise that branch normalises channel ``c`` with its
            running statistics and leaves them unchanged. See ``layers/gated_bn.py``.
        random_p: Probability of choosing the fine-tuned filter in ``random`` policy mode.
        fast_eval: Use the single-conv inference path in eval mode (BN folded into the
            filters, each filter computed once). ``False`` runs the dual path F and S.
        recompute_pretrained: In training, recompute the pretrained filters' output ``S(x)``
            in the backward instead of keeping it for the gated BN: one conv-output activation
            less per gated layer (activation memory ~1.0x plain fine-tuning's instead of
            ~1.5x) for one more conv forward per layer. Same results. Off by default.
        cnn_gate_backbone: Registered backbone of the CNN gate (``gate == "cnn"``): what
            :func:`adafilter.wrap` builds, randomly initialised, when it is given no
            ``gate_network`` (training passes the built ``TrainConfig.gate_backbone`` with its
            weights).
    """

    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    gate: GateKind = "lstm"
    embed_dim: int = 64
    hidden_dim: int = 64
    ste: SteKind = "identity"
    gate_bias_init: float = 0.0
    gate_noise: float = 0.0
    policy_cost: float = 0.0
    gate_input_grad: bool = False
    gated_bn: bool = True
    bn_min_examples: int = 2
    bn_min_values: int = 16
    random_p: float = 0.5
    fast_eval: bool = True
    recompute_pretrained: bool = False
    cnn_gate_backbone: str = "resnet18"

    def __post_init__(self) -> None:
        if self.gate not in ("lstm", "cnn"):
            raise ValueError(f"gate must be 'lstm' or 'cnn', got {self.gate!r}")
        if self.ste not in ("identity", "sigmoid"):
            raise ValueError(f"ste must be 'identity' or 'sigmoid', got {self.ste!r}")
        for name in ("embed_dim", "hidden_dim", "bn_min_examples", "bn_min_values"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.policy_cost < 0:
            raise ValueError(f"policy_cost must be >= 0, got {self.policy_cost!r}")
        if self.gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {self.gate_noise!r}")
        if not 0.0 <= self.random_p <= 1.0:
            raise ValueError(f"random_p must be in [0, 1], got {self.random_p!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
