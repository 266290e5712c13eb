"""Command line: ``adafilter train|eval|predict|export|data check|report|demo`` (only module
that sees argv).

Adding a subcommand is one function plus one registration line::

    def _demo_args(p: argparse.ArgumentParser) -> None: ...

    @subcommand("demo", "run the demo", _demo_args)
    def cmd_demo(args: argparse.Namespace) -> int: ...

User errors (:class:`~adafilter.errors.AdaFilterError`, bad flags) are printed as one line
``adafilter: error: <message>`` on stderr with exit status 2, never a traceback.

Extra registrations (custom backbones, datasets, methods) can be loaded with the environment
variable ``ADAFILTER_PLUGINS=module[,module...]``: each module is imported before parsing.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import AdaFilterError
from .train_config import PRESETS

PLUGINS_ENV = "ADAFILTER_PLUGINS"

# Gate flags: (flag, argparse dest, type, help); their values go to TrainConfig.adafilter.
GATE_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--gate-bias-init", "gate_bias_init", float, "initial bias of the policy heads"),
    ("--gate-ste", "gate_ste", str, "straight-through estimator: identity or sigmoid"),
    ("--gate-embed-dim", "gate_embed_dim", int, "gate embedding size (default 64)"),
    ("--gate-hidden-dim", "gate_hidden_dim", int, "gate LSTM hidden size (default 64)"),
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``adafilter: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see `{self.prog} --help`)")


def _print_error(message: str) -> None:
    one_line = " ".join(str(message).split())
    print(f"adafilter: error: {one_line}", file=sys.stderr, flush=True)


def _fail(message: str) -> NoReturn:
    _print_error(message)
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


# ---- train ----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    from .train_config import parse_int_list

    try:
        return parse_int_list(text, "--milestones")
    except AdaFilterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _train_args(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS

    s = argparse.SUPPRESS  # absent flags stay absent, so the config file's values survive
    p.add_argument("--config", default=None, help="TOML or YAML file of options (flags win)")
    p.add_argument(
        "--method", default=s, help=f"one of: {', '.join(METHODS.names())} (default adafilter)"
    )
    p.add_argument("--dataset", default=s, help="dataset name (see adafilter.data.DATASETS)")
    p.add_argument("--data-root", default=s, help="dataset directory")
    p.add_argument("--backbone", default=s, help="backbone name (default resnet50)")
    p.add_argument(
        "--weights",
        default=s,
        help="backbone weights: 'pretrained' or a state_dict file (default: random)",
    )
    p.add_argument("--out", default=s, help="output directory of the run")
    p.add_argument("--epochs", type=int, default=s, help="total epochs (default 110)")
    p.add_argument("--batch-size", type=int, default=s, help="global batch size (default 64)")
    p.add_argument("--resolution", type=int, default=s, help="input size (default: backbone's)")
    p.add_argument("--seed", type=int, default=s, help="random seed (default 0)")
    p.add_argument("--lr", type=float, default=s, help="network learning rate (default 0.01)")
    p.add_argument(
        "--gate-lr", type=float, default=s, help="gate learning rate (default 0.01 with adam)"
    )
    p.add_argument("--momentum", type=float, default=s, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=s, help="weight decay (default 5e-4)")
    p.add_argument(
        "--milestones",
        type=_int_list,
        default=s,
        help="lr x gamma after these epochs (default 30,60,90)",
    )
    p.add_argument("--gamma", type=float, default=s, help="lr decay factor (default 0.1)")
    p.add_argument("--workers", type=int, default=s, help="DataLoader workers (default 4)")
    p.add_argument("--device", default=s, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--amp", default=s, help="off, bf16 or fp16 (CUDA only; default off)")
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
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="train through torch.compile (default off; --compile-backend, default inductor)",
    )
    p.add_argument("--compile-backend", default=s, help="torch.compile backend (default inductor)")
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
    p.add_argument("--gate-backbone", default=s, help="cnn-gate network (default resnet18)")
    p.add_argument("--gate-weights", default=s, help="cnn-gate weights ('pretrained' or file)")
    p.add_argument("--l2sp-alpha", type=float, default=s, help="L2-SP alpha (default 0.01)")
    p.add_argument("--l2sp-beta", type=float, default=s, help="L2-SP beta (default 0.01)")
    p.add_argument("--random-p", type=float, default=s, help="random-policy p (default 0.5)")
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
        "(0 = off; default 16)",
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
    p.add_argument("--gate-optimizer", default=s, help="adam or sgd for the gate (default adam)")
    for flag, field_name, kind, text in GATE_FLAGS:
        p.add_argument(flag, type=kind, default=s, dest=field_name, help=text)
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="download the dataset if missing",
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
    from .train_config import TrainConfig, load_config_file

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
    from .engine import fit

    config = train_config_from_args(args)
    _setup_logging(quiet=config.quiet)
    summary = fit(config)
    return 0 if summary.get("completed") else 1


# ---- eval -----------------------------------------------------------------------------------


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
    p.add_argument("--data-root", default=None, help="dataset directory (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")


@subcommand("eval", "evaluate a run's checkpoint; prints one JSON line", _eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_checkpoint

    _setup_logging(quiet=True)
    result = evaluate_checkpoint(
        args.checkpoint,
        data_root=args.data_root,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    print(json.dumps(result), flush=True)
    return 0


# ---- data check -----------------------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="{check}", parser_class=_Parser)
    sub.required = True
    c = sub.add_parser("check", help="validate a data root; prints one JSON line")
    c.add_argument("--dataset", required=True, help="dataset name")
    c.add_argument("--data-root", required=True, help="dataset directory")
    c.add_argument("--seed", type=int, default=0, help="seed of random splits")


@subcommand("data", "dataset utilities (check)", _data_args)
def cmd_data(args: argparse.Namespace) -> int:
    from .data import check_data_root

    print(json.dumps(check_data_root(args.dataset, args.data_root, seed=args.seed)), flush=True)
    return 0


# ---- report ---------------------------------------------------------------------------------


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or parents)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="AdaFilter report", help="report heading")


@subcommand("report", "Markdown/HTML report of training runs", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    result = make_report(list(args.runs), args.out, title=args.title)
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, default=str), flush=True)
    return 0


# ---- demo -----------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--backbone", default=d.backbone, help=f"backbone (default {d.backbone})")
    p.add_argument(
        "--weights", default=d.weights, help="'pretrained' (default), a state_dict file or 'none'"
    )
    p.add_argument("--dataset", default=d.dataset, help=f"dataset (default {d.dataset})")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the dataset's)")
    p.add_argument(
        "--methods",
        default=",".join(d.methods),
        help=f"comma-separated methods (default {','.join(d.methods)})",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument(
        "--milestones",
        type=_int_list,
        default=d.milestones,
        help=f"lr x0.1 after these epochs (default {','.join(map(str, d.milestones))})",
    )
    p.add_argument(
        "--resolution", type=int, default=d.resolution, help=f"input size (default {d.resolution})"
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})"
    )
    p.add_argument(
        "--subset-per-class",
        type=int,
        default=d.subset_per_class,
        help=f"images per class in each split (default {d.subset_per_class})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument(
        "--workers", type=int, default=d.workers, help=f"DataLoader workers (default {d.workers})"
    )
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default auto)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")


@subcommand("demo", "fine-tune vs AdaFilter on real data and weights, then a report", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, parse_methods, run_demo

    weights = None if str(args.weights).lower() == "none" else args.weights
    config = DemoConfig(
        out=args.out,
        backbone=args.backbone,
        weights=weights,
        dataset=args.dataset,
        data_root=args.data_root,
        methods=parse_methods(args.methods),
        epochs=args.epochs,
        milestones=list(args.milestones),
        resolution=args.resolution,
        batch_size=args.batch_size,
        subset_per_class=args.subset_per_class,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        quiet=args.quiet,
    )
    _setup_logging(quiet=config.quiet)
    result = run_demo(config)
    report = result["report"]
    print("\n" + report["table"])
    print(f"\nReport: {report['report_html']} (also {report['report_md']})", flush=True)
    return 0


# ---- predict --------------------------------------------------------------------------------


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, help="run directory, its checkpoint.pt or an exported file"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="images or folders")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument(
        "--policy",
        action="store_true",
        help="also print each gated layer's fraction of fine-tuned filters (AdaFilter runs)",
    )
    p.add_argument("--policy-out", default=None, help="bar chart (PNG) of the images' policies")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")


@subcommand("predict", "classify images with a trained run (top-k classes)", _predict_args)
def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import find_images, load, save_policy_chart

    _setup_logging(quiet=True)
    if args.top_k < 1:
        raise AdaFilterError(f"--top-k must be >= 1, got {args.top_k}")
    files = find_images(args.images)
    run = load(args.run, device=args.device)
    want_policy = args.policy or args.policy_out is not None
    if want_policy and not run.has_policies:
        raise AdaFilterError(
            f"run {str(run.source)!r} ({run.method}) is a plain network without per-image "
            "policies; drop --policy/--policy-out or use an AdaFilter run"
        )
    skipped: list[tuple[str, str]] = []
    policies: list[tuple[str, dict[str, float]]] = []
    for res in run.predict_files(files, top_k=args.top_k):
        pred = res.prediction
        if pred is None:
            skipped.append((str(res.path), res.error or "unreadable"))
            continue
        if pred.policy is not None and args.policy_out:
            policies.append((f"{res.path.parent.name}/{res.path.name}", pred.policy))
        top = [
            {"class": name, "index": i, "prob": round(prob, 6)}
            for (name, prob), i in zip(pred.top_k, pred.indices, strict=True)
        ]
        if args.json:
            row: dict[str, Any] = {"image": str(res.path), "top_k": top}
            if args.policy:
                row["policy"] = {k: round(v, 6) for k, v in (pred.policy or {}).items()}
            print(json.dumps(row), flush=True)
            continue
        print(f"{res.path}  " + "  ".join(f"{t['class']} {t['prob']:.3f}" for t in top))
        if args.policy and pred.policy is not None:
            layers = "  ".join(f"{k} {v:.2f}" for k, v in pred.policy.items())
            print(f"  fine-tuned filters per layer: {layers}", flush=True)
    if skipped:
        names = ", ".join(f"{p} ({why})" for p, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        if len(skipped) == len(files):
            raise AdaFilterError(f"none of the images could be read: {names}{more}")
        print(
            f"adafilter: warning: skipped {len(skipped)} of {len(files)} images that cannot be "
            f"read: {names}{more}",
            file=sys.stderr,
            flush=True,
        )
    if args.policy_out:
        save_policy_chart(policies, args.policy_out)
    return 0


# ---- export ---------------------------------------------------------------------------------


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
    from .inference import export_program, export_run, load

    _setup_logging(quiet=True)
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


# ---- entry point ----------------------------------------------------------------------------


def _setup_logging(*, quiet: bool) -> None:
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
            sys.stderr.write(record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # never let logging break a run
            self.handleError(record)


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
    from . import __version__

    parser = _Parser(prog="adafilter", description="AdaFilter (Guo et al., AAAI 2020)")
    parser.add_argument("--version", action="version", version=f"adafilter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in SUBCOMMANDS.items():
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
    except AdaFilterError as e:
        _print_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("adafilter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
