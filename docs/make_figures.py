"""Regenerate the pictures in ``docs/images/`` from committed benchmark runs (never by hand).

Each figure is ``adafilter report``'s own output for a set of run directories under
``benchmarks/results/``: the accuracy curves (Fig. 3), the per-layer policy (Fig. 4) and the
policy by class of a real run.

    python docs/make_figures.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from adafilter.report.render import make_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
IMAGES = Path(__file__).resolve().parent / "images"

# picture prefix -> (the runs it shows, their report's title)
FIGURES = {
    "near-pad": (
        ["near-pad/finetune-s0", "near-pad/adafilter-s0", "near-pad/random-policy-s0"],
        "Lite0 -> CIFAR-10 subset at 64 px, 1,050 SGD steps, seed 0",
    ),
}
KEEP = ("accuracy.png", "policy.png", "policy_by_class.png")


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    for prefix, (runs, title) in FIGURES.items():
        dirs = [RESULTS / r for r in runs if (RESULTS / r / "summary.json").exists()]
        if not dirs:
            print(f"skip {prefix}: no finished runs")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            make_report(dirs, tmp, title=title)
            for name in KEEP:
                if (Path(tmp) / name).exists():
                    shutil.copyfile(Path(tmp) / name, IMAGES / f"{prefix}-{name}")
                    print(IMAGES / f"{prefix}-{name}")


if __name__ == "__main__":
    main()
