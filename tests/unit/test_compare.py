"""``benchmarks/compare.py``: seed-by-seed paired differences between two study groups, and the
"inside the seeds' spread" verdict the studies report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402  (benchmarks/ is not a package)


def _study(root: Path, name: str, groups: dict[str, dict[int, tuple[float, float]]]) -> None:
    body = {
        g: {
            "seeds": [
                {"seed": s, "final_test_acc": t, "final_val_acc": v} for s, (t, v) in rows.items()
            ]
        }
        for g, rows in groups.items()
    }
    (root / f"{name}.json").write_text(json.dumps({"study": name, "groups": body}))


@pytest.mark.parametrize(
    ("other", "expected_diff", "beyond"),
    [
        # the same offset on every seed: a difference far beyond the seeds' spread
        ({0: (53.0, 50.0), 1: (54.0, 55.0), 2: (55.0, 60.0)}, 3.0, True),
        # a mean gain smaller than the differences' own spread: no difference
        ({0: (51.0, 48.0), 1: (50.0, 55.0), 2: (54.0, 62.0)}, 2 / 3, False),
        # the same offset on every seed, but smaller than fine-tuning's spread over seeds
        ({0: (50.5, 48.0), 1: (51.5, 55.0), 2: (52.5, 62.0)}, 0.5, False),
    ],
)
def test_pairs_seed_by_seed_and_judges_against_the_spread(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    other: dict[int, tuple[float, float]],
    expected_diff: float,
    beyond: bool,
) -> None:
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    base = {0: (50.0, 48.0), 1: (51.0, 53.0), 2: (52.0, 58.0), 3: (70.0, 70.0)}
    _study(tmp_path, "a", {"finetune": base})
    _study(tmp_path, "b", {"adafilter": other})
    out = compare.compare("a:finetune", "b:adafilter")
    assert out["seeds"] == [0, 1, 2]  # seed 3 has no partner
    test = out["final_test_acc"]
    assert test["paired_difference"]["mean"] == pytest.approx(expected_diff, abs=0.01)
    assert test["base"]["mean"] == pytest.approx(51.0)  # over the shared seeds only
    assert test["beyond_spread"] is beyond


def test_one_seed_is_never_beyond_the_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    _study(tmp_path, "a", {"finetune": {0: (50.0, 50.0)}, "rp": {0: (60.0, 40.0)}})
    out = compare.compare("a:finetune", "a:rp")
    assert out["final_test_acc"]["paired_difference"]["mean"] == pytest.approx(10.0)
    assert out["final_val_acc"]["per_seed_difference"] == [-10.0]
    assert out["final_test_acc"]["beyond_spread"] is False


def test_unknown_group_names_the_groups_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    _study(tmp_path, "a", {"finetune": {0: (50.0, 50.0)}})
    with pytest.raises(SystemExit, match="no group 'adafilter'.*finetune"):
        compare.compare("a:finetune", "a:adafilter")
    with pytest.raises(SystemExit, match="expected STUDY:GROUP"):
        compare.compare("a:finetune", "missing:finetune")
