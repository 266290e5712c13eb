"""``adafilter demo``: fine-tuning vs AdaFilter on real data, then a report."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from .base import default_of, int_list, setup_logging, subcommand
from .train import keep_memory_on_cpu

# DemoConfig flags in --help order: (field, help). The flag is --field-name; its type and
# default come from the field ("{d}" in the help is the default, never retyped).
DEMO_FLAGS: list[tuple[str, str]] = [
    ("out", "output folder (default {d})"),
    ("backbone", "backbone (default {d})"),
    (
        "weights",
        "starting weights: 'pretrained', a state_dict file or 'none' (default: random init, "
        "then the source stage)",
    ),
    (
        "pretrain",
        "source dataset the backbone is trained on first, or 'none' to start every method "
        "from --weights (default {d})",
    ),
    ("pretrain_root", "source dataset folder (default: the dataset's)"),
    ("pretrain_epochs", "epochs of the source stage (default {d})"),
    ("pretrain_per_class", "source images per class (default {d})"),
    ("pretrain_lr", "learning rate of the source stage (default {d})"),
    ("dataset", "target dataset (default {d})"),
    ("data_root", "dataset folder (default: the dataset's)"),
    ("methods", "comma-separated methods (default {d})"),
    ("epochs", "epochs (default {d})"),
    ("milestones", "lr x0.1 after these epochs (default {d})"),
    ("eval_every", "evaluate after epoch 1, every N epochs and the last (default {d})"),
    ("resolution", "input size (default {d})"),
    ("augment", "training augmentation: resized-crop, random-crop, pad-crop or none (default {d})"),
    ("batch_size", "batch size (default {d})"),
    ("subset_per_class", "images per class in each split (default {d})"),
    ("seed", "seed (default {d})"),
    ("workers", "DataLoader workers (default {d})"),
    ("device", "auto, cpu or cuda (default {d})"),
    ("quiet", "print only the final table"),
]


def _optional_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _str_list(text: str) -> list[str]:
    from ..demo import parse_methods

    return parse_methods(text)


_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": _optional_str,
    "list[int]": int_list,
    "list[str]": _str_list,
}


def _demo_args(p: argparse.ArgumentParser) -> None:
    from ..demo import DemoConfig

    declared = {f.name: f for f in fields(DemoConfig)}
    for name, text in DEMO_FLAGS:
        f = declared[name]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        flag, help_text = "--" + name.replace("_", "-"), text.format(d=default_of(DemoConfig, name))
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=default, help=help_text)
        else:
            p.add_argument(flag, type=_TYPES[str(f.type)], default=default, help=help_text)


@subcommand("demo", "fine-tune vs AdaFilter on real data and weights, then a report", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    # Every DemoConfig field that is a flag keeps its name; the rest (lr, gate_lr) keep defaults.
    config = DemoConfig(
        **{f.name: getattr(args, f.name) for f in fields(DemoConfig) if hasattr(args, f.name)}
    )
    setup_logging(quiet=config.quiet)
    keep_memory_on_cpu(config.device)
    result = run_demo(config)
    report = result["report"]
    print("\n" + report["table"])
    print(f"\nReport: {report['report_html']} (also {report['report_md']})", flush=True)
    return 0
