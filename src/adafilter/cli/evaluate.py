"""``adafilter eval``: evaluate a run's checkpoint; one JSON line."""

from __future__ import annotations

import argparse
import json

from .base import setup_logging, subcommand


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
    p.add_argument("--data-root", default=None, help="dataset directory (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")


@subcommand("eval", "evaluate a run's checkpoint; prints one JSON line", _eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    from ..training.fit import evaluate_checkpoint

    setup_logging(quiet=True)
    result = evaluate_checkpoint(
        args.checkpoint,
        data_root=args.data_root,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    print(json.dumps(result), flush=True)
    return 0
