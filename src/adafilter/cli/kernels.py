"""``adafilter build-kernels``: compile the CPU gate kernel for this machine; one JSON line."""

from __future__ import annotations

import argparse
import json

from ..errors import AdaFilterError
from .base import subcommand


def _kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")


@subcommand(
    "build-kernels",
    "compile the CPU gate kernel (batch-1 inference speed; needs a C++ compiler and ninja)",
    _kernels_args,
)
def cmd_build_kernels(args: argparse.Namespace) -> int:
    from ..layers import cpu_gate

    try:
        path = cpu_gate.build(verbose=args.verbose)
    except RuntimeError as exc:
        raise AdaFilterError(str(exc)) from None
    print(json.dumps({"built": str(path)}), flush=True)
    return 0
