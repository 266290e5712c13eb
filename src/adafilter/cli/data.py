"""``adafilter data check``: validate a data root; one JSON line."""

from __future__ import annotations

import argparse
import json

from .base import Parser, subcommand


def _data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="{check}", parser_class=Parser)
    sub.required = True
    c = sub.add_parser("check", help="validate a data root; prints one JSON line")
    c.add_argument("--dataset", required=True, help="dataset name")
    c.add_argument("--data-root", required=True, help="dataset directory")
    c.add_argument("--seed", type=int, default=0, help="seed of random splits")


@subcommand("data", "dataset utilities (check)", _data_args)
def cmd_data(args: argparse.Namespace) -> int:
    from ..data import check_data_root

    print(json.dumps(check_data_root(args.dataset, args.data_root, seed=args.seed)), flush=True)
    return 0
