"""Thin DDP helpers: process-group setup from torchrun's environment, exact sharded eval.

Single-process runs never touch ``torch.distributed``; with ``WORLD_SIZE > 1`` (torchrun,
single or multi node) the group is initialised with NCCL on CUDA and Gloo on CPU; the
environment variable ``ADAFILTER_DIST_BACKEND`` overrides that choice (e.g. ``gloo`` to run
several ranks on one GPU, which NCCL refuses).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import AdaFilterError

BACKEND_ENV = "ADAFILTER_DIST_BACKEND"
BACKENDS = ("nccl", "gloo", "mpi", "ucc")
_created = False  # whether init_distributed created the default process group


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank (0 in single-process runs).
        world_size: Number of processes.
        local_rank: Rank on this node (selects the CUDA device).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ() -> DistEnv:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (defaults: one process)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: torch.device) -> DistEnv:
    """Initialise the default process group when launched with ``WORLD_SIZE > 1``.

    Args:
        device: The device this process trains on; CUDA selects NCCL, anything else Gloo.

    Returns:
        The process's :class:`DistEnv`.
    """
    env = env_from_environ()
    if env.enabled and not dist.is_initialized():
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
        if backend not in BACKENDS:
            raise AdaFilterError(
                f"{BACKEND_ENV}={backend!r} is not a process-group backend; "
                f"use one of {', '.join(BACKENDS)} or unset it"
            )
        global _created
        _created = True
        store = _restart_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(
                backend=backend, store=store, rank=env.rank, world_size=env.world_size
            )
    return env


def _restart_store() -> dist.Store | None:
    """After a torchrun restart (``--max-restarts``): the agent's store under a prefix of its own.

    The agent keeps its store across restarts, so without a prefix a restarted group would
    read the previous attempt's addresses and fail to connect (seen with Gloo).
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )
    return dist.PrefixStore(f"adafilter/restart_{restart}", client)


def cleanup_distributed() -> None:
    """Destroy the default process group if :func:`init_distributed` created it (a group the
    caller created before is the caller's, and stays)."""
    global _created
    if _created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _created = False


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (no-op for one process) and return it."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    """Wait for all ranks (no-op for one process)."""
    if env.enabled:
        dist.barrier()


def all_gather_object(obj: object, env: DistEnv) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not env.enabled:
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every example on exactly one rank, no padding.

    ``DistributedSampler`` pads the last shard with repeated examples, which would count them
    twice in the evaluation metrics; this sampler keeps evaluation exact.
    """

    def __init__(self, num_samples: int, *, rank: int, world_size: int) -> None:
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))
