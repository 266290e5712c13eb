"""``adafilter predict``: classify images with a trained run."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import AdaFilterError
from .base import setup_logging, subcommand


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, help="run directory, its checkpoint.pt or an exported file"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="images or folders")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument(
        "--policy",
        action="store_true",
        help="also print each gated layer's fraction of fine-tuned filters (AdaFilter runs)",
    )
    p.add_argument("--policy-out", default=None, help="bar chart (PNG) of the images' policies")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")


@subcommand("predict", "classify images with a trained run (top-k classes)", _predict_args)
def cmd_predict(args: argparse.Namespace) -> int:
    from ..deploy import find_images, load, save_policy_chart

    setup_logging(quiet=True)
    if args.top_k < 1:
        raise AdaFilterError(f"--top-k must be >= 1, got {args.top_k}")
    files = find_images(args.images)
    run = load(args.run, device=args.device)
    want_policy = args.policy or args.policy_out is not None
    if want_policy and not run.has_policies:
        raise AdaFilterError(
            f"run {str(run.source)!r} ({run.method}) is a plain network without per-image "
            "policies; drop --policy/--policy-out or use an AdaFilter run"
        )
    skipped: list[tuple[str, str]] = []
    policies: list[tuple[str, dict[str, float]]] = []
    for res in run.predict_files(files, top_k=args.top_k):
        pred = res.prediction
        if pred is None:
            skipped.append((str(res.path), res.error or "unreadable"))
            continue
        if pred.policy is not None and args.policy_out:
            policies.append((f"{res.path.parent.name}/{res.path.name}", pred.policy))
        top = [
            {"class": name, "index": i, "prob": round(prob, 6)}
            for (name, prob), i in zip(pred.top_k, pred.indices, strict=True)
        ]
        if args.json:
            row: dict[str, Any] = {"image": str(res.path), "top_k": top}
            if args.policy:
                row["policy"] = {k: round(v, 6) for k, v in (pred.policy or {}).items()}
            print(json.dumps(row), flush=True)
            continue
        print(f"{res.path}  " + "  ".join(f"{t['class']} {t['prob']:.3f}" for t in top))
        if args.policy and pred.policy is not None:
            layers = "  ".join(f"{k} {v:.2f}" for k, v in pred.policy.items())
            print(f"  fine-tuned filters per layer: {layers}", flush=True)
    if skipped:
        names = ", ".join(f"{p} ({why})" for p, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        if len(skipped) == len(files):
            raise AdaFilterError(f"none of the images could be read: {names}{more}")
        print(
            f"adafilter: warning: skipped {len(skipped)} of {len(files)} images that cannot be "
            f"read: {names}{more}",
            file=sys.stderr,
            flush=True,
        )
    if args.policy_out:
        save_policy_chart(policies, args.policy_out)
    return 0
