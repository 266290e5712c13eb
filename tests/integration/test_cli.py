"""CLI: one-line errors for bad input, data check, report, ``python -m adafilter``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adafilter.cli import SUBCOMMANDS, main
from helpers import one_line_error, train_args


@pytest.fixture(scope="module")
def trained(tiny: dict) -> dict[str, object]:
    """``tiny`` plus ``"run"``: a one-epoch AdaFilter run on it."""
    run = tiny["base"] / "run"
    assert main(train_args(tiny["data"], run, "adafilter", "--epochs", "1", "--quiet")) == 0
    return {**tiny, "run": run}


def test_unknown_method(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, train_args(trained["data"], tmp_path / "o", "nope"))
    assert "unknown method 'nope'" in line and "adafilter" in line and "l2sp" in line


def test_unknown_backbone(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_args(trained["data"], tmp_path / "o")
    argv[argv.index("tiny-cnn")] = "resnet9000"
    assert "unknown backbone 'resnet9000'" in one_line_error(capsys, argv)


def test_unknown_dataset(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = train_args(trained["data"], tmp_path / "o")
    argv[argv.index("imagefolder")] = "mnist-9000"
    assert "unknown dataset 'mnist-9000'" in one_line_error(capsys, argv)


def test_unknown_augmentation(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_args(trained["data"], tmp_path / "o") + ["--augment", "mixup"]
    line = one_line_error(capsys, argv)
    assert "augment must be one of resized-crop, random-crop, pad-crop, none, got 'mixup'" in line
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_missing_data_root(
    tmp_path: Path, trained: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    line = one_line_error(capsys, train_args(missing, tmp_path / "o"))
    assert str(missing) in line
    assert not (tmp_path / "o").exists()  # nothing written for bad input


def test_missing_required_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--dataset" in one_line_error(capsys, ["train", "--out", str(tmp_path / "o")])


def test_resume_with_checkpoint_from_another_model(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_args(trained["data"], trained["run"], "standard-bn", "--epochs", "2", "--resume")
    line = one_line_error(capsys, argv)
    assert "another run" in line and "method" in line and "standard-bn" in line


def test_eval_checkpoint_of_another_model(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = torch.load(trained["run"] / "checkpoint.pt", weights_only=True)
    ckpt["config"]["method"] = "finetune"  # its weights are an AdaFilter model's
    torch.save(ckpt, tmp_path / "other.pt")
    line = one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path / "other.pt")])
    assert "does not match this model" in line


def test_weights_file_of_another_model(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"features.0.weight": torch.zeros(2, 2)}, tmp_path / "w.pt")
    argv = train_args(
        trained["data"], tmp_path / "o", "finetune", "--weights", str(tmp_path / "w.pt")
    )
    assert "w.pt" in one_line_error(capsys, argv)


@pytest.mark.parametrize("content", ["state_dict", "pickled_code"])
def test_eval_rejects_non_checkpoints(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.pt"
    if content == "state_dict":
        torch.save({"w": torch.zeros(1)}, path)
        expected = "not an adafilter training checkpoint"
    else:
        torch.save({"format": "adafilter-checkpoint", "f": Path("x")}, path)
        expected = "weights_only"
    assert expected in one_line_error(capsys, ["eval", "--checkpoint", str(path)])


def test_output_directory_holding_a_run_needs_resume(
    trained: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_line_error(capsys, train_args(trained["data"], trained["run"], "adafilter"))
    assert "--resume" in line


def test_data_check_prints_one_json_line(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert (
        main(["data", "check", "--dataset", "imagefolder", "--data-root", str(trained["data"])])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert json.loads(out[0])["dataset"] == "imagefolder"


def test_report_subcommand(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["report", str(trained["run"]), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    assert "report_md" in json.loads(capsys.readouterr().out)


def test_subcommands_registered() -> None:
    assert {"train", "eval", "data", "report"} <= set(SUBCOMMANDS)


def test_python_m_adafilter_bad_input_has_no_traceback(trained: dict, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "adafilter", "--help"],
        env=trained["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "train" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "adafilter", *train_args(trained["data"], tmp_path / "o", "nope")],
        env=trained["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        line for line in bad.stderr.strip().splitlines() if line.startswith("adafilter: error:")
    ]
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
