"""Helpers shared by the test modules (fixtures live in ``conftest.py``).

* ``tiny-cnn``: a ~2.5k-parameter conv-BN backbone registered by a plugin module, so
  subprocesses can load it via ``ADAFILTER_PLUGINS``;
* a generated 16 px ImageFolder tree, the ``adafilter train`` argv for both;
* random pretrained-like BN modules, the CLI's one-line-error check;
* where the project's ``../shared`` folder (real data and weights) is, when it is there.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import json
import os
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# Real data and weights beside the repository (tests that need them skip when absent).
SHARED = Path(os.environ.get("ADAFILTER_TEST_SHARED", REPO.parent / "shared"))
SHARED_OMNIGLOT = SHARED / "data" / "omniglot"
SHARED_CIFAR_WEIGHTS = SHARED / "weights" / "cifar10-resnet"
SHARED_IMAGEWOOF_ZIP = SHARED / "data" / "imagewoof-mini" / "imagewoof-mini.zip"


def conv_bn_relu6(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU6: the unit of the tiny EfficientNet/MobileNet-style test nets."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


PLUGIN_NAME = "adafilter_tiny_plugin"
PLUGIN_SRC = '''
from torch import nn

from adafilter.backbones import BACKBONES, BackboneSpec


class TinyCNN(nn.Module):
    """conv-bn-relu x3 + pool + linear head "fc" (about 2.5k parameters)."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


def _no_weights():
    raise RuntimeError("tiny-cnn has no pretrained weights")


def register():
    if "tiny-cnn" not in BACKBONES:
        BACKBONES.add("tiny-cnn", BackboneSpec(
            name="tiny-cnn", factory=TinyCNN, head_name="fc", feature_dim=16,
            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), default_resolution=16,
            pretrained_dataset="imagenet", pretrained=_no_weights,
        ))


register()
'''


def make_imagefolder(root: Path, *, train: int = 4, val: int = 2, size: int = 16) -> Path:
    """root/{train,val}/{cat,dog}/*.png; "dog" images have a bright left half."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((size, size, 3)) * 255).astype("uint8")
                if c == "dog":
                    arr[:, : size // 2] = 255
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def install_plugin(directory: Path) -> dict[str, str]:
    """Write and import the tiny-cnn plugin; return the env a subprocess needs for it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{PLUGIN_NAME}.py").write_text(PLUGIN_SRC)
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    importlib.import_module(PLUGIN_NAME).register()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [
            str(directory),
            str(REPO / "src"),
            env.get("PYTHONPATH", ""),
        ]
    )
    env["ADAFILTER_PLUGINS"] = PLUGIN_NAME
    env["OMP_NUM_THREADS"] = "1"
    return env


def uninstall_plugin() -> None:
    """Unregister tiny-cnn so other test modules see only the real backbones."""
    from adafilter.backbones import BACKBONES

    BACKBONES._items.pop("tiny-cnn", None)


def train_args(data: Path, out: Path, method: str = "adafilter", *extra: str) -> list[str]:
    return [
        "train",
        "--method",
        method,
        "--dataset",
        "imagefolder",
        "--data-root",
        str(data),
        "--backbone",
        "tiny-cnn",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--gate-backbone",
        "tiny-cnn",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI on ``argv``; assert exit 2 with exactly one ``adafilter: error:`` line."""
    from adafilter.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adafilter: error: ") and "Traceback" not in err
    return lines[0]


def random_bns(c: int, seed: int = 0) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    """Two BNs with pretrained-like statistics that differ (an F and an S branch)."""
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
        bn.bias.copy_(0.2 * torch.randn(c, generator=gen))
        bn.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
        bn.running_var.copy_(1 + torch.rand(c, generator=gen))
    bn_s = copy.deepcopy(bn)
    with torch.no_grad():
        bn_s.weight.mul_(0.7)
        bn_s.running_mean.add_(0.3)
    return bn, bn_s


def perturb_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affine, as a pretrained network has."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model


def mix_policies(model: nn.Module, seed: int = 0) -> nn.Module:
    """An :class:`~adafilter.AdaFilterModel` whose F differs from S and whose gate mixes fixed
    and input-dependent decisions (consecutive examples change some of them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.gated_layers().values():
            w = layer.conv_f.weight
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=gen))
            bn_f = layer.bn_f if layer.gated_bn else layer.bn
            bn_f.bias.add_(0.2 * torch.randn(w.shape[0], generator=gen))
        for head in model.gate.heads:
            r = torch.rand(head.bias.numel(), generator=gen)
            head.bias.copy_(torch.where(r < 0.4, 20.0, -20.0))
            head.bias[r > 0.7] = 0.0
            head.weight.mul_(5.0)
    return model


# ---- a local HTTP server (downloads are tested on 127.0.0.1; there is no internet) ----------


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    truncate_once: set[str] = field(default_factory=set)  # first GET sends half, then drops
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.state.requests.append((name, rng))
        data = self.state.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not self.state.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.state.truncate_once:
            self.state.truncate_once.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True  # simulate a dropped transfer
            return
        self.wfile.write(body)


# ------------------------------------------------ Fashion-MNIST IDX files (miniature)


def _idx(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(
        struct.pack(">I", s) for s in arr.shape
    )
    return header + arr.astype(np.uint8).tobytes()


def make_fashion(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        for stem, arr in (
            (f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28))),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            data = _idx(np.asarray(arr))
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return folder


def run_in_threads(work: Callable[[int], None], n: int = 4) -> None:
    """Run ``work(k)`` for k in 0..n-1 in ``n`` threads at once and wait for all of them."""
    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
