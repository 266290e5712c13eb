"""Command line: ``adafilter train|eval|predict|export|data check|report|demo|build-kernels``
(the only module that sees argv).

One module per subcommand; adding one is a module with one function plus one registration
line (and its import below)::

    def _demo_args(p: argparse.ArgumentParser) -> None: ...

    @subcommand("demo", "run the demo", _demo_args)
    def cmd_demo(args: argparse.Namespace) -> int: ...

User errors (:class:`~adafilter.errors.AdaFilterError`, bad flags) are printed as one line
``adafilter: error: <message>`` on stderr with exit status 2, never a traceback; the config
fields a library message names (``weights=FILE``) are shown as flags (``--weights FILE``, see
:func:`~adafilter.cli.base.cli_message`).

Extra registrations (custom backbones, datasets, methods) can be loaded with the environment
variable ``ADAFILTER_PLUGINS=module[,module...]``: each module is imported before parsing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ..errors import AdaFilterError
from . import (  # noqa: F401  (registration)
    data,
    demo,
    evaluate,
    export,
    kernels,
    predict,
    report,
    train,
)
from .base import SUBCOMMANDS, Parser, cli_message, print_error, subcommand
from .train import GATE_FIELDS, GATE_FLAGS, train_config_from_args

__all__ = [
    "GATE_FIELDS",
    "GATE_FLAGS",
    "PLUGINS_ENV",
    "SUBCOMMANDS",
    "build_parser",
    "main",
    "subcommand",
    "train_config_from_args",
]

PLUGINS_ENV = "ADAFILTER_PLUGINS"
# Order of the subcommands in --help (plugins' own subcommands follow).
_ORDER = ("train", "eval", "data", "report", "demo", "predict", "export", "build-kernels")


def _load_plugins() -> None:
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as e:
            raise AdaFilterError(
                f"cannot import plugin {name!r} from ${PLUGINS_ENV}: {e}"
            ) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``adafilter`` argument parser with every registered subcommand."""
    from .. import __version__

    parser = Parser(prog="adafilter", description="AdaFilter (Guo et al., AAAI 2020)")
    parser.add_argument("--version", action="version", version=f"adafilter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    order = sorted(SUBCOMMANDS, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))
    for name in order:
        cmd = SUBCOMMANDS[name]
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(func=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (errors: 2, one line on stderr)."""
    try:
        _load_plugins()
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # argparse: --help, --version and one-line usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except AdaFilterError as e:  # the library names config fields; show them as flags
        print_error(cli_message(str(e)))
        return 2
    except KeyboardInterrupt:
        print("adafilter: interrupted", file=sys.stderr)
        return 130
