"""``adafilter report``: Markdown/HTML report of run directories."""

from __future__ import annotations

import argparse
import json

from .base import subcommand


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or parents)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="AdaFilter report", help="report heading")


@subcommand("report", "Markdown/HTML report of training runs", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    from ..report import make_report

    result = make_report(list(args.runs), args.out, title=args.title)
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, default=str), flush=True)
    return 0
