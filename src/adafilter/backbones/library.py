"""Library models: ``timm:NAME`` and ``tv:NAME`` backbones, resolved (and cached) on first use.

Input size, mean/std and interpolation come from the model's pretrained configuration;
``"pretrained"`` weights load through the library's own loader and cache.
"""

from __future__ import annotations

import difflib
import functools
import os
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import AdaFilterError, CheckpointError
from ..utils.text import one_line
from .registry import BACKBONE_LIBRARIES, IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from .sources import cached_only, require_reachable

# torchvision builder kwargs: one logits tensor in training too (no auxiliary heads) ...
_TV_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False},
    "inception_v3": {"aux_logits": False},
}
# ... and, for random init only, the initialisation they would otherwise warn about.
_TV_RANDOM_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"init_weights": True},
    "inception_v3": {"init_weights": True},
}


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in values]
    return (v[0], v[0], v[0]) if len(v) == 1 else (v[0], v[1], v[2])


def _unknown_model(library: str, model: str, known: list[str]) -> AdaFilterError:
    close = difflib.get_close_matches(model, known, n=3)
    hint = f"; did you mean {', '.join(f'{library}:{c}' for c in close)}?" if close else ""
    return AdaFilterError(f"unknown {library} model {model!r}{hint} ({len(known)} registered)")


def _meta_build(build: Callable[[], nn.Module]) -> nn.Module:
    # On the meta device: learning the head and configuration allocates and initialises nothing.
    with torch.device("meta"):
        return build()


def _linear_head(model: nn.Module, head: nn.Module | None, what: str) -> tuple[str, int]:
    """``(qualified name, in_features)`` of the classifier ``head`` inside ``model``."""
    name = next((n for n, m in model.named_modules() if m is head and n), None)
    if not isinstance(head, nn.Linear) or name is None:
        raise AdaFilterError(
            f"{what} has no nn.Linear classifier (found {type(head).__name__}); the new head "
            "is a Linear layer, so choose another model"
        )
    return name, head.in_features


def _require_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise AdaFilterError(
            "backbones timm:NAME need timm: pip install 'adafilter[timm]'"
        ) from None
    return timm


def _timm_hub_url(cfg: Mapping[str, Any]) -> str | None:
    """Where timm fetches ``cfg``'s weights: the Hugging Face hub when it can, else the URL."""
    if cfg.get("hf_hub_id"):
        try:
            from huggingface_hub import constants
        except ImportError:
            pass
        else:
            return str(constants.ENDPOINT)
    return cfg.get("url") or None


def _timm_cached(cfg: Mapping[str, Any]) -> Path | None:
    """The weights file timm would load for ``cfg``, if the HF or torch hub cache has it."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            pass
        else:
            repo, _, revision = str(hub_id).partition("@")
            files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
            for filename in files or ["model.safetensors", "pytorch_model.bin"]:
                hit = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(hit, str):
                    return Path(hit)
    url = cfg.get("url")
    if url:
        name = os.path.basename(urllib.parse.urlparse(url).path)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / name
        if cached.is_file():
            return cached
    return None


def _timm_load_pretrained(model: str, cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    timm = _require_timm()
    what = f"timm pretrained weights for {model!r}"
    url = _timm_hub_url(cfg)
    if url is None:
        raise CheckpointError(f"timm model {model!r} has no pretrained weights; pass weights=FILE")
    cached = _timm_cached(cfg)
    overlay = None
    if cached is not None:  # straight from the cache: no hub request, works offline
        overlay = {"file": str(cached), "source": "file"}
    else:
        require_reachable(url, what)
    try:
        net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # hub, file and state_dict errors of any kind
        raise CheckpointError(
            f"cannot load {what} ({one_line(exc, 120)}); pass weights=FILE"
        ) from None
    tag = f".{cfg['tag']}" if cfg.get("tag") else ""
    return net, f"timm {model}{tag} ({cached or cfg.get('hf_hub_id') or url})"


@functools.cache
def _timm_spec(model: str) -> BackboneSpec:
    timm = _require_timm()
    if not model or not timm.is_model(model):
        raise _unknown_model("timm", model, timm.list_models())
    probe = _meta_build(lambda: timm.create_model(model, pretrained=False))
    head_name, dim = _linear_head(probe, probe.get_classifier(), f"timm model {model!r}")
    data = timm.data.resolve_data_config({}, model=probe)
    cfg = dict(probe.pretrained_cfg or {})
    tag = str(cfg.get("tag") or "")
    imagenet = any(k in tag for k in ("in1k", "in12k", "in21k", "in22k")) or not tag
    return BackboneSpec(
        name=f"timm:{model}",
        factory=lambda num_classes: timm.create_model(
            model, pretrained=False, num_classes=num_classes
        ),
        head_name=head_name,
        feature_dim=dim,
        mean=_triple(data["mean"]),
        std=_triple(data["std"]),
        default_resolution=int(data["input_size"][-1]),
        pretrained_dataset="imagenet" if imagenet else tag,
        pretrained=cached_only(lambda: _timm_cached(cfg), f"timm weights for {model!r}"),
        load_pretrained=functools.partial(_timm_load_pretrained, model, cfg),
        interpolation=str(data.get("interpolation") or "bilinear"),
    )


def _tv_weights(model: str) -> torchvision.models.WeightsEnum | None:
    try:
        return torchvision.models.get_model_weights(model).DEFAULT  # type: ignore[attr-defined]
    except (ValueError, KeyError, AttributeError):  # a model without released weights
        return None


def _tv_cache_path(weights: torchvision.models.WeightsEnum) -> Path:
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _tv_load_pretrained(model: str) -> tuple[nn.Module, str]:
    weights = _tv_weights(model)
    if weights is None:
        raise CheckpointError(
            f"torchvision model {model!r} has no pretrained weights; pass weights=FILE"
        )
    cached = _tv_cache_path(weights)
    if not cached.is_file():
        require_reachable(weights.url, f"torchvision weights {weights}")
    try:
        net = torchvision.models.get_model(model, weights=weights, **_TV_KWARGS.get(model, {}))
    except Exception as exc:  # download, hash and state_dict errors of any kind
        raise CheckpointError(
            f"cannot load torchvision weights {weights} ({one_line(exc, 120)}); pass weights=FILE"
        ) from None
    return net, f"torchvision {weights} ({cached})"


def _tv_factory(model: str, num_classes: int) -> nn.Module:
    kwargs = {**_TV_KWARGS.get(model, {}), **_TV_RANDOM_KWARGS.get(model, {})}
    return torchvision.models.get_model(model, weights=None, num_classes=num_classes, **kwargs)


@functools.cache
def _torchvision_spec(model: str) -> BackboneSpec:
    known = torchvision.models.list_models(module=torchvision.models)  # classification only
    if model not in known:
        raise _unknown_model("tv", model, known)
    probe = _meta_build(lambda: _tv_factory(model, 1000))
    heads = [m for m in probe.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    head_name, dim = _linear_head(probe, heads[-1] if heads else None, f"torchvision {model!r}")
    weights = _tv_weights(model)
    mean, std, resolution, interpolation = IMAGENET_MEAN, IMAGENET_STD, 224, "bilinear"
    if weights is not None:  # the preprocessing the weights were evaluated with
        t = weights.transforms()
        mean, std = _triple(t.mean), _triple(t.std)
        resolution, interpolation = int(t.crop_size[0]), str(t.interpolation.value)

    def cached() -> Path | None:
        path = _tv_cache_path(weights) if weights is not None else None
        return path if path is not None and path.is_file() else None

    return BackboneSpec(
        name=f"tv:{model}",
        factory=functools.partial(_tv_factory, model),
        head_name=head_name,
        feature_dim=dim,
        mean=mean,
        std=std,
        default_resolution=resolution,
        pretrained_dataset="imagenet",
        pretrained=cached_only(cached, f"torchvision weights for {model!r}"),
        load_pretrained=functools.partial(_tv_load_pretrained, model),
        interpolation=interpolation,
    )


BACKBONE_LIBRARIES.add("timm", _timm_spec)
BACKBONE_LIBRARIES.add("tv", _torchvision_spec)
