"""Benchmark result files store paths relative to the repository (``benchmarks/paths.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import paths  # noqa: E402  (benchmarks/ is not a package)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (str(REPO / "benchmarks/results/near/finetune-s0"), "benchmarks/results/near/finetune-s0"),
        (str(REPO), "."),
        (str(REPO.parent / "shared/weights/r20.th"), "../shared/weights/r20.th"),
        ("/tmp/data/cifar10-subset", "<data>/cifar10-subset"),
        ("/work/main/benchmarks/results/far/x", "benchmarks/results/far/x"),  # --checkout
        (str(Path.home() / "data/dogs"), "~/data/dogs"),
        ("../shared/data/omniglot", "../shared/data/omniglot"),  # relative: as given
        ("/opt/data/x", "/opt/data/x"),
        ("pretrained", "pretrained"),
    ],
)
def test_stored_path(given: str, stored: str) -> None:
    assert paths.stored_path(given, checkouts=["/work/main"]) == stored


def test_relativize_keeps_the_layout(tmp_path: Path) -> None:
    doc = {"config": {"data_root": "/tmp/data/c", "out": str(REPO / "r"), "lr": 0.1}, "n": [1]}
    f = tmp_path / "summary.json"
    f.write_text(json.dumps(doc, indent=3) + "\n")
    assert paths.relativize_json_file(f)
    want = {"config": {"data_root": "<data>/c", "out": "r", "lr": 0.1}, "n": [1]}
    assert f.read_text() == json.dumps(want, indent=3) + "\n"
    assert not paths.relativize_json_file(f)  # nothing left to change
    assert paths.repo_relative(doc) == want
