"""The one seeding helper: derived seeds and seeding Python, numpy and torch together."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_epoch", "seed_everything"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. ``(seed, epoch, rank)``), stable across runs."""
    ints = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts]
    state = np.random.SeedSequence([abs(int(v)) for v in ints]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed everything from ``(seed, epoch, rank)``: a resumed epoch replays the same draws."""
    seed_everything(derive_seed(seed, epoch, rank, "global"))
