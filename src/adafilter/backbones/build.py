"""Build a registered backbone with a fresh classifier head (or a feature extractor)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import AdaFilterError
from ..utils.modules import set_submodule
from .registry import BACKBONES, BackboneInfo, BackboneSpec, WeightsArg
from .weights import load_state_dict_file, load_weights


def _check_kept_head(model: nn.Module, spec: BackboneSpec, num_classes: int, origin: str) -> None:
    head = model.get_submodule(spec.head_name)
    n = getattr(head, "out_features", None)
    if n != num_classes:
        raise AdaFilterError(
            f"the classifier of {origin} has {n} outputs but num_classes={num_classes}; pass "
            f"num_classes={n} or drop keep_head"
        )


def build_backbone(
    name: str,
    *,
    num_classes: int,
    weights: WeightsArg = None,
    keep_head: bool = False,
    download: bool = False,
) -> tuple[nn.Module, BackboneInfo]:
    """Build a registered backbone, optionally with weights, and a classifier for ``num_classes``.

    Args:
        name: Registered backbone name (see :func:`backbone_names`).
        num_classes: Number of outputs of the classifier head.
        weights: ``None`` for random init; ``"pretrained"`` for the backbone's own pretrained
            weights (ImageNet, or CIFAR-10 for ``cifar-resnet*``); ``"imagenet"`` for the same on
            ImageNet backbones; otherwise a path to a state_dict file.
        keep_head: Keep the classifier stored with the weights instead of a fresh
            ``nn.Linear``; needs weights whose head has exactly ``num_classes`` outputs.
        download: Fetch missing pretrained weights into the cache directory first
            (``$ADAFILTER_HOME``, see :func:`adafilter.utils.download.cache_dir`).

    Returns:
        The model (in training mode) and its :class:`BackboneInfo`.

    Raises:
        AdaFilterError: Unknown ``name`` or a weights keyword that does not apply.
        CheckpointError: The weights are missing, unreadable, not a state_dict, belong to
            another architecture, or cannot be downloaded.
        ValueError: ``num_classes`` < 1, or ``keep_head`` without weights.
    """
    spec = BACKBONES.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if keep_head and weights is None:
        raise ValueError("keep_head=True needs weights; there is no trained head to keep")
    model = spec.factory(num_classes)
    source = "random init"
    if weights in ("pretrained", "imagenet"):
        if weights == "imagenet" and spec.pretrained_dataset != "imagenet":
            raise AdaFilterError(
                f"backbone {name!r} has no ImageNet weights (its pretrained weights are "
                f"{spec.pretrained_dataset}); use weights 'pretrained' or a file"
            )
        if spec.load_pretrained is not None:  # timm / torchvision: their loader and cache
            model, source = spec.load_pretrained()
            if keep_head:
                _check_kept_head(model, spec, num_classes, source)
        else:
            if download and spec.download is not None:
                spec.download()
            path, source = spec.pretrained()
            _load_file(model, path, spec=spec, origin=f"file {path}", keep_head=keep_head)
    elif isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        source = f"file {path}"
        _load_file(model, path, spec=spec, origin=source, keep_head=keep_head)
    elif weights is not None:
        raise ValueError(
            f"weights must be None, 'pretrained', 'imagenet' or a path, got {weights!r}"
        )
    if not keep_head:
        # A fresh, default-initialised head, whatever the factory or the file provided.
        set_submodule(model, spec.head_name, nn.Linear(spec.feature_dim, num_classes))
    info = BackboneInfo(
        name=spec.name,
        mean=spec.mean,
        std=spec.std,
        default_resolution=spec.default_resolution,
        head_name=spec.head_name,
        feature_dim=spec.feature_dim,
        source=source,
        interpolation=spec.interpolation,
    )
    return model, info


def _load_file(
    model: nn.Module, path: Path, *, spec: BackboneSpec, origin: str, keep_head: bool
) -> None:
    load_weights(model, load_state_dict_file(path), spec=spec, origin=origin, keep_head=keep_head)


def build_feature_extractor(
    name: str = "resnet18", *, weights: WeightsArg = None, download: bool = False
) -> tuple[nn.Module, int]:
    """Build a backbone whose classifier is ``nn.Identity`` (outputs pooled features).

    Args:
        name: Registered backbone name; ``resnet18`` is the default gate network of the
            "cnn-gate" ablation.
        weights: As in :func:`build_backbone`.
        download: As in :func:`build_backbone`.

    Returns:
        The model, mapping ``(N, 3, H, W)`` to ``(N, feature_dim)``, and ``feature_dim``.

    Raises:
        AdaFilterError: As in :func:`build_backbone`.
    """
    model, info = build_backbone(name, num_classes=1, weights=weights, download=download)
    set_submodule(model, info.head_name, nn.Identity())
    return model, info.feature_dim
