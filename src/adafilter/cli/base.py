"""What every subcommand shares: one-line errors, the registry, logging, default help text.

Library messages name config fields (``weights=FILE``, ``resume=True``, ``data_root=``);
:func:`cli_message` is the one place that shows them as this CLI's flags (``--weights FILE``,
``--resume``, ``--data-root``) in printed errors and log lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, NoReturn

from ..errors import AdaFilterError

__all__ = [
    "SUBCOMMANDS",
    "Parser",
    "Subcommand",
    "cli_message",
    "default_of",
    "fail",
    "int_list",
    "print_error",
    "setup_logging",
    "subcommand",
]


# Every long flag any subcommand defines, by argparse dest (a library config field's name).
_FLAGS: dict[str, argparse.Action] = {}
# ``field=`` (optionally ``=True``/``=False``), not inside a word, a path, a URL or ``a=b=``;
# ``lr=/gate_lr=`` names two fields.
_FIELD = re.compile(r"(?<![\w.=?&-])(?<![^=]/)([a-z][a-z0-9_]*)=(True\b|False\b)?")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``adafilter: error: ...``, exit 2).

    Every long flag added is remembered by its dest for :func:`cli_message`.
    """

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if any(o.startswith("--") for o in action.option_strings):
            _FLAGS.setdefault(action.dest, action)
        return action


def cli_message(message: str) -> str:
    """``message`` with each config field that is a flag of this CLI written as the flag.

    ``weights=FILE`` -> ``--weights FILE``, ``amp=off`` -> ``--amp off``, ``resume=True`` ->
    ``--resume``, ``channels_last=False`` -> ``--no-channels-last``, ``data_root=`` ->
    ``--data-root``. Names that are no flag (``num_classes=5``) and all other text are kept.

    Args:
        message: A library error or log message.

    Returns:
        The message as the CLI prints it.
    """

    def to_flag(m: re.Match[str]) -> str:
        action = _FLAGS.get(m.group(1))
        if action is None:
            return m.group(0)
        flag = next(o for o in action.option_strings if o.startswith("--"))
        value = m.group(2)
        if value and action.nargs == 0:  # a switch: store_true or --x/--no-x
            if value == "True":
                return flag
            no = f"--no-{flag[2:]}"
            return no if no in action.option_strings else m.group(0)
        follows = m.string[m.end() : m.end() + 1]
        if value or (follows and follows not in " ,;:)/"):
            return f"{flag} {value or ''}"
        return flag

    return _FIELD.sub(to_flag, message)


def print_error(message: str) -> None:
    one_line = " ".join(str(message).split())
    print(f"adafilter: error: {one_line}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    print_error(message)
    raise SystemExit(2)


@dataclass(frozen=True)
class Subcommand:
    """A registered subcommand: help text, argument setup and handler."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated ``run(args) -> exit code`` as ``adafilter NAME``."""

    def deco(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        SUBCOMMANDS[name] = Subcommand(help=help, configure=configure or (lambda p: None), run=run)
        return run

    return deco


def default_of(cls: type, name: str) -> str:
    """The default of dataclass field ``cls.name`` as help text shows it (``30,60,90``)."""
    f = next(f for f in fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def int_list(text: str) -> list[int]:
    from ..training.config import parse_int_list

    try:
        return parse_int_list(text, "--milestones")
    except AdaFilterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def setup_logging(*, quiet: bool) -> None:
    """Log lines (``adafilter`` logger) to stderr; only warnings and errors when quiet.

    Under torchrun only rank 0 logs at INFO level.
    """
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("adafilter")
    logger.setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.propagate = False


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (survives stream redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(cli_message(record.getMessage()) + "\n")
            sys.stderr.flush()
        except Exception:  # never let logging break a run
            self.handleError(record)
