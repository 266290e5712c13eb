"""TensorBoard event files for a training run (``TrainConfig.tensorboard``; optional extra).

One point per epoch: the losses and accuracies, both learning rates, each gated layer's share
of fine-tuned filters on the telemetry's fixed probe batch and the gate's decision-change rate
between epochs. ``tensorboard --logdir OUT/tensorboard`` shows them while the run goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AdaFilterError

__all__ = ["TensorBoardLog"]

# metrics.jsonl field -> TensorBoard tag
_SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "test_loss": "loss/test",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "test_acc": "accuracy/test",
    "lr": "lr/network",
    "gate_lr": "lr/gate",
    "images_per_second": "speed/train_images_per_second",
}


class TensorBoardLog:
    """Writes each epoch's metrics row as TensorBoard scalars (rank 0 only).

    Args:
        path: The event files' directory (``<out>/tensorboard``).
        layers: The gated layers' names in the order of the telemetry's per-layer lists.

    Raises:
        AdaFilterError: The ``tensorboard`` package is not installed.
    """

    def __init__(self, path: str | Path, layers: list[str] | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise AdaFilterError(
                "tensorboard=True needs the tensorboard package: "
                "pip install 'adafilter[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(log_dir=str(path))
        self.layers = list(layers or [])

    def log(self, row: dict[str, Any]) -> None:
        """Add one epoch's ``metrics.jsonl`` row (``row["epoch"]`` is the step)."""
        epoch = int(row["epoch"])
        for key, tag in _SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), epoch)
        gate = row.get("gate") or {}
        if gate.get("changed") is not None:
            self.writer.add_scalar("gate/decision_change_rate", float(gate["changed"]), epoch)
        shares = gate.get("fraction_finetuned") or []
        for name, share in zip(self.layers, shares, strict=False):
            self.writer.add_scalar(f"f_share/{name}", float(share), epoch)
        if shares:
            self.writer.add_scalar("gate/f_share_mean", sum(shares) / len(shares), epoch)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
