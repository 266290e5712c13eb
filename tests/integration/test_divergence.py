"""Issue 28: default AdaFilter on 32-px inputs (1x1 maps in layer4) trains without diverging,
and a divergence names what diverged first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from adafilter.cli import main
from adafilter.training.divergence import explain_divergence
from helpers import one_line_error, read_jsonl


def _patches(root: Path) -> Path:
    """4 classes x 12 training (x 4 test) 40x40 PNGs: noisy colour patches."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for split, n in (("train", 12), ("test", 4)):
        for k, colour in enumerate(colours):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.normal(0, 60, (40, 40, 3))
                arr = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype("uint8")
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # default workers
@pytest.mark.parametrize("method", ["adafilter", "random-policy"])
def test_resnet18_at_32px_trains_with_precise_bn(tmp_path: Path, method: str) -> None:
    """The issue's command (every other option at its default): it diverged at epoch 2 with
    zero running variances written by precise BN into layer4's 1x1 branches."""
    data = _patches(tmp_path / "data")
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "out"
    argv = ["train", "--method", method, "--dataset", "imagefolder", "--data-root", str(data)]
    argv += ["--backbone", "resnet18", "--weights", str(weights), "--resolution", "32"]
    argv += ["--batch-size", "8", "--seed", "0", "--epochs", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert variances and all(bool((v > 0).all()) for v in variances)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)
    )


def test_divergence_names_a_non_finite_parameter() -> None:
    net = _net()
    x = torch.randn(2, 3, 6, 6)
    net(x)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("inf")
    why = explain_divergence(net, lambda: net(x), float("nan"))
    assert why.startswith("parameter 0.weight is not finite")


def test_divergence_names_bn_statistics() -> None:
    net = _net()
    x = torch.randn(2, 3, 6, 6)
    net(x)
    with torch.no_grad():
        net[1].running_var[2] = 0.0
    why = explain_divergence(net, lambda: net(x), float("nan"))
    assert why.startswith("BN statistics of 1: 1 channel(s) store a variance that is not positive")


def test_divergence_names_the_first_non_finite_output() -> None:
    net = _net()
    x = torch.randn(2, 3, 6, 6)
    net(x)
    x[0, 0, 0, 0] = float("inf")  # the conv is the first module whose output is not finite
    why = explain_divergence(net, lambda: net(x), float("nan"))
    assert why.startswith("the output of 0 (Conv2d) is not finite"), why


def test_divergence_names_the_gate(tmp_path: Path) -> None:
    import adafilter

    model = adafilter.wrap(_net(), example_input=torch.zeros(1, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    # finite parameters, overflowing logits
    model.gate.heads[0].register_forward_hook(lambda m, a, out: out * float("inf"))
    model.train()
    why = explain_divergence(model, lambda: model(x), float("nan"))
    assert why.startswith("the gate's logits (gate.heads.0)"), why


def test_cli_divergence_is_one_line_naming_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _patches(tmp_path / "data")
    argv = ["train", "--method", "finetune", "--dataset", "imagefolder", "--data-root", str(data)]
    argv += ["--backbone", "resnet18", "--resolution", "32", "--batch-size", "8", "--epochs", "1"]
    argv += ["--lr", "1e12", "--workers", "0", "--quiet", "--out", str(tmp_path / "out")]
    line = one_line_error(capsys, argv)
    assert "training diverged at epoch 1 step" in line
    assert "parameter" in line or "output of" in line or "BN statistics" in line, line
