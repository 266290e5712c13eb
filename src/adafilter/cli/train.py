"""``adafilter train``: flags -> :class:`~adafilter.train_config.TrainConfig` -> ``fit``."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

from ..config import AdaFilterConfig
from ..errors import AdaFilterError
from ..train_config import PRESETS, TrainConfig
from .base import default_of, int_list, setup_logging, subcommand

# Gate flags: (flag, argparse dest, type, help); their values go to TrainConfig.adafilter.
GATE_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--gate-bias-init", "gate_bias_init", float, "initial bias of the policy heads"),
    ("--gate-ste", "gate_ste", str, "straight-through estimator: identity or sigmoid"),
    (
        "--gate-embed-dim",
        "gate_embed_dim",
        int,
        f"gate embedding size (default {default_of(AdaFilterConfig, 'embed_dim')})",
    ),
    (
        "--gate-hidden-dim",
        "gate_hidden_dim",
        int,
        f"gate LSTM hidden size (default {default_of(AdaFilterConfig, 'hidden_dim')})",
    ),
    ("--gate-noise", "gate_noise", float, "logistic noise on the policy logits in training"),
    ("--policy-cost", "policy_cost", float, "loss weight of the share of fine-tuned filters"),
]
GATE_FIELDS = {  # argparse dest -> AdaFilterConfig field
    "gate_bias_init": "gate_bias_init",
    "gate_ste": "ste",
    "gate_embed_dim": "embed_dim",
    "gate_hidden_dim": "hidden_dim",
    "gate_noise": "gate_noise",
    "policy_cost": "policy_cost",
}


def _train_args(p: argparse.ArgumentParser) -> None:
    from ..methods import METHODS

    s = argparse.SUPPRESS  # absent flags stay absent, so the config file's values survive

    def d(name: str) -> str:  # "(default X)" from TrainConfig itself, never retyped here
        return default_of(TrainConfig, name)

    p.add_argument("--config", default=None, help="TOML or YAML file of options (flags win)")
    p.add_argument(
        "--method", default=s, help=f"one of: {', '.join(METHODS.names())} (default {d('method')})"
    )
    p.add_argument("--dataset", default=s, help="dataset name (see adafilter.data.DATASETS)")
    p.add_argument("--data-root", default=s, help="dataset directory")
    p.add_argument("--backbone", default=s, help=f"backbone name (default {d('backbone')})")
    p.add_argument(
        "--weights",
        default=s,
        help="backbone weights: 'pretrained' or a state_dict file (default: random)",
    )
    p.add_argument("--out", default=s, help="output directory of the run")
    p.add_argument("--epochs", type=int, default=s, help=f"total epochs (default {d('epochs')})")
    p.add_argument(
        "--batch-size", type=int, default=s, help=f"global batch size (default {d('batch_size')})"
    )
    p.add_argument("--resolution", type=int, default=s, help="input size (default: backbone's)")
    p.add_argument("--seed", type=int, default=s, help=f"random seed (default {d('seed')})")
    p.add_argument("--lr", type=float, default=s, help=f"network learning rate (default {d('lr')})")
    p.add_argument(
        "--gate-lr",
        type=float,
        default=s,
        help=f"gate learning rate (default {d('gate_lr')} with {d('gate_optimizer')})",
    )
    p.add_argument(
        "--momentum", type=float, default=s, help=f"SGD momentum (default {d('momentum')})"
    )
    p.add_argument(
        "--weight-decay", type=float, default=s, help=f"weight decay (default {d('weight_decay')})"
    )
    p.add_argument(
        "--milestones",
        type=int_list,
        default=s,
        help=f"lr x gamma after these epochs (default {d('milestones')})",
    )
    p.add_argument("--gamma", type=float, default=s, help=f"lr decay factor (default {d('gamma')})")
    p.add_argument(
        "--workers", type=int, default=s, help=f"DataLoader workers (default {d('workers')})"
    )
    p.add_argument("--device", default=s, help=f"auto, cpu, cuda or cuda:N (default {d('device')})")
    p.add_argument("--amp", default=s, help=f"off, bf16 or fp16 (CUDA only; default {d('amp')})")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="channels-last memory format",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="replay each training step as a CUDA graph (one GPU; default off)",
    )
    p.add_argument(
        "--subset-per-class",
        type=int,
        default=s,
        help="keep at most K images per class (quick runs)",
    )
    p.add_argument(
        "--train-per-class",
        type=int,
        default=s,
        help="keep at most K training images per class (evaluation split whole)",
    )
    p.add_argument(
        "--gate-backbone", default=s, help=f"cnn-gate network (default {d('gate_backbone')})"
    )
    p.add_argument("--gate-weights", default=s, help="cnn-gate weights ('pretrained' or file)")
    p.add_argument(
        "--l2sp-alpha", type=float, default=s, help=f"L2-SP alpha (default {d('l2sp_alpha')})"
    )
    p.add_argument(
        "--l2sp-beta", type=float, default=s, help=f"L2-SP beta (default {d('l2sp_beta')})"
    )
    p.add_argument(
        "--random-p", type=float, default=s, help=f"random-policy p (default {d('random_p')})"
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="start from a named set of options (flags and --config win): 'paper' = the "
        "paper's published settings",
    )
    p.add_argument(
        "--precise-bn",
        type=int,
        default=s,
        help="recompute BN statistics over N training batches before each evaluation "
        f"(0 = off; default {d('precise_bn')})",
    )
    p.add_argument(
        "--bn-momentum", type=float, default=s, help="override the backbone's BN momentum"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=s,
        help="evaluate every N epochs (epoch 1 and the last always; 1)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=s,
        help="hold out this share of each class's training images for validation (0 = off)",
    )
    p.add_argument(
        "--gate-optimizer",
        default=s,
        help=f"adam or sgd for the gate (default {d('gate_optimizer')})",
    )
    for flag, field_name, kind, text in GATE_FLAGS:
        p.add_argument(flag, type=kind, default=s, dest=field_name, help=text)
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="download the dataset and pretrained weights if missing (into $ADAFILTER_HOME)",
    )
    p.add_argument(
        "--quiet",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="print only warnings and errors",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="continue from OUT/checkpoint.pt if it exists",
    )


def train_config_from_args(args: argparse.Namespace) -> Any:
    """Defaults < ``--config`` file < flags -> :class:`~adafilter.train_config.TrainConfig`."""
    from ..train_config import load_config_file

    values: dict[str, Any] = {}
    preset = getattr(args, "preset", None)
    if preset:
        values.update(copy.deepcopy(PRESETS[preset]))
    if args.config:
        file_values = load_config_file(args.config)
        if "adafilter" in file_values and "adafilter" in values:
            file_values["adafilter"] = {**values["adafilter"], **dict(file_values["adafilter"])}
        values.update(file_values)
    skip = ("config", "command", "func", "preset", *(f for _, f, _, _ in GATE_FLAGS))
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    values.update(flags)
    gate = {GATE_FIELDS[f]: getattr(args, f) for _, f, _, _ in GATE_FLAGS if hasattr(args, f)}
    if gate:
        values["adafilter"] = {**dict(values.get("adafilter") or {}), **gate}
    missing = [k for k in ("dataset", "out") if not values.get(k)]
    if missing:
        raise AdaFilterError(
            "missing "
            + ", ".join(f"--{k.replace('_', '-')}" for k in missing)
            + " (give it as a flag or in --config)"
        )
    try:
        return TrainConfig.from_dict(values, source="options")
    except TypeError as e:
        raise AdaFilterError(f"invalid option value: {e}") from None


@subcommand("train", "train a model with a fine-tuning method", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from ..training.fit import fit

    config = train_config_from_args(args)
    setup_logging(quiet=config.quiet)
    summary = fit(config)
    return 0 if summary.get("completed") else 1
