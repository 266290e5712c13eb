"""The per-epoch loops: :func:`train_one_epoch`, :func:`evaluate` and precise BN.

They take explicit arguments and return plain dicts; nothing here knows about run
directories, configs or a particular method.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.base import DROPPED_LABEL
from ..distributed import DistEnv, all_reduce_sum
from ..errors import AdaFilterError
from .divergence import explain_divergence
from .policy_stats import PolicyStats
from .precise_bn import recalibrate_bn

__all__ = ["EpochState", "GraphedForward", "evaluate", "recalibrate", "train_one_epoch"]


@dataclass
class EpochState:
    """Where a training epoch stands on this rank (what a mid-epoch checkpoint records).

    Attributes:
        step: Optimizer steps done in this epoch.
        sums: ``[loss * n, correct, n]`` over those steps' batches (float64).
        seconds: Training time spent on them.
    """

    step: int
    sums: Tensor
    seconds: float = 0.0


def _autocast(device: torch.device, amp_dtype: torch.dtype | None, cache: bool = True) -> Any:
    if amp_dtype is None:
        return contextlib.nullcontext()
    # CUDA graphs need the cast cache off (a cached cast would outlive the captured step)
    return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=cache)


class GraphedForward:
    """A model's training forward (and its backward) replayed as CUDA graphs.

    The first batch captures the graphs (``torch.cuda.make_graphed_callables``); later batches
    of the same shape replay them, which removes the per-operation launch cost that bounds
    an eager AdaFilter step on a GPU (measured in ``benchmarks/speed.py``). Batches of another
    shape (a short last batch) and eval mode run the model eagerly. Capturing runs a few
    warm-up steps; the model's buffers (BN running statistics) are restored afterwards, so
    capture changes no state. Nothing in the forward may be decided on the host per step
    (``Method.graph_capturable``).

    Args:
        module: The model (not DDP-wrapped), on a CUDA device.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._graphed: Callable[[Tensor], Tensor] | None = None
        self._key: tuple | None = None

    @staticmethod
    def _signature(x: Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, x.stride(), torch.is_autocast_enabled())

    def __call__(self, images: Tensor) -> Tensor:
        if not self.module.training:
            return self.module(images)
        if self._graphed is None:
            self._capture(images)
        if self._signature(images) != self._key:
            return self.module(images)
        assert self._graphed is not None
        return self._graphed(images)

    def _capture(self, images: Tensor) -> None:
        m = self.module
        saved = {k: v.clone() for k, v in m.named_buffers()}
        torch.cuda.synchronize(images.device)
        returned = torch.cuda.make_graphed_callables(m, (images,))
        # For a module the graphed forward is installed as ``m.forward``; keep it here and
        # give the module its own forward back (eager calls, eval, checkpoints stay as they are).
        graphed = m.__dict__.pop("forward", None) or returned
        with torch.no_grad():
            for k, v in m.named_buffers():
                v.copy_(saved[k])
        self._graphed = graphed
        self._key = self._signature(images)


def _progress(iterable: Any, *, enabled: bool, desc: str, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    regularizer: Callable[[nn.Module], Tensor] | None = None,
    regularized_module: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    env: DistEnv | None = None,
    progress: bool = False,
    graphed: GraphedForward | None = None,
    after_backward: Callable[[], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    resume_from: EpochState | None = None,
    on_resumed: Callable[[], None] | None = None,
    after_step: Callable[[EpochState], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` with cross-entropy (+ ``regularizer``) and SGD steps.

    Args:
        model: The model to train (possibly DDP-wrapped); put in train mode here.
        loader: Batches ``(images, labels)``.
        optimizer: The optimizer.
        device: Where to compute.
        epoch: 1-based epoch (progress bar, ``on_step``).
        regularizer: Extra loss ``regularizer(module)``, e.g. L2-SP.
        regularized_module: The module passed to ``regularizer`` (the unwrapped model).
        scaler: A GradScaler for fp16 autocast.
        amp_dtype: Autocast dtype, ``None`` for full precision.
        channels_last: Convert inputs to channels-last.
        env: The DDP environment; loss/accuracy are summed over ranks.
        progress: Show a tqdm bar.
        graphed: Run the forward through this CUDA-graph wrapper of ``model``.
        after_backward: Called after each backward, before the optimizer step (telemetry).
        on_step: Called as ``on_step(epoch, step)`` after each optimizer step (1-based step),
            e.g. to stop a process mid-epoch in a resume test.
        resume_from: Continue an epoch after ``resume_from.step`` steps: those batches are
            drawn (so the loader and its workers are where the interrupted run was) and
            dropped, then ``on_resumed()`` restores the rest of the state (the RNGs) before
            the next batch is drawn.
        on_resumed: See ``resume_from``.
        after_step: Called with the epoch's :class:`EpochState` after each step (and after
            ``on_step``): checkpoints inside the epoch, stop requests.

    Returns:
        ``{"loss", "acc", "images", "steps", "seconds", "images_per_second"}``: mean cross-entropy
        (without the regularizer) and accuracy in percent over all ranks' images.
    """
    env = env or DistEnv()
    model.train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
    step, before = 0, 0.0
    batches = _guarded(iter(loader))
    if resume_from is not None:
        step, before = resume_from.step, resume_from.seconds
        sums.copy_(resume_from.sums)
        for _ in range(step):
            next(batches)
        if on_resumed is not None:
            on_resumed()
    start, first = time.perf_counter(), step + 1
    for step, (images, labels) in enumerate(
        _progress(batches, enabled=progress, desc=f"train {epoch}"), start=first
    ):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype, cache=graphed is None):
            logits = (graphed or model)(images)
            loss = F.cross_entropy(logits, labels)
        total = loss.float()
        if regularizer is not None:
            total = total + regularizer(regularized_module or model)
        if not math.isfinite(total.item()):
            net, batch = regularized_module or model, images
            why = explain_divergence(net, lambda: net(batch), total.item())  # noqa: B023
            raise AdaFilterError(f"training diverged at epoch {epoch} step {step}: {why}")
        _step(total, optimizer, scaler=scaler, after_backward=after_backward)
        sums += _batch_sums(loss, logits, labels)
        if on_step is not None:
            on_step(epoch, step)
        if after_step is not None:
            after_step(EpochState(step, sums, before + time.perf_counter() - start))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _epoch_stats(sums, steps=step, seconds=before + time.perf_counter() - start, env=env)


def _guarded(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, with a failure while a DataLoader worker lies dead reported as such.

    A worker killed (``kill -9``, the out-of-memory killer) while it hands a batch over
    surfaces as a broken connection; name the dead worker instead.
    """
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (RuntimeError, OSError, EOFError) as e:
            dead = _dead_workers(getattr(batches, "_workers", None) or [])
            if not dead:
                raise
            raise RuntimeError(
                f"DataLoader worker ({', '.join(dead)}) exited unexpectedly: {type(e).__name__}"
            ) from None
        yield batch


def _dead_workers(workers: list[Any], wait: float = 2.0) -> list[str]:
    """The DataLoader workers that died (a worker dying is seen a moment after its pipes)."""
    deadline = time.monotonic() + wait
    while workers:
        dead = [f"pid {w.pid} exit {w.exitcode}" for w in workers if not w.is_alive()]
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)
    return []


def _batch_sums(loss: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """``[loss * n, correct, n]`` of one batch (float64, on the batch's device)."""
    n = labels.shape[0]
    return torch.stack(
        [
            loss.detach().double() * n,
            (logits.detach().argmax(1) == labels).sum().double(),
            torch.tensor(float(n), dtype=torch.float64, device=labels.device),
        ]
    )


def _epoch_stats(sums: Tensor, *, steps: int, seconds: float, env: DistEnv) -> dict[str, float]:
    """The epoch's mean loss, accuracy and throughput over all ranks (``sums`` reduced here)."""
    all_reduce_sum(sums, env)
    loss_sum, correct, count = sums.tolist()
    count = max(count, 1.0)
    return {
        "loss": loss_sum / count,
        "acc": 100.0 * correct / count,
        "images": int(count),
        "steps": steps,
        "seconds": seconds,
        "images_per_second": count / max(seconds, 1e-9),
    }


def _step(
    total: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None,
    after_backward: Callable[[], None] | None,
) -> None:
    """Backward and one optimizer step (through the GradScaler for fp16)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        if after_backward is not None:
            after_backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    policy_stats: PolicyStats | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    env: DistEnv | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and accuracy over ``loader`` (exact under DDP: each rank sees a disjoint shard).

    Rows labelled ``DROPPED_LABEL`` (unreadable evaluation images, see
    :func:`adafilter.data.base.collate_dropping`) are left out and counted.

    Args:
        model: The (unwrapped) model; put in eval mode here.
        loader: Batches ``(images, labels)``.
        device: Where to compute.
        policy_stats: Accumulates the policies per class (from the method; ``None``: none).
        amp_dtype: Autocast dtype, ``None`` for full precision.
        channels_last: Convert inputs to channels-last.
        env: The DDP environment; sums are all-reduced.
        progress: Show a tqdm bar.

    Returns:
        ``{"loss", "acc", "images", "dropped"}`` plus, with ``policy_stats``, ``"policy"``:
        ``{"layers", "out_channels", "overall", "per_class_fraction", "per_class_count"}``.
    """
    env = env or DistEnv()
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, n, dropped
    dropped = 0
    for images, labels in _progress(_guarded(iter(loader)), enabled=progress, desc="eval"):
        keep = labels != DROPPED_LABEL  # on the host: no device sync
        if not bool(keep.all()):
            dropped += int((~keep).sum())
            if not bool(keep.any()):
                continue
            images, labels = images[keep], labels[keep]
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        n = labels.shape[0]
        sums[:3] += torch.stack(
            [
                loss.double(),
                (logits.argmax(1) == labels).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ]
        )
        if policy_stats is not None:
            policy_stats.update(labels)
    sums[3] += dropped
    all_reduce_sum(sums, env)
    loss_sum, correct, count, dropped_all = sums.tolist()
    out: dict[str, Any] = {
        "loss": loss_sum / max(count, 1.0),
        "acc": 100.0 * correct / max(count, 1.0),
        "images": int(count),
        "dropped": int(dropped_all),
    }
    if policy_stats is not None:
        out["policy"] = policy_stats.result(env)
    return out


def recalibrate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    env: DistEnv | None = None,
) -> int:
    """Precise BN over ``loader``'s images (see :func:`.training.precise_bn.recalibrate_bn`).

    Returns:
        The number of BN modules recomputed.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    class Batches:  # re-iterable: precise BN may need a second pass
        def __iter__(self) -> Iterator[Tensor]:
            for images, _ in loader:
                yield images.to(device, non_blocking=True).contiguous(memory_format=memory_format)

    def forward(x: Tensor) -> Any:
        with _autocast(device, amp_dtype):
            return model(x)

    # Calibrate with the evaluation's policies: no exploration noise.
    quiet_gate = getattr(model, "without_gate_noise", contextlib.nullcontext)
    with quiet_gate():
        return recalibrate_bn(model, Batches(), forward=forward, env=env)
