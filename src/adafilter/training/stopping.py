"""Stopping a run cleanly: preemption signals, stops agreed by every rank, failures named.

Cluster schedulers announce preemption with ``SIGTERM`` or ``SIGUSR1`` (SLURM's ``--signal``)
and kill the job after a grace period; a user presses Ctrl-C (``SIGINT``). While
:func:`stop_on_signals` is active, such a signal only records a request; training finishes
its current step, every rank agrees to stop at the same step (:meth:`StopRequest.agreed`),
rank 0 writes a checkpoint and :class:`TrainingStopped` is raised. A second signal acts as it
would without us (the handlers in place before are back by then).

The library is a guest in the caller's process: handlers are installed only for the duration
of training, only from the main thread (elsewhere nothing is installed), and the previous
ones are restored afterwards, also on errors.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import DistEnv
from ..errors import AdaFilterError

__all__ = [
    "STOP_SIGNALS",
    "StopRequest",
    "TrainingStopped",
    "explain_failures",
    "ignore_stop_signals",
    "stop_on_signals",
]

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name)
)


class TrainingStopped(KeyboardInterrupt):
    """Training stopped at a signal after writing a checkpoint; ``resume=True`` continues.

    A :class:`KeyboardInterrupt`, so code that handles Ctrl-C handles it too.

    Attributes:
        signum: The signal that asked to stop.
        main: Whether this process is rank 0 (the one that reports it).
    """

    def __init__(self, message: str, *, signum: int, main: bool = True) -> None:
        super().__init__(message)
        self.signum = signum
        self.main = main

    def __str__(self) -> str:
        return str(self.args[0])


class StopRequest:
    """The signal (if any) that asked this process to stop."""

    def __init__(self) -> None:
        self.signum = 0

    def agreed(self, env: DistEnv, device: torch.device) -> int:
        """The stop signal any rank received (0: none); a collective under DDP.

        Every rank must call it at the same point (each step, each epoch end), so all ranks
        stop at the same step.
        """
        if not env.enabled:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record :data:`STOP_SIGNALS` in a :class:`StopRequest` instead of dying, for the block.

    Outside the main thread nothing is installed (the request then never fires).
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        previous.clear()

    def record(signum: int, frame: Any) -> None:
        request.signum = request.signum or signum
        restore()  # a second signal acts as it would without us

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, record)
    try:
        yield request
    finally:
        restore()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave stop signals to the training process.

    A scheduler signals every process of a job; a worker that died of it would turn a clean
    stop into a "DataLoader worker exited unexpectedly" error. The training process shuts
    its workers down itself.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo")


@contextlib.contextmanager
def explain_failures(env: DistEnv, where: list[int]) -> Iterator[None]:
    """Turn a dead DataLoader worker or a dead DDP rank into one-line errors.

    Args:
        env: The DDP environment.
        where: ``[epoch]`` as training goes (read when a failure is reported).
    """
    try:
        yield
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        text = str(e).lower()
        resume = "the last checkpoint is intact: rerun with resume=True to continue"
        if "dataloader worker" in text:
            raise AdaFilterError(
                f"a DataLoader worker died in epoch {where[0]} ({first}); out of memory is the "
                f"usual cause: lower workers= or batch_size=; {resume}"
            ) from None
        dist_error = getattr(dist, "DistBackendError", ())
        if env.enabled and (isinstance(e, dist_error) or any(s in text for s in _PEER_LOST)):
            raise AdaFilterError(
                f"rank {env.rank} lost another process of the job in epoch {where[0]} "
                f"({first}); a worker died (killed, out of memory?); {resume} (torchrun "
                "--max-restarts does it automatically)"
            ) from None
        raise
