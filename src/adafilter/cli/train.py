"""``adafilter train``: flags -> :class:`~adafilter.training.config.TrainConfig` -> ``fit``."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ..errors import AdaFilterError
from ..training.config import PRESETS, TrainConfig
from ..tuner.config import AdaFilterConfig
from ..utils.allocator import keep_freed_memory
from .base import cli_message, default_of, int_list, setup_logging, subcommand

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
    (
        "--recompute-pretrained",
        "recompute_pretrained",
        bool,
        "recompute S(x) in the backward instead of keeping it: ~1.0x fine-tuning's activation "
        "memory instead of ~1.5x, one more conv forward per gated layer",
    ),
]
GATE_FIELDS = {  # argparse dest -> AdaFilterConfig field
    "gate_bias_init": "gate_bias_init",
    "gate_ste": "ste",
    "gate_embed_dim": "embed_dim",
    "gate_hidden_dim": "hidden_dim",
    "gate_noise": "gate_noise",
    "policy_cost": "policy_cost",
    "recompute_pretrained": "recompute_pretrained",
}


# TrainConfig flags in --help order: (field, help). The flag is --field-name; its type comes
# from the field's annotation and "{d}" in the help from the field's default (never retyped).
# None marks where --preset and the gate flags go.
TRAIN_FLAGS: list[tuple[str, str] | None] = [
    ("method", "one of: {methods} (default {d})"),
    ("dataset", "dataset name (see adafilter.data.DATASETS)"),
    ("data_root", "dataset directory"),
    ("backbone", "backbone name (default {d})"),
    ("weights", "backbone weights: 'pretrained' or a state_dict file (default: random)"),
    ("out", "output directory of the run"),
    ("epochs", "total epochs (default {d})"),
    ("batch_size", "global batch size (default {d})"),
    ("resolution", "input size (default: backbone's)"),
    ("seed", "random seed (default {d})"),
    ("lr", "network learning rate (default {d})"),
    ("gate_lr", "gate learning rate (default {d} with adam)"),
    ("momentum", "SGD momentum (default {d})"),
    ("weight_decay", "weight decay (default {d})"),
    ("milestones", "lr x gamma after these epochs (default {d})"),
    ("gamma", "lr decay factor (default {d})"),
    ("workers", "DataLoader workers (default {d})"),
    ("device", "auto, cpu, cuda or cuda:N (default {d})"),
    ("amp", "off, bf16 or fp16 (CUDA only; default {d})"),
    ("channels_last", "channels-last memory format"),
    ("cuda_graphs", "replay each training step as a CUDA graph (one GPU; default off)"),
    ("compile", "train through torch.compile (default off; see --compile-backend)"),
    ("compile_backend", "torch.compile backend (default {d})"),
    (
        "augment",
        "training augmentation: resized-crop (ImageNet recipe), random-crop (resize + random "
        "crop, the fine-grained transfer recipe), pad-crop (CIFAR recipe, for small images) or "
        "none (default {d})",
    ),
    ("subset_per_class", "keep at most K images per class (quick runs)"),
    ("train_per_class", "keep at most K training images per class (evaluation split whole)"),
    ("gate_backbone", "cnn-gate network (default {d})"),
    ("gate_weights", "cnn-gate weights ('pretrained' or file)"),
    ("l2sp_alpha", "L2-SP alpha (default {d})"),
    ("l2sp_beta", "L2-SP beta (default {d})"),
    ("random_p", "random-policy p (default {d})"),
    None,  # --preset
    (
        "precise_bn",
        "recompute BN statistics over N training batches before each evaluation "
        "(0 = off; default {d})",
    ),
    (
        "choose_bn_stats",
        "at each evaluation keep the running or the precise BN statistics, whichever scores "
        "higher on the validation split (needs --val-fraction; default off)",
    ),
    ("bn_momentum", "override the backbone's BN momentum"),
    ("eval_every", "evaluate every N epochs (epoch 1 and the last always; {d})"),
    (
        "checkpoint_every",
        "also checkpoint every N steps inside an epoch, for long epochs (0 = off; default {d})",
    ),
    (
        "val_fraction",
        "hold out this share of each class's training images for validation (0 = off)",
    ),
    ("gate_optimizer", "adam or sgd for the gate (default {d})"),
    None,  # the gate flags
    ("download", "download the dataset and pretrained weights if missing (into $ADAFILTER_HOME)"),
    ("quiet", "print only warnings and errors"),
    (
        "tensorboard",
        "also write TensorBoard event files to OUT/tensorboard (pip install "
        "'adafilter[tensorboard]')",
    ),
    ("resume", "continue from OUT/checkpoint.pt if it exists"),
]
_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "list[int]": int_list}


def _add_field_flag(p: argparse.ArgumentParser, name: str, text: str, **fmt: str) -> None:
    """``--name`` for TrainConfig field ``name``; absent flags stay absent (argparse.SUPPRESS),
    so a --config file's values survive."""
    kind = next(f.type for f in fields(TrainConfig) if f.name == name).split(" | ")[0]
    help_text = text.format(d=default_of(TrainConfig, name), **fmt)
    flag, s = "--" + name.replace("_", "-"), argparse.SUPPRESS
    if kind == "bool":
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=s, help=help_text)
    else:
        p.add_argument(flag, type=_TYPES.get(kind, str), default=s, help=help_text)


def _train_args(p: argparse.ArgumentParser) -> None:
    from ..methods import METHODS

    p.add_argument("--config", default=None, help="TOML or YAML file of options (flags win)")
    gaps = iter([_preset_flag, _gate_flags])
    for entry in TRAIN_FLAGS:
        if entry is None:
            next(gaps)(p)
        else:
            _add_field_flag(p, *entry, methods=", ".join(METHODS.names()))


def _preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="start from a named set of options (flags and --config win): 'paper' = the "
        "paper's published settings",
    )


def _gate_flags(p: argparse.ArgumentParser) -> None:
    for flag, field_name, kind, text in GATE_FLAGS:
        if kind is bool:
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                dest=field_name,
                help=text,
            )
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, dest=field_name, help=text)


def train_config_from_args(args: argparse.Namespace) -> Any:
    """Defaults < ``--config`` file < flags -> :class:`~adafilter.training.config.TrainConfig`."""
    from ..training.config import load_config_file

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


def keep_memory_on_cpu(device: str) -> None:
    """A CPU training run keeps freed memory in the process (glibc's thresholds): set here, by
    the CLI, since it is process-wide; a library call of ``fit`` leaves the allocator alone.

    Silent: it runs before ``fit`` has checked the options, whose errors must stay one line.
    """
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        keep_freed_memory()


@subcommand("train", "train a model with a fine-tuning method", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from ..training.fit import fit
    from ..training.stopping import TrainingStopped

    config = train_config_from_args(args)
    setup_logging(quiet=config.quiet)
    keep_memory_on_cpu(config.device)
    try:
        summary = fit(config)
    except TrainingStopped as e:  # a preemption signal: checkpoint written, say how to go on
        if e.main:
            print(f"adafilter: {cli_message(str(e))}", file=sys.stderr, flush=True)
        return 128 + e.signum
    return 0 if summary.get("completed") else 1
