"""The run directory: every file a run writes, and the checks before it writes any.

``config.json`` (at the start), then after every epoch, checkpoint first so the result files
never get ahead of what ``resume=True`` restores: ``checkpoint.pt``, ``metrics.jsonl``,
``policy.json`` (methods with policies) and ``summary.json``; all through the one atomic writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import AdaFilterError, CheckpointError
from ..utils.io import atomic_write_json, atomic_write_jsonl
from .config import TrainConfig

__all__ = ["RESUME_KEYS", "RunDir", "check_resume", "load_model_state", "policy_json"]

# Keys of a checkpoint's config that must match for resume (they define model and data).
RESUME_KEYS = (
    "method",
    "dataset",
    "backbone",
    "resolution",
    "adafilter",
    "gate_backbone",
    "subset_per_class",
    "train_per_class",
    "val_fraction",
    "seed",
)


class RunDir:
    """A run's output directory.

    Args:
        path: The directory (``TrainConfig.out``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint.pt"

    def open(self, config: TrainConfig) -> dict[str, Any] | None:
        """Check the directory before anything is written; the checkpoint to resume from.

        Raises:
            AdaFilterError: It holds a run and ``config.resume`` is off.
            CheckpointError: The checkpoint is unreadable or from another run.
        """
        if config.resume and self.checkpoint.exists():
            ckpt = load_checkpoint(self.checkpoint)
            check_resume(ckpt, config, self.checkpoint)
            return ckpt
        if not config.resume and (
            self.checkpoint.exists() or (self.path / "metrics.jsonl").exists()
        ):
            raise AdaFilterError(
                f"output directory {str(self.path)!r} already holds a run; pass resume=True to "
                "continue it or choose another out="
            )
        return None

    def write_config(self, config: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / "config.json", config.to_dict())

    def write_epoch(
        self,
        state: dict[str, Any],
        *,
        metrics: list[dict[str, Any]],
        policy: dict[str, Any] | None,
        class_names: list[str],
        summary: dict[str, Any],
    ) -> None:
        """The checkpoint first, then ``metrics.jsonl``, ``policy.json``, ``summary.json``."""
        save_checkpoint(self.checkpoint, state)
        atomic_write_jsonl(self.path / "metrics.jsonl", metrics)
        if policy is not None:
            atomic_write_json(self.path / "policy.json", policy_json(policy, class_names))
        self.write_summary(summary)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def recorded_policy(self) -> dict[str, Any] | None:
        """The final evaluation's ``{"overall": ...}`` of a finished run, if recorded."""
        path = self.path / "policy.json"
        if not path.exists():
            return None
        with open(path, encoding="utf-8") as f:
            return {"overall": json.load(f)["overall"]}


def check_resume(ckpt: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Raise :class:`CheckpointError` when ``ckpt`` is from a run with other model/data keys."""
    old = ckpt.get("config") or {}
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(config, key):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is from another run: {key} {old[key]!r} there, "
                f"{getattr(config, key)!r} now; use another out= or the same options"
            )


def load_model_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Load a checkpoint's model state strictly, or raise a one-line :class:`CheckpointError`."""
    from ..backbones.weights import compare_keys

    diff = compare_keys(model.state_dict(), state)
    if diff:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match this model ({diff.counts()})"
        )
    model.load_state_dict(state)


def policy_json(policy: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """``policy.json``'s content from an evaluation's ``"policy"`` entry."""
    return {
        "layers": policy["layers"],
        "out_channels": policy["out_channels"],
        "overall": policy["overall"],
        "per_class": {
            "class_names": list(class_names),
            "fraction": policy["per_class_fraction"],
            "count": policy["per_class_count"],
        },
    }
