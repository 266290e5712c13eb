"""The run directory: every file a run writes, and the checks before it writes any.

``config.json`` (at the start), then after every epoch, checkpoint first so the result files
never get ahead of what ``resume=True`` restores: ``checkpoint.pt``, ``metrics.jsonl``,
``policy.json`` (methods with policies) and ``summary.json``; all through the one atomic writer.
A full or read-only disk stops the run with one :class:`~adafilter.errors.WriteError` line; the
files written before stay as they were, so ``resume=True`` continues once there is room.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import AdaFilterError, CheckpointError, WriteError
from ..utils.io import atomic_write_json, atomic_write_jsonl, ensure_dir
from .config import TrainConfig

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "RESUME_KEYS",
    "RunDir",
    "check_resume",
    "load_model_state",
    "policy_json",
]

# Settings a resumed run may change: where files are, how long it runs, how it computes.
# config.json and summary.json record their new values, which are the ones in effect.
MAY_CHANGE_ON_RESUME = (
    "out",
    "data_root",
    "epochs",
    "workers",
    "device",
    "amp",
    "channels_last",
    "cuda_graphs",
    "compile",
    "compile_backend",
    "eval_every",
    "checkpoint_every",
    "download",
    "quiet",
    "tensorboard",
    "resume",
)
# Keys of a checkpoint's config that must match for resume: every other setting (model, data,
# optimizer, schedule, augmentation, precise BN), since the checkpoint's state was made by them.
RESUME_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name not in MAY_CHANGE_ON_RESUME)


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
        """``config.json`` (creating the directory)."""
        with self._room():
            ensure_dir(self.path)
            atomic_write_json(self.path / "config.json", config.to_dict())

    @contextlib.contextmanager
    def _room(self) -> Iterator[None]:
        """A :class:`WriteError` gets what was kept and how to go on added to its line."""
        try:
            yield
        except WriteError as e:
            kept = (
                f"the last checkpoint {str(self.checkpoint)!r} is intact"
                if self.checkpoint.exists()
                else "no checkpoint was written yet"
            )
            raise WriteError(
                f"{e}; {kept}: make room (or make the directory writable) and rerun with "
                "resume=True",
                path=e.path,
                errno=e.errno,
            ) from None

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
        with self._room():
            save_checkpoint(self.checkpoint, state)
            atomic_write_jsonl(self.path / "metrics.jsonl", metrics)
            if policy is not None:
                atomic_write_json(self.path / "policy.json", policy_json(policy, class_names))
            atomic_write_json(self.path / "summary.json", summary)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``."""
        with self._room():
            atomic_write_json(self.path / "summary.json", summary)

    def recorded_policy(self) -> dict[str, Any] | None:
        """The final evaluation's ``{"overall": ...}`` of a finished run, if recorded."""
        path = self.path / "policy.json"
        if not path.exists():
            return None
        with open(path, encoding="utf-8") as f:
            return {"overall": json.load(f)["overall"]}


def check_resume(ckpt: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Raise :class:`CheckpointError` when ``ckpt`` was made with other settings.

    Every setting but :data:`MAY_CHANGE_ON_RESUME` must match: the checkpoint's weights,
    optimizer state (learning rates, momentum, weight decay) and schedule were made by the
    recorded values, and a resumed run continues with those, never a silent mix.
    """
    old = ckpt.get("config") or {}
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(config, key):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is from another run: {key} {old[key]!r} there, "
                f"{getattr(config, key)!r} now; resume=True continues a run with its recorded "
                f"settings: pass {key}={old[key]!r} or use another out="
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
