"""Safe (``weights_only``) training checkpoints, written with the one atomic writer.

Every file a run writes goes through :func:`adafilter.utils.io.atomic_write_bytes` (re-exported
here), so a ``kill -9`` at any moment leaves either the old file or the new one.

Checkpoints hold only tensors, dicts, lists, numbers, strings, bools and ``None`` so that
``torch.load(..., weights_only=True)`` can read them: loading never runs pickled code.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .utils.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_text",
    "check_checkpoint",
    "get_rng_state",
    "load_checkpoint",
    "read_weights_only",
    "save_checkpoint",
    "scheduler_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "adafilter-checkpoint"
CHECKPOINT_VERSION = 1


# ---- RNG state ------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as weights-only-loadable objects."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        # only where this process already uses CUDA: reading it would create a CUDA context
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`get_rng_state` (CUDA only where this process already
    uses CUDA and the device count fits: CPU work leaves CUDA alone)."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_initialized() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Serialise ``payload`` (plus format tags) and write it to ``path`` atomically.

    Args:
        path: Destination, typically ``<out>/checkpoint.pt``.
        payload: Only tensors, containers, numbers, strings, bools and ``None``.
    """
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an adafilter checkpoint with ``weights_only=True`` on the CPU.

    Args:
        path: A file written by :func:`save_checkpoint`.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: The file is missing, unreadable, not weights-only or not ours.
    """
    path = Path(path)
    return check_checkpoint(read_weights_only(path), path)


def read_weights_only(path: str | os.PathLike[str], *, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, failing with one-line errors.

    Args:
        path: A file written by ``torch.save``.
        what: How messages name the file (``"checkpoint"``, ``"model file"``).

    Returns:
        The loaded object (not yet checked to be ours).

    Raises:
        CheckpointError: The file is missing, unreadable or not weights-only.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or pickled code refused by weights_only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read {what} {str(path)!r} safely (weights_only): {first}"
        ) from None


def check_checkpoint(obj: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """``obj`` (loaded from ``path``) if it is an adafilter checkpoint this version reads.

    Raises:
        CheckpointError: Another kind of file, or a newer format version.
    """
    path = Path(path)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not an adafilter training checkpoint "
            "(expected the checkpoint.pt written by `adafilter train`)"
        )
    if int(obj.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {obj.get('version')}; "
            f"this adafilter reads up to {CHECKPOINT_VERSION}"
        )
    return obj


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The scheduler's state without ``MultiStepLR.milestones`` (a ``Counter``, which
    ``weights_only`` refuses); the rebuilt scheduler keeps its own milestones on load."""
    state = dict(scheduler.state_dict())
    state.pop("milestones", None)
    return state
