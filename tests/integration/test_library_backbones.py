"""Backbones by library name (``timm:NAME``, ``tv:NAME``): registry, weights, CLI train + eval."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from adafilter.backbones import BACKBONES, build_backbone, library, pretrained_weights_path
from adafilter.cli import main
from adafilter.errors import AdaFilterError
from adafilter.utils import download
from helpers import make_imagefolder, one_line_error, read_jsonl, train_args


def library_model(backbone: str) -> torch.nn.Module:
    """The library's own model (1000 classes) for ``LIBRARY:NAME``; skips without timm."""
    library, _, name = backbone.partition(":")
    if library == "timm":
        timm = pytest.importorskip("timm", reason="timm not installed (adafilter[timm])")
        return timm.create_model(name)
    return torchvision.models.get_model(name, weights=None)


def needs_library(backbone: str) -> None:
    if backbone.startswith("timm:"):
        pytest.importorskip("timm", reason="timm not installed (adafilter[timm])")


def library_train_args(data: Path, out: Path, backbone: str, *extra: str) -> list[str]:
    argv = train_args(data, out, "adafilter", "--epochs", "1", "--quiet", *extra)
    argv[argv.index("tiny-cnn")] = backbone  # --backbone (the gate backbone is unused)
    return argv


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("libdata") / "data")


@pytest.mark.parametrize(
    ("name", "head", "dim", "resolution", "interpolation"),
    [
        ("timm:efficientnet_b0", "classifier", 1280, 224, "bicubic"),
        ("timm:resnet10t", "fc", 512, 176, "bicubic"),
        ("tv:mobilenet_v3_small", "classifier.3", 1024, 224, "bilinear"),
        ("tv:efficientnet_b0", "classifier.1", 1280, 224, "bicubic"),
        ("tv:vit_b_16", "heads.head", 768, 224, "bilinear"),
    ],
)
def test_library_names_resolve_with_their_pretrained_configuration(
    name: str, head: str, dim: int, resolution: int, interpolation: str
) -> None:
    needs_library(name)
    spec = BACKBONES.get(name)
    assert (spec.name, spec.head_name, spec.feature_dim) == (name, head, dim)
    assert spec.default_resolution == resolution and spec.interpolation == interpolation
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert spec.std == pytest.approx((0.229, 0.224, 0.225))
    assert BACKBONES.get(name) is spec  # resolved once


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("timm:efficentnet_b0", "did you mean timm:efficientnet_b0"),
        ("tv:resnet9000", "unknown tv model 'resnet9000'"),
        ("hub:resnet18", "unknown backbone library 'hub'; choose one of: timm, tv"),
        ("tv:squeezenet1_0", "no nn.Linear classifier"),
        ("resnet9000", "or any timm/torchvision model as timm:NAME or tv:NAME"),
    ],
)
def test_bad_library_names_are_one_line_errors(name: str, expected: str) -> None:
    needs_library(name)
    with pytest.raises(AdaFilterError, match=expected) as err:
        BACKBONES.get(name)
    assert "\n" not in str(err.value)


def test_timm_names_without_timm_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(AdaFilterError, match=r"pip install 'adafilter\[timm\]'"):
        BACKBONES.get("timm:resnet14t")


@pytest.mark.parametrize("backbone", ["timm:resnet10t", "tv:resnet18"])
def test_weights_file_from_the_library_state_dict_loads_exactly(
    backbone: str, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    source = library_model(backbone)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model, info = build_backbone(backbone, num_classes=3, weights=tmp_path / "w.pth")
    want = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith(info.head_name + "."):
            assert torch.equal(value, want[key]), key
    assert model.get_submodule(info.head_name).out_features == 3  # a fresh head
    assert info.source == f"file {tmp_path / 'w.pth'}"


@pytest.mark.parametrize("backbone", ["timm:resnet10t", "tv:mobilenet_v3_small"])
def test_pretrained_offline_fails_fast_with_one_line(
    backbone: str,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    needs_library(backbone)

    def no_network(host: str, port: int, timeout: float) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(download, "probe_host", no_network)
    monkeypatch.setattr(library, "_timm_cached", lambda cfg: None)  # nothing cached
    monkeypatch.setattr(library, "_tv_cache_path", lambda w: tmp_path / "not-cached.pth")
    assert pretrained_weights_path(backbone) is None
    start = time.perf_counter()
    argv = library_train_args(data, tmp_path / "o", backbone, "--weights", "pretrained")
    line = one_line_error(capsys, argv)
    assert time.perf_counter() - start < 10
    assert "cannot download" in line and "offline?" in line and "--weights FILE" in line
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("backbone", "layers"), [("timm:efficientnet_b0", 49), ("tv:mobilenet_v3_small", 34)]
)
def test_cli_trains_and_evaluates_a_library_backbone_from_a_weights_file(
    backbone: str, layers: int, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    source = library_model(backbone)
    weights = tmp_path / "weights.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "run"
    argv = library_train_args(data, out, backbone, "--weights", str(weights), "--resolution", "32")
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["backbone"] == backbone
    policy = json.loads((out / "policy.json").read_text())
    assert len(policy["layers"]) == layers  # every gateable conv of the library model
    capsys.readouterr()
    ev = ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data-root", str(data)]
    assert main([*ev, "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    assert res["test_acc"] == read_jsonl(out / "metrics.jsonl")[-1]["test_acc"]


def test_cli_refuses_a_bn_free_library_backbone_with_one_line(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs_library("timm:test_convnext")
    argv = library_train_args(data, tmp_path / "o", "timm:test_convnext", "--resolution", "32")
    line = one_line_error(capsys, argv)
    assert "method 'adafilter': no Conv2d directly followed by a BatchNorm2d" in line
    assert "ConvNeXt" in line
