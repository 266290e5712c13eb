"""``adafilter demo``: fine-tuning vs AdaFilter on real data, then a report."""

from __future__ import annotations

import argparse
import dataclasses

from .base import int_list, setup_logging, subcommand


def _demo_args(p: argparse.ArgumentParser) -> None:
    from ..demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--backbone", default=d.backbone, help=f"backbone (default {d.backbone})")
    p.add_argument(
        "--weights",
        default="none",
        help="starting weights: 'pretrained', a state_dict file or 'none' (default: random "
        "init, then the source stage)",
    )
    p.add_argument(
        "--pretrain",
        default=d.pretrain,
        help=f"source dataset the backbone is trained on first, or 'none' to start every "
        f"method from --weights (default {d.pretrain})",
    )
    p.add_argument(
        "--pretrain-root", default=None, help="source dataset folder (default: the dataset's)"
    )
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=d.pretrain_epochs,
        help=f"epochs of the source stage (default {d.pretrain_epochs})",
    )
    p.add_argument(
        "--pretrain-per-class",
        type=int,
        default=d.pretrain_per_class,
        help=f"source images per class (default {d.pretrain_per_class})",
    )
    p.add_argument(
        "--pretrain-lr",
        type=float,
        default=d.pretrain_lr,
        help=f"learning rate of the source stage (default {d.pretrain_lr})",
    )
    p.add_argument("--dataset", default=d.dataset, help=f"target dataset (default {d.dataset})")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the dataset's)")
    p.add_argument(
        "--methods",
        default=",".join(d.methods),
        help=f"comma-separated methods (default {','.join(d.methods)})",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument(
        "--milestones",
        type=int_list,
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
    from ..demo import DemoConfig, parse_methods, run_demo

    # DemoConfig fields that are flags keep their names (lr, gate_lr: the training defaults).
    names = [f.name for f in dataclasses.fields(DemoConfig) if hasattr(args, f.name)]
    values = {name: getattr(args, name) for name in names}
    values["weights"] = None if str(args.weights).lower() == "none" else args.weights
    values["pretrain"] = None if str(args.pretrain).lower() == "none" else args.pretrain
    values["methods"] = parse_methods(args.methods)
    values["milestones"] = list(args.milestones)
    config = DemoConfig(**values)
    setup_logging(quiet=config.quiet)
    result = run_demo(config)
    report = result["report"]
    print("\n" + report["table"])
    print(f"\nReport: {report['report_html']} (also {report['report_md']})", flush=True)
    return 0
