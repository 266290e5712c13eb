"""``adafilter export``: a run's weights + metadata (and a torch.export program)."""

from __future__ import annotations

import argparse
import json

from .base import setup_logging, subcommand


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, help="run directory, its checkpoint.pt or an exported file"
    )
    p.add_argument("--to", required=True, help="weights file to write (+ FILE.json metadata)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "safetensors", "torch"],
        help="safetensors, torch (weights_only) or auto: safetensors when installed",
    )
    p.add_argument(
        "--program",
        default=None,
        metavar="FILE.pt2",
        help="also write a torch.export program (runs without adafilter)",
    )


@subcommand("export", "write a run's weights + metadata for deployment", _export_args)
def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy import export_program, export_run, load

    setup_logging(quiet=True)
    run = load(args.run, device="cpu")
    meta = export_run(run, args.to, format=args.format)
    out = {
        "weights": meta["weights_path"],
        "format": meta["weights_format"],
        "metadata": meta["metadata_path"],
        "method": meta["method"],
        "backbone": meta["backbone"],
        "classes": meta["num_classes"],
    }
    if args.program:
        out["program"] = export_program(run, args.program)["program_path"]
    print(json.dumps(out), flush=True)
    return 0
