"""AdaFilterModel: finds conv->BN pairs, swaps in gated layers, owns the gate and the policies."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import POLICY_MODES, AdaFilterConfig
from .layers.gate import CNNGate, RecurrentGate, binarize
from .layers.gated_conv import GatedConv2dBN, policy_source

logger = logging.getLogger("adafilter")

__all__ = ["AdaFilterModel", "conv_execution_order", "find_conv_bn_pairs", "wrap"]


def conv_execution_order(
    model: nn.Module, example_input: Tensor, *, skip_prefix: str | None = None
) -> list[tuple[str, str | None]]:
    """Every ``Conv2d`` in the order it first runs, with the BN that directly follows it.

    Runs ``model`` once on ``example_input`` (eval mode, no gradients, so BN running statistics
    are untouched) with hooks: a BN "directly follows" a conv when its input is the very tensor
    the conv returned (``bn(conv(x))``). A conv or BN that runs more than once in a forward
    (shared weights) gets no follower.

    Args:
        model: Any network built from ``nn.Module``s.
        example_input: A batch the model accepts, e.g. ``torch.zeros(1, 3, 64, 64)``.
        skip_prefix: Module name whose convs are ignored (e.g. a conv classifier head).

    Returns:
        ``[(conv_name, bn_name or None), ...]`` in execution order.
    """
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    follower: dict[str, str] = {}
    outputs: dict[int, tuple[str, Tensor]] = {}
    calls: dict[str, int] = {}

    def skipped(name: str) -> bool:
        return bool(skip_prefix) and (name == skip_prefix or name.startswith(f"{skip_prefix}."))

    def conv_hook(mod: nn.Module, args: Any, out: Tensor) -> None:
        name = names[mod]
        calls[name] = calls.get(name, 0) + 1
        if skipped(name):
            return
        if name not in order:
            order.append(name)
        outputs[id(out)] = (name, out)  # keep `out` alive so its id stays unique

    def bn_hook(mod: nn.Module, args: Any) -> None:
        calls[names[mod]] = calls.get(names[mod], 0) + 1
        hit = outputs.get(id(args[0]))
        if hit is not None and hit[1] is args[0]:
            follower.setdefault(hit[0], names[mod])

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            hooks.append(mod.register_forward_pre_hook(bn_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    once = {n for n, k in calls.items() if k == 1}
    return [(c, follower[c] if c in once and follower.get(c) in once else None) for c in order]


def find_conv_bn_pairs(model: nn.Module, example_input: Tensor) -> list[tuple[str, str]]:
    """Conv2d layers whose output goes straight into a BatchNorm2d, in execution order.

    Only plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` (not subclasses, whose forward may differ)
    are paired; see :func:`conv_execution_order` for how pairs are traced.
    """
    return [
        (c, b)
        for c, b in conv_execution_order(model, example_input)
        if b is not None
        and type(model.get_submodule(c)) is nn.Conv2d
        and type(model.get_submodule(b)) is nn.BatchNorm2d
    ]


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root``'s submodule ``name`` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is not None and any(re.fullmatch(p, name) for p in patterns)


class _Runtime:
    """Per-forward policy state: the LSTM state, the decisions made so far."""

    def __init__(self, owner: AdaFilterModel, image: Tensor) -> None:
        self.owner = owner
        self.state: tuple[Tensor, Tensor] | None = None
        self.decisions: dict[int, Tensor] = {}
        self.cnn_logits: list[Tensor] | None = None
        if owner.policy_mode == "learned" and isinstance(owner.gate, CNNGate):
            self.cnn_logits = owner.gate(image)

    def policy(self, index: int, x: Tensor) -> Tensor:
        owner = self.owner
        b, c = x.shape[0], owner.layer_out_channels[index]
        mode = owner.policy_mode
        if mode == "learned":
            if self.cnn_logits is not None:
                logits = self.cnn_logits[index]
            else:
                assert isinstance(owner.gate, RecurrentGate)
                logits, self.state = owner.gate.step(index, x, self.state)
            if torch.is_grad_enabled() or owner.training:
                g = binarize(logits, owner.config.ste)
            else:
                g = logits >= 0  # (B, C) bool: inference needs no 0./1. floats (Eq. 2)
        elif mode == "random":
            draw = torch.rand(b, c, generator=owner._generator)
            g = (draw < owner.random_p).to(device=x.device, dtype=x.dtype)
        else:
            g = x.new_full((b, c), 1.0 if mode == "finetuned" else 0.0)
        self.decisions[index] = g.detach() if g.requires_grad else g  # no graph kept alive
        return g


class AdaFilterModel(nn.Module):
    """A conv-BN network whose gated convs pick each filter from F or S per example.

    Build it with :func:`wrap`. ``policies`` holds the last forward's decisions
    ``{conv name: bool (B, C_out)}`` (True = fine-tuned filter).

    Args:
        model: The pretrained network; modified in place.
        config: What to gate and how.
        pairs: ``(conv_name, bn_name)`` to gate, in execution order.
        gate_network: For ``config.gate == "cnn"``: ``(features, feature_dim)``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdaFilterConfig,
        pairs: Sequence[tuple[str, str]],
        *,
        gate_network: tuple[nn.Module, int] | None = None,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("no Conv2d directly followed by a BatchNorm2d was found to gate")
        self.config = config
        self.model = model
        self.gated_layer_names: list[str] = []
        in_ch: list[int] = []
        for index, (conv_name, bn_name) in enumerate(pairs):
            conv = model.get_submodule(conv_name)
            bn = model.get_submodule(bn_name)
            layer = GatedConv2dBN(
                conv,
                bn,
                index=index,
                gated_bn=config.gated_bn,
                bn_min_examples=config.bn_min_examples,
                bn_min_values=config.bn_min_values,
                fast_eval=config.fast_eval,
            )
            _replace_module(model, conv_name, layer)
            _replace_module(model, bn_name, nn.Identity())  # the BN now lives in `layer`
            self.gated_layer_names.append(conv_name)
            in_ch.append(conv.in_channels)
        self.layer_out_channels: list[int] = [
            model.get_submodule(n).out_channels for n in self.gated_layer_names
        ]
        self.gate: nn.Module
        if config.gate == "lstm":
            self.gate = RecurrentGate(
                in_ch,
                self.layer_out_channels,
                embed_dim=config.embed_dim,
                hidden_dim=config.hidden_dim,
                bias_init=config.gate_bias_init,
                detach_input=not config.gate_input_grad,
            )
        else:
            features, dim = gate_network if gate_network is not None else _default_cnn_gate()
            self.gate = CNNGate(
                features, dim, self.layer_out_channels, bias_init=config.gate_bias_init
            )
        # A model wrapped on the GPU gets its gate there too (the copies F already are).
        first = next(model.parameters(), None)
        if first is not None:
            self.gate.to(first.device)
        self.policy_mode = "learned"
        self.random_p = config.random_p
        self._generator = torch.Generator().manual_seed(0)
        self._decisions: dict[int, Tensor] = {}
        mark_trainable(self)

    def gated_layers(self) -> dict[str, GatedConv2dBN]:
        """The gated layers by conv name, in execution order."""
        return {n: self.model.get_submodule(n) for n in self.gated_layer_names}  # type: ignore[misc]

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
        runtime = _Runtime(self, x)
        with policy_source(runtime):
            out = self.model(x)  # (B, num_classes)
        self._decisions = runtime.decisions
        return out

    @property
    def policies(self) -> dict[str, Tensor]:
        """The last forward's decisions: ``{conv name: bool (B, C_out)}``, True = F."""
        return {self.gated_layer_names[i]: g > 0.5 for i, g in self._decisions.items()}

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


def _default_cnn_gate() -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def wrap(
    model: nn.Module,
    config: AdaFilterConfig | None = None,
    *,
    example_input: Tensor | None = None,
    gate_network: tuple[nn.Module, int] | None = None,
) -> AdaFilterModel:
    """Turn every conv directly followed by a BN into an AdaFilter layer.

    Args:
        model: A pretrained conv-BN network (modified in place and owned by the result).
        config: Options; defaults to :class:`AdaFilterConfig`'s defaults (the paper's method).
        example_input: A batch the model accepts, used once to trace conv->BN pairs;
            default ``torch.zeros(1, 3, 64, 64)``.
        gate_network: ``(features, feature_dim)`` for ``config.gate == "cnn"``; default a
            randomly initialised torchvision ResNet-18 trunk.

    Returns:
        The wrapped model. At initialisation its outputs equal the original model's in every
        policy mode (F = S and both BNs are copies of the pretrained one).
    """
    config = config or AdaFilterConfig()
    if example_input is None:
        try:
            p = next(model.parameters())
            example_input = torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype)
        except StopIteration:
            example_input = torch.zeros(1, 3, 64, 64)
    pairs = [
        (c, b)
        for c, b in find_conv_bn_pairs(model, example_input)
        if (config.target_modules is None or _matches(c, config.target_modules))
        and not _matches(c, config.exclude_modules)
    ]
    return AdaFilterModel(model, config, pairs, gate_network=gate_network)
