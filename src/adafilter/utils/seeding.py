"""The one seeding helper: derived seeds and seeding Python, numpy and torch together."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "preserved_rng", "seed_epoch", "seed_everything"]


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


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Give the caller's Python, numpy and torch RNG states back after the block.

    CUDA generators are restored when CUDA was in use before; when the block started CUDA,
    they are reseeded with the caller's torch seed, the state they would have had.
    """
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_before = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if cuda_before else None
    seed = torch.initial_seed()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)
