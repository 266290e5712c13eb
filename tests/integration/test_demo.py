"""`adafilter demo`: trains each method, writes the report, resumes, explains a Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adafilter.cli import main


def _demo_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "demo",
        "--out",
        str(out),
        "--backbone",
        "tiny-cnn",
        "--weights",
        "none",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(data),
        "--epochs",
        "2",
        "--milestones",
        "1",
        "--resolution",
        "16",
        "--batch-size",
        "4",
        "--subset-per-class",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--pretrain",
        "none",
        *extra,
    ]


def test_demo_trains_both_methods_and_reports(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(_demo_args(tiny["data"], out)) == 0
    printed = capsys.readouterr().out
    assert "| finetune |" in printed and "| adafilter |" in printed
    assert "report.html" in printed
    for method in ("finetune", "adafilter"):
        summary = json.loads((out / "runs" / method / "summary.json").read_text())
        assert summary["completed"] and summary["epochs"] == 2
    assert (out / "runs" / "adafilter" / "policy.json").exists()
    for name in ("report.md", "report.html", "accuracy.png", "policy.png"):
        assert (out / "report" / name).stat().st_size > 0
    # a second call reuses the finished runs instead of training again
    assert main(_demo_args(tiny["data"], out)) == 0
    assert "already complete" in capsys.readouterr().out


def test_demo_interrupted_says_what_is_done_and_resumes(
    tiny,
    tmp_path,
    capsys,
    monkeypatch,
):
    import adafilter.training.fit as engine

    real_fit = engine.fit
    calls = {"n": 0}

    def flaky_fit(config):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C during the second method
            raise KeyboardInterrupt
        return real_fit(config)

    monkeypatch.setattr(engine, "fit", flaky_fit)
    out = tmp_path / "demo"
    assert main(_demo_args(tiny["data"], out)) == 130
    err = capsys.readouterr().err
    assert "Complete: finetune" in err and "not complete: adafilter" in err
    assert str(out) in err and not (out / "report").exists()
    monkeypatch.setattr(engine, "fit", real_fit)
    assert main(_demo_args(tiny["data"], out)) == 0
    assert "already complete" in capsys.readouterr().out
    assert json.loads((out / "runs" / "adafilter" / "summary.json").read_text())["completed"]


def test_demo_pretrains_then_starts_every_method_from_those_weights(tiny, tmp_path, capsys):
    """The source stage trains the backbone; both methods start from its export (S = it)."""
    import torch

    out = tmp_path / "demo"
    args = _demo_args(tiny["data"], out, "--epochs", "1", "--milestones", "1")
    args[args.index("--pretrain") + 1] = "imagefolder"
    args += ["--pretrain-root", str(tiny["data"]), "--pretrain-epochs", "1"]
    assert main(args) == 0
    assert "[demo] pretraining tiny-cnn on imagefolder" in capsys.readouterr().out
    exported = out / "pretrain" / "pretrained.pt"
    pretrained = torch.load(exported, weights_only=True)["model"]
    for method in ("finetune", "adafilter"):
        config = json.loads((out / "runs" / method / "config.json").read_text())
        assert config["weights"] == str(exported)
    # AdaFilter's frozen S filters are the pretrained filters, bit for bit.
    ada = torch.load(out / "runs" / "adafilter" / "checkpoint.pt", weights_only=True)["model"]
    convs = [v for k, v in pretrained.items() if v.dim() == 4]
    assert convs and all(any(torch.equal(c, v) for v in ada.values()) for c in convs)
    assert main(args) == 0
    assert "pretrain: already complete" in capsys.readouterr().out


def test_every_demo_field_but_the_learning_rates_is_a_flag():
    """The flags come from DemoConfig's fields: a new field gets a flag or fails here."""
    from dataclasses import fields

    from adafilter.cli import build_parser
    from adafilter.demo import DemoConfig

    args = build_parser().parse_args(["demo"])
    flagged = {f.name for f in fields(DemoConfig) if hasattr(args, f.name)}
    assert {f.name for f in fields(DemoConfig)} - flagged == {"lr", "gate_lr"}
    assert DemoConfig(**{n: getattr(args, n) for n in flagged}) == DemoConfig()


def test_demo_help_lists_the_knobs(capsys):
    with pytest.raises(SystemExit):
        from adafilter.cli import build_parser

        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--backbone", "--dataset", "--methods", "--epochs", "--weights", "--pretrain"):
        assert flag in text


@pytest.mark.slow
def test_demo_with_resnet50_and_a_weights_file(tiny, tmp_path, capsys):
    """A user with their own ImageNet ResNet-50 state_dict runs the demo with --weights FILE."""
    import torch
    import torchvision

    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    out = tmp_path / "demo"
    args = _demo_args(tiny["data"], out, "--epochs", "1", "--milestones", "1")
    args[args.index("tiny-cnn")] = "resnet50"
    args[args.index("none")] = str(weights)
    assert main(args) == 0
    summary = json.loads((out / "runs" / "adafilter" / "summary.json").read_text())
    assert summary["backbone"] == "resnet50" and summary["completed"]
