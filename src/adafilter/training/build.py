"""Building a run: the device, autocast dtype, CUDA-graph wrapper and the model."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..distributed import DistEnv
from ..errors import AdaFilterError
from ..methods import METHODS, Method, Prepared
from ..utils.seeding import seed_everything
from .config import TrainConfig
from .loop import GraphedForward

logger = logging.getLogger("adafilter")

__all__ = ["amp_dtype", "build_model", "graphed_forward", "resolve_device"]


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a device.

    Under DDP each rank takes ``cuda:LOCAL_RANK`` (modulo the GPUs present, so several ranks
    may share a GPU when the process group's backend allows it, e.g. Gloo).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AdaFilterError(f"device={name} requested but CUDA is not available")
        if env.enabled or name == "cuda":
            index = env.local_rank % torch.cuda.device_count() if env.enabled else 0
            device = torch.device("cuda", index)
        else:
            device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise AdaFilterError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def graphed_forward(
    config: TrainConfig, module: nn.Module, *, device: torch.device, env: DistEnv, method: Method
) -> GraphedForward | None:
    """The CUDA-graph wrapper when ``config.cuda_graphs`` applies; otherwise warn why not."""
    if not config.cuda_graphs:
        return None
    why = None
    if device.type != "cuda":
        why = f"on {device}"
    elif env.enabled:
        why = "under DDP (several processes)"
    elif not method.graph_capturable:
        why = f"for {method.name} (its policies are drawn on the host every step)"
    if why:
        logger.warning("cuda_graphs=True ignored %s; training eagerly", why)
        return None
    return GraphedForward(module)


def compiled_model(config: TrainConfig, model: nn.Module, graphed: Any) -> nn.Module:
    """``torch.compile(model)`` for ``TrainConfig.compile`` (the training forward and backward).

    AdaFilter models take their capturable path while traced, so they compile without graph
    breaks; a method whose policies come from a host generator (``random-policy``) still
    compiles, breaking the graph at each draw.
    """
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if config.compile_backend not in known:
        raise AdaFilterError(
            f"unknown compile_backend={config.compile_backend!r}; use one of {', '.join(known)}"
        )
    if graphed is not None:
        logger.warning("cuda_graphs=True ignored with compile=True")
    if (config.adafilter or {}).get("recompute_pretrained"):
        # the traced gated layers keep S's output (the graph owns what it saves)
        logger.warning("recompute_pretrained=True ignored with compile=True")
    return torch.compile(model, backend=config.compile_backend)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if device.type != "cuda":
        logger.warning("amp=%s ignored on %s (autocast is used on CUDA only)", amp, device)
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def build_model(
    config: TrainConfig, *, num_classes: int, pretrained: bool = True
) -> tuple[Prepared, Any]:
    """Backbone + method -> :class:`Prepared` (seeded by ``config.seed``).

    Args:
        config: The run's configuration.
        num_classes: Classes of the target dataset.
        pretrained: Load ``config.weights``/``config.gate_weights``; ``False`` when a
            checkpoint will overwrite every parameter anyway (``adafilter eval``).

    Returns:
        ``(prepared, backbone_info)``.
    """
    from ..backbones import build_backbone, build_feature_extractor

    method: Method = METHODS.get(config.method)
    seed_everything(config.seed)
    network, info = build_backbone(
        config.backbone,
        num_classes=num_classes,
        weights=config.weights if pretrained else None,
        download=config.download,
    )
    resolution = config.resolution or info.default_resolution
    example = torch.randn(2, 3, resolution, resolution)

    def gate_network() -> tuple[nn.Module, int]:
        return build_feature_extractor(
            config.gate_backbone,
            weights=config.gate_weights if pretrained else None,
            download=config.download,
        )

    options = {
        "l2sp_alpha": config.l2sp_alpha,
        "l2sp_beta": config.l2sp_beta,
        "random_p": config.random_p,
        "adafilter": config.adafilter,
        "gate_backbone": config.gate_backbone,
    }
    prepared = method.build(
        network,
        head_name=info.head_name,
        example_input=example,
        options=options,
        gate_network=gate_network,
    )
    return prepared, info
