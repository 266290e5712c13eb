"""``choose_bn_stats``: validation picks the running or the precise BN statistics.

Runs use the ``tiny`` fixture (``conftest.py``): the ``tiny-cnn`` backbone on a generated
16 px ImageFolder. Validation's verdict is forced (the wrapped ``evaluate`` reports 100% for
the preferred statistics and 0% for the other), so the test checks the bookkeeping: the
recorded choice, the validation row it reports and the statistics the checkpoint keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import adafilter.training.fit as fit_mod
from adafilter.checkpoint import load_checkpoint
from adafilter.cli import main
from adafilter.errors import AdaFilterError
from adafilter.training.config import TrainConfig
from adafilter.training.precise_bn import bn_statistics
from helpers import read_jsonl, train_args


class _Forced:
    """Wraps ``fit.evaluate``/``fit.recalibrate``: validation prefers ``prefer``; records the
    BN statistics before (running) and after (precise) each precise-BN pass."""

    def __init__(self, prefer: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prefer, self.precise_now = prefer, False
        self.running: list[list[torch.Tensor]] = []
        self.precise: list[list[torch.Tensor]] = []
        real_eval, real_calib = fit_mod.evaluate, fit_mod.recalibrate

        def evaluate(module: Any, loader: Any, **kw: Any) -> dict[str, Any]:
            res = real_eval(module, loader, **kw)
            if not self.precise_now:
                self.running.append(bn_statistics(module))
            preferred = self.precise_now == (self.prefer == "precise")
            return {**res, "acc": 100.0 if preferred else 0.0}

        def recalibrate(module: Any, loader: Any, **kw: Any) -> int:
            n = real_calib(module, loader, **kw)
            self.precise_now = True
            self.precise.append(bn_statistics(module))
            return n

        monkeypatch.setattr(fit_mod, "evaluate", evaluate)
        monkeypatch.setattr(fit_mod, "recalibrate", recalibrate)

    def next_evaluation(self) -> None:
        self.precise_now = False


@pytest.mark.parametrize("prefer", ["running", "precise"])
@pytest.mark.parametrize("method", ["finetune", "adafilter"])
def test_validation_picks_the_statistics_the_checkpoint_keeps(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, prefer: str
) -> None:
    forced = _Forced(prefer, monkeypatch)
    real_split = fit_mod.Trainer._evaluate
    monkeypatch.setattr(
        fit_mod.Trainer,
        "_evaluate",
        lambda self, **kw: (forced.next_evaluation(), real_split(self, **kw))[1],
    )
    out = tmp_path / f"{method}-{prefer}"
    extra = ("--epochs", "2", "--val-fraction", "0.5", "--precise-bn", "2", "--choose-bn-stats")
    assert main(train_args(tiny["data"], out, method, *extra, "--quiet")) == 0

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["bn_stats"]["stats"] for r in rows] == [prefer, prefer]  # epochs 1 and 2
    assert all(r["val_acc"] == 100.0 for r in rows)  # the chosen statistics' validation
    other = "precise" if prefer == "running" else "running"
    assert all(r["bn_stats"][f"val_acc_{other}"] == 0.0 for r in rows)

    # The checkpoint holds the chosen statistics of the last evaluation, and the two differ.
    kept = forced.running[-1] if prefer == "running" else forced.precise[-1]
    dropped = forced.precise[-1] if prefer == "running" else forced.running[-1]
    state = load_checkpoint(out / "checkpoint.pt")["model"]
    stored = [
        torch.stack([state[k], state[k[: -len("running_mean")] + "running_var"]])
        for k in state
        if k.endswith("running_mean")
    ]
    assert len(stored) == len(kept)
    assert all(torch.equal(a, b) for a, b in zip(stored, kept, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(stored, dropped, strict=True))


@pytest.mark.parametrize(
    "kw", [{"val_fraction": 0.2, "precise_bn": 0}, {"val_fraction": 0.0, "precise_bn": 16}]
)
def test_choosing_needs_validation_and_precise_bn(kw: dict[str, Any]) -> None:
    with pytest.raises(AdaFilterError, match="needs precise_bn > 0 and val_fraction > 0"):
        TrainConfig(dataset="d", out="o", choose_bn_stats=True, **kw)


def test_the_default_does_not_choose(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    extra = ("--epochs", "1", "--val-fraction", "0.5", "--quiet")
    assert main(train_args(tiny["data"], out, "finetune", *extra)) == 0
    assert "bn_stats" not in read_jsonl(out / "metrics.jsonl")[0]
