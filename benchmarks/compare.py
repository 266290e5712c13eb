"""Paired comparisons between groups of seeded study runs (``benchmarks/results/<study>.json``).

A study's summary holds, per group, each seed's final test and validation accuracy. This script
pairs two groups seed by seed (the same seed = the same data split, head initialisation and
shuffling) and reports, for the final test and validation accuracy and the test accuracy at the
epoch early stopping on validation picks (``test_at_best_val``), each group's mean +- std and the
paired difference (other minus base, mean +- std over the shared seeds). A difference inside the
seeds' spread is no difference: the verdict says whether ``|mean difference|`` exceeds the
larger of the two groups' std and the differences' std.

    python benchmarks/compare.py --base woof30:finetune \\
        --other woof30:random-policy woof30:adafilter defaults:woof30-adafilter-b2 \\
        --out benchmarks/results/woof30-paired.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from adafilter.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("final_test_acc", "final_val_acc", "test_at_best_val")


def _seeds(ref: str) -> dict[int, dict[str, Any]]:
    """``study:group`` -> {seed: that seed's row in the study's summary}."""
    study, _, group = ref.partition(":")
    path = RESULTS / f"{study}.json"
    if not group or not path.exists():
        raise SystemExit(f"error: {ref!r}: expected STUDY:GROUP with {path} written by study.py")
    groups = json.loads(path.read_text())["groups"]
    if group not in groups:
        raise SystemExit(f"error: {study}.json has no group {group!r}; it has {sorted(groups)}")
    return {row["seed"]: row for row in groups[group]["seeds"]}


def _stats(values: list[float]) -> dict[str, Any]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.mean(values), 2), "std": round(sd, 2), "n": len(values)}


def compare(base: str, other: str) -> dict[str, Any]:
    """Pair ``other`` with ``base`` on their shared seeds.

    Args:
        base: ``study:group`` of the reference (e.g. fine-tuning).
        other: ``study:group`` compared with it.

    Returns:
        Per metric: both groups' mean/std over the shared seeds, the paired difference
        (other - base) and ``beyond_spread``: whether the mean difference exceeds every std.
    """
    a, b = _seeds(base), _seeds(other)
    shared = sorted(set(a) & set(b))
    out: dict[str, Any] = {"base": base, "other": other, "seeds": shared}
    if not shared:
        return out
    for metric in METRICS:
        xs = [a[s].get(metric) for s in shared]
        ys = [b[s].get(metric) for s in shared]
        if any(v is None for v in xs + ys):
            continue
        diff = [y - x for x, y in zip(xs, ys, strict=True)]
        base_s, other_s, diff_s = _stats(xs), _stats(ys), _stats(diff)
        spread = max(base_s["std"], other_s["std"], diff_s["std"])
        out[metric] = {
            "base": base_s,
            "other": other_s,
            "paired_difference": diff_s,
            "per_seed_difference": [round(d, 2) for d in diff],
            "beyond_spread": len(shared) > 1 and abs(diff_s["mean"]) > spread,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="STUDY:GROUP of the reference")
    ap.add_argument("--other", nargs="+", required=True, help="STUDY:GROUP compared with it")
    ap.add_argument("--out", default="", help="write the comparisons here (JSON)")
    args = ap.parse_args()
    rows = [compare(args.base, o) for o in args.other]
    for r in rows:
        for metric in METRICS:
            if metric in r:
                m = r[metric]
                d = m["paired_difference"]
                print(
                    f"{r['other']:>32} vs {r['base']}: {metric} "
                    f"{m['other']['mean']:.1f}±{m['other']['std']:.1f} vs "
                    f"{m['base']['mean']:.1f}±{m['base']['std']:.1f}, paired "
                    f"{d['mean']:+.1f}±{d['std']:.1f} (n={d['n']})"
                    + (" beyond the spread" if m["beyond_spread"] else "")
                )
    if args.out:
        atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
