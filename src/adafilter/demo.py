"""The out-of-the-box experiment behind ``make demo`` / ``adafilter demo``.

Default: a transfer problem where the right policy is known (issue 16, item 7). A CIFAR
ResNet-20 is first pretrained on plain Fashion-MNIST (the *source*; the stage ``pretrain``);
the target, ``fashion-mnist-negatives``, mixes plain images, for which those pretrained filters
are right, with photographic negatives whose labels are shifted by five classes, for which they
are wrong. Standard fine-tuning and AdaFilter then train from the pretrained network with the
same seed, data, epochs and schedule, and ``adafilter report`` compares them. Sized to finish
in a few minutes on a 2-core CPU. ``pretrain=None`` skips the source stage and fine-tunes
``weights`` directly (e.g. ImageNet EfficientNet-Lite0 on plain Fashion-MNIST, the previous
default).

Each method's run lives in ``OUT/runs/<method>`` and checkpoints every epoch, so a demo
interrupted with Ctrl-C continues where it stopped when started again with the same ``out``.
"""

from __future__ import annotations

import dataclasses
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
        weights: Backbone weights: ``"pretrained"``, a file, or ``None`` for random init
            (the starting point of the source stage when ``pretrain`` is set).
        pretrain: Source dataset the backbone is first trained on (standard training,
            ``out/pretrain``); its weights start every method. ``None``: start from
            ``weights``.
        pretrain_root: The source dataset's folder; ``None`` = its default location.
        pretrain_epochs: Epochs of the source stage.
        pretrain_per_class: Source images per class.
        pretrain_lr: Learning rate of the source stage.
        dataset: Target dataset name (``adafilter.data``).
        data_root: Dataset folder; ``None`` uses the dataset's default location.
        methods: Methods compared (``adafilter.methods``).
        epochs: Epochs per method.
        milestones: Epochs after which the learning rates drop 10x.
        resolution: Input size in pixels.
        augment: Training augmentation of every stage (``TrainConfig.augment``): the CIFAR
            recipe by default, which at 28 px keeps each garment whole (RandomResizedCrop's
            small crops left the demo underfit and its accuracies ~4 points apart between
            thread counts; README, *Demo*).
        eval_every: Evaluate after epoch 1, every N epochs and the last (an evaluation with
            calibrated BN costs ~40% of an AdaFilter epoch here).
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
    backbone: str = "cifar-resnet20"
    weights: str | None = None
    pretrain: str | None = "fashion-mnist"
    pretrain_root: str | None = None
    pretrain_epochs: int = 3
    pretrain_per_class: int = 500
    pretrain_lr: float = 0.05
    dataset: str = "fashion-mnist-negatives"
    data_root: str | None = None
    methods: list[str] = field(default_factory=lambda: ["finetune", "adafilter"])
    epochs: int = 9
    milestones: list[int] = field(default_factory=lambda: [7])
    eval_every: int = 3
    resolution: int = 28
    augment: str = "pad-crop"
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
    from .report import make_report
    from .training.fit import fit

    out = Path(config.out)
    if not config.methods:
        raise AdaFilterError("no methods to run; pass e.g. methods=finetune,adafilter")
    runs: dict[str, Any] = {}
    done: list[str] = []
    current = "pretrain"
    try:
        weights = _pretrained_weights(config, out)
        for method in config.methods:
            current = method
            run_dir = out / "runs" / method
            if _completed(run_dir, config.epochs):
                runs[method] = json.loads((run_dir / "summary.json").read_text())
                done.append(method)
                _say(config, f"[demo] {method}: already complete in {run_dir}, reusing it")
                continue
            _say(config, f"[demo] training {method} -> {run_dir}")
            train_cfg = _train_config(config, method, run_dir, weights)
            runs[method] = fit(train_cfg)
            done.append(method)
    except KeyboardInterrupt:
        left = [m for m in config.methods if m not in done]
        print(
            f"\n[demo] interrupted during {current!r}. Complete: {', '.join(done) or 'none'}; "
            f"not complete: {', '.join(left)}. Run it again with the same output folder "
            f"({config.out}) to resume from the last finished epoch.",
            file=sys.stderr,
        )
        raise
    report = make_report([out / "runs"], out / "report", title="AdaFilter demo")
    return {"runs": runs, "report": report}


def _train_config(config: DemoConfig, method: str, run_dir: Path, weights: str | None) -> Any:
    from .training.config import TrainConfig

    return TrainConfig(
        method=method,
        dataset=config.dataset,
        data_root=config.data_root or "",
        backbone=config.backbone,
        weights=weights,
        out=str(run_dir),
        epochs=config.epochs,
        milestones=list(config.milestones),
        eval_every=config.eval_every,
        resolution=config.resolution,
        augment=config.augment,
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


def _pretrained_weights(config: DemoConfig, out: Path) -> str | None:
    """The source stage: train the backbone on ``config.pretrain``; its weights file.

    Returns ``config.weights`` unchanged when there is no source stage. The stage is a plain
    fine-tuning run in ``out/pretrain`` (resumable like the others), exported to
    ``out/pretrain/pretrained.pt``; the methods then load it as their backbone weights (with a
    fresh classifier, as for any pretrained network).
    """
    from .deploy import export_run
    from .training.fit import fit

    if not config.pretrain:
        return config.weights
    run_dir = out / "pretrain"
    exported = run_dir / "pretrained.pt"
    if exported.exists() and _completed(run_dir, config.pretrain_epochs):
        _say(config, f"[demo] pretrain: already complete in {run_dir}, reusing it")
        return str(exported)
    _say(config, f"[demo] pretraining {config.backbone} on {config.pretrain} -> {run_dir}")
    source = dataclasses.replace(  # the methods' settings, on the source data and schedule
        _train_config(config, "finetune", run_dir, config.weights),
        dataset=config.pretrain,
        data_root=config.pretrain_root or "",
        epochs=config.pretrain_epochs,
        milestones=[max(1, config.pretrain_epochs - 1)],
        batch_size=64,
        subset_per_class=config.pretrain_per_class,
        eval_every=config.pretrain_epochs,  # only the final epoch is evaluated
        lr=config.pretrain_lr,
    )
    fit(source)
    export_run(run_dir, exported, format="torch")
    return str(exported)


def _say(config: DemoConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"finetune,adafilter"`` -> ``["finetune", "adafilter"]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [m.strip() for m in items if m.strip()]
