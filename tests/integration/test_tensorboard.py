"""``adafilter train --tensorboard``: the event files hold every epoch's scalars."""

from __future__ import annotations

from pathlib import Path

import pytest

from adafilter.cli import main
from helpers import read_jsonl, train_args

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard extra is not installed",
)


def _scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(path))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_event_files_hold_losses_lrs_policy_shares_and_changes(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = train_args(tiny["data"], out, "adafilter", "--epochs", "3", "--quiet", "--tensorboard")
    assert main(argv) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    got = _scalars(out / "tensorboard")
    assert [s for s, _ in got["loss/train"]] == [r["epoch"] for r in rows]
    assert [v for _, v in got["loss/train"]] == pytest.approx([r["train_loss"] for r in rows])
    assert [s for s, _ in got["accuracy/test"]] == [1, 2, 3]
    assert got["lr/network"][0][1] == pytest.approx(rows[0]["lr"])
    assert got["lr/gate"][0][1] == pytest.approx(rows[0]["gate_lr"])
    shares = [t for t in got if t.startswith("f_share/")]
    assert len(shares) == len(rows[-1]["gate"]["fraction_finetuned"]) > 0
    first = rows[-1]["gate"]["fraction_finetuned"][0]
    assert got[shares[0]][-1][0] == 3 and got[shares[0]][-1][1] == pytest.approx(first)
    assert [s for s, _ in got["gate/decision_change_rate"]] == [2, 3]  # from the second epoch


def test_without_the_flag_nothing_is_written(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(tiny["data"], out, "finetune", "--epochs", "1", "--quiet")) == 0
    assert not (out / "tensorboard").exists()
