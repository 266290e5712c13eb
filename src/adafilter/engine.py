"""Training engine: ``train_one_epoch``, ``evaluate`` and ``fit`` (MAE-style main/engine split).

Nothing here sees argparse: :func:`fit` takes a :class:`~adafilter.train_config.TrainConfig`,
the per-epoch functions take explicit arguments, and all of them return plain dicts.

Reproducibility and resume. Each epoch reseeds Python, numpy and torch from
``(seed, epoch, rank)``, shuffles with a generator seeded the same way (``DistributedSampler``
with ``set_epoch`` under DDP) and, for ``random-policy``, reseeds the policy generator. A run
resumed from the checkpoint of epoch ``e`` therefore replays epochs ``e+1...`` exactly as the
uninterrupted run does; remaining differences can only come from nondeterministic kernels
(cuDNN autotuning/atomics on GPUs, DataLoader worker scheduling never affects order). The
checkpoint also stores and restores the RNG states themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from .checkpoint import (
    atomic_write_json,
    atomic_write_jsonl,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    scheduler_state,
    set_rng_state,
)
from .distributed import (
    DistEnv,
    ShardSampler,
    all_reduce_sum,
    cleanup_distributed,
    env_from_environ,
    init_distributed,
)
from .errors import AdaFilterError, CheckpointError
from .methods import METHODS, Method, Prepared, derive_seed, trainable_per_example
from .model import log_param_groups
from .train_config import TrainConfig
from .training.optim import build_optimizer
from .training.precise_bn import recalibrate_bn, set_bn_momentum
from .training.telemetry import GateTelemetry

logger = logging.getLogger("adafilter")

__all__ = [
    "TrainConfig",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "train_one_epoch",
]

# Testing hook: "E:S" makes the process SIGKILL itself after S optimizer steps of epoch E,
# a faithful `kill -9` mid-epoch for the resume tests.
KILL_ENV = "ADAFILTER_TEST_KILL_AT"
# Keys of a checkpoint's config that must match for --resume (they define model and data).
_RESUME_KEYS = (
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


# ---- optimizer and schedule -----------------------------------------------------------------


def build_param_groups(
    prepared: Prepared, *, lr: float, gate_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for ``prepared`` (the method decides), sizes logged.

    Args:
        prepared: A built model.
        lr: Network learning rate.
        gate_lr: Gate learning rate (methods with a trained gate).
        weight_decay: Weight decay where the method applies one.

    Returns:
        ``[{"name", "params", "lr", "weight_decay"}, ...]``, empty groups dropped.
    """
    groups = prepared.method.param_groups(
        prepared, lr=lr, gate_lr=gate_lr, weight_decay=weight_decay
    )
    groups = [g for g in groups if g["params"]]
    if not prepared.method.logs_param_groups:
        log_param_groups(groups)
    return groups


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, milestones: Iterable[int], gamma: float = 0.1
) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply every group's lr by ``gamma`` after each milestone epoch.

    Stepped once per epoch, so with milestones 30, 60, 90 epochs 1-30 run at the initial lr,
    31-60 at 0.1x, 61-90 at 0.01x and 91+ at 0.001x -- every decay, for every group.
    """
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(int(m) for m in milestones), gamma=gamma
    )


def group_lr(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    """Current lr of the group called ``name`` (``None`` if there is none)."""
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return float(g["lr"])
    return None


# ---- per-epoch loops ------------------------------------------------------------------------


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


def _kill_point() -> tuple[int, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    e, s = spec.split(":")
    return int(e), int(s)


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
) -> dict[str, float]:
    """One pass over ``loader`` with cross-entropy (+ ``regularizer``) and SGD steps.

    Args:
        model: The model to train (possibly DDP-wrapped); put in train mode here.
        loader: Batches ``(images, labels)``.
        optimizer: The optimizer.
        device: Where to compute.
        epoch: 1-based epoch (progress bar and the kill hook).
        regularizer: Extra loss ``regularizer(module)``, e.g. L2-SP.
        regularized_module: The module passed to ``regularizer`` (the unwrapped model).
        scaler: A GradScaler for fp16 autocast.
        amp_dtype: Autocast dtype, ``None`` for full precision.
        channels_last: Convert inputs to channels-last.
        env: The DDP environment; loss/accuracy are summed over ranks.
        progress: Show a tqdm bar.
        graphed: Run the forward through this CUDA-graph wrapper of ``model``.
        after_backward: Called after each backward, before the optimizer step (telemetry).

    Returns:
        ``{"loss", "acc", "images", "steps", "seconds", "images_per_second"}``: mean cross-entropy
        (without the regularizer) and accuracy in percent over all ranks' images.
    """
    env = env or DistEnv()
    model.train()
    kill = _kill_point()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
    start = time.perf_counter()
    step = 0
    for step, (images, labels) in enumerate(
        _progress(loader, enabled=progress, desc=f"train {epoch}"), start=1
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
            raise AdaFilterError(
                f"training diverged at epoch {epoch} step {step} (loss {total.item()}); "
                "lower --lr/--gate-lr or use --amp off"
            )
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
        n = labels.shape[0]
        sums += torch.stack(
            [
                loss.detach().double() * n,
                (logits.detach().argmax(1) == labels).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ]
        )
        if kill is not None and kill == (epoch, step):
            os.kill(os.getpid(), signal.SIGKILL)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    all_reduce_sum(sums, env)
    loss_sum, correct, count = sums.tolist()
    count = max(count, 1.0)
    return {
        "loss": loss_sum / count,
        "acc": 100.0 * correct / count,
        "images": int(count),
        "steps": step,
        "seconds": seconds,
        "images_per_second": count / max(seconds, 1e-9),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    num_classes: int,
    collect_policies: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    env: DistEnv | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and accuracy over ``loader`` (exact under DDP: each rank sees a disjoint shard).

    Args:
        model: The (unwrapped) model; put in eval mode here.
        loader: Batches ``(images, labels)``.
        device: Where to compute.
        num_classes: Number of classes (for per-class policy statistics).
        collect_policies: Accumulate ``model.policies`` (AdaFilter models) per class.
        amp_dtype: Autocast dtype, ``None`` for full precision.
        channels_last: Convert inputs to channels-last.
        env: The DDP environment; sums are all-reduced.
        progress: Show a tqdm bar.

    Returns:
        ``{"loss", "acc", "images"}`` plus, with ``collect_policies``, ``"policy"``:
        ``{"layers", "out_channels", "overall", "per_class_fraction", "per_class_count"}``.
    """
    env = env or DistEnv()
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    layers: list[str] = list(getattr(model, "gated_layer_names", [])) if collect_policies else []
    chosen = torch.zeros(num_classes, len(layers), dtype=torch.float64, device=device)
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for images, labels in _progress(loader, enabled=progress, desc="eval"):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        n = labels.shape[0]
        sums += torch.stack(
            [
                loss.double(),
                (logits.argmax(1) == labels).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ]
        )
        if layers:
            pol = model.policies
            counts = torch.stack([pol[name].sum(1) for name in layers], 1).double()  # (B, L)
            chosen.index_add_(0, labels, counts)
            per_class += torch.bincount(labels, minlength=num_classes).double()
    all_reduce_sum(sums, env)
    loss_sum, correct, count = sums.tolist()
    out: dict[str, Any] = {
        "loss": loss_sum / max(count, 1.0),
        "acc": 100.0 * correct / max(count, 1.0),
        "images": int(count),
    }
    if layers:
        all_reduce_sum(chosen, env)
        all_reduce_sum(per_class, env)
        channels = torch.tensor(model.layer_out_channels, dtype=torch.float64, device=device)
        overall = chosen.sum(0) / (per_class.sum().clamp(min=1) * channels)
        frac = chosen / (per_class[:, None].clamp(min=1) * channels[None, :])
        out["policy"] = {
            "layers": layers,
            "out_channels": [int(c) for c in model.layer_out_channels],
            "overall": overall.tolist(),
            "per_class_fraction": [
                row if n > 0 else None
                for row, n in zip(frac.tolist(), per_class.tolist(), strict=True)
            ],
            "per_class_count": [int(n) for n in per_class.tolist()],
        }
    return out


# ---- building a run -------------------------------------------------------------------------


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a device.

    Under DDP each rank takes ``cuda:LOCAL_RANK`` (modulo the GPUs present, so several ranks
    may share a GPU when the process group's backend allows it, e.g. Gloo).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AdaFilterError(f"--device {name} requested but CUDA is not available")
        if env.enabled or name == "cuda":
            index = env.local_rank % torch.cuda.device_count() if env.enabled else 0
            device = torch.device("cuda", index)
        else:
            device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise AdaFilterError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def _graphed_forward(
    config: TrainConfig, module: nn.Module, *, device: torch.device, env: DistEnv, method: Method
) -> GraphedForward | None:
    """The CUDA-graph wrapper when ``--cuda-graphs`` applies; otherwise warn why not."""
    if not config.cuda_graphs:
        return None
    why = None
    if device.type != "cuda":
        why = f"on {device}"
    elif env.enabled:
        why = "under DDP (several processes)"
    elif not method.graph_capturable:
        why = f"for {method.name} (its policies are drawn on the host every step)"
    if why:
        logger.warning("--cuda-graphs ignored %s; training eagerly", why)
        return None
    return GraphedForward(module)


def _compiled_model(
    config: TrainConfig, model: nn.Module, graphed: GraphedForward | None
) -> nn.Module:
    """``torch.compile(model)`` for ``--compile`` (the training forward and backward).

    AdaFilter models take their capturable path while traced, so they compile without graph
    breaks; a method whose policies come from a host generator (``random-policy``) still
    compiles, breaking the graph at each draw.
    """
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if config.compile_backend not in known:
        raise AdaFilterError(
            f"unknown --compile-backend {config.compile_backend!r}; use one of {', '.join(known)}"
        )
    if graphed is not None:
        logger.warning("--cuda-graphs ignored with --compile")
    return torch.compile(model, backend=config.compile_backend)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if device.type != "cuda":
        logger.warning("--amp %s ignored on %s (autocast is used on CUDA only)", amp, device)
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(
    config: TrainConfig, *, num_classes: int, pretrained: bool = True
) -> tuple[Prepared, Any]:
    """Backbone + method -> :class:`Prepared` (seeded by ``config.seed``).

    Args:
        config: The run's configuration.
        num_classes: Classes of the target dataset.
        pretrained: Load ``config.weights``/``config.gate_weights``; ``False`` when a
            checkpoint will overwrite every parameter anyway (``adafilter eval``).

    Returns:
        ``(prepared, backbone_info)``.
    """
    from .backbones import build_backbone, build_feature_extractor

    method: Method = METHODS.get(config.method)
    seed_everything(config.seed)
    network, info = build_backbone(
        config.backbone, num_classes=num_classes, weights=config.weights if pretrained else None
    )
    resolution = config.resolution or info.default_resolution
    example = torch.randn(2, 3, resolution, resolution)

    def gate_network() -> tuple[nn.Module, int]:
        return build_feature_extractor(
            config.gate_backbone, weights=config.gate_weights if pretrained else None
        )

    options = {
        "l2sp_alpha": config.l2sp_alpha,
        "l2sp_beta": config.l2sp_beta,
        "random_p": config.random_p,
        "adafilter": config.adafilter,
        "gate_backbone": config.gate_backbone,
    }
    prepared = method.build(
        network,
        head_name=info.head_name,
        example_input=example,
        options=options,
        gate_network=gate_network,
    )
    return prepared, info


def _check_resume(ckpt: dict[str, Any], config: TrainConfig, path: Path) -> None:
    old = ckpt.get("config") or {}
    for key in _RESUME_KEYS:
        if key in old and old[key] != getattr(config, key):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is from another run: {key} {old[key]!r} there, "
                f"{getattr(config, key)!r} now; use another --out or the same options"
            )


def _load_model_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match this model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped tensors, e.g. {first!r})"
        )
    model.load_state_dict(state)


def _train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    workers: int,
    env: DistEnv,
    pin: bool,
) -> DataLoader:
    # Order depends only on (seed, epoch): a resumed epoch reshuffles identically.
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, "shuffle"))
    if env.enabled:
        sampler: Any = DistributedSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=gen)
    # A final batch of one image cannot train BatchNorm; drop only that case.
    drop_last = len(sampler) % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=drop_last,
        generator=gen,
        persistent_workers=False,
    )


def _eval_loader(
    dataset: Dataset, *, batch_size: int, workers: int, env: DistEnv, pin: bool
) -> DataLoader:
    sampler = ShardSampler(len(dataset), rank=env.rank, world_size=env.world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin
    )


def _policy_json(policy: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
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


def run_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, Any]:
    """The run's ``(train, eval, info)`` datasets, preprocessed for its backbone.

    With ``config.val_fraction`` the validation images are already removed from ``train``.
    """
    train, _, evals, info = _run_splits(config)
    return train, evals, info


def _base_datasets(config: TrainConfig) -> tuple[Any, Any, Any]:
    from .backbones import BACKBONES
    from .data import build_datasets

    spec = BACKBONES.get(config.backbone)
    train, evals, info = build_datasets(
        config.dataset,
        config.data_root or None,
        resolution=config.resolution or spec.default_resolution,
        mean=spec.mean,
        std=spec.std,
        seed=config.seed,
        download=config.download,
        subset_per_class=config.subset_per_class,
    )
    if config.train_per_class is not None:
        from .data.api import with_transform
        from .data.base import balanced_subset

        keep = balanced_subset(
            train.targets, config.train_per_class, derive_seed(config.seed, "few")
        )
        train = with_transform(train, train.transform, indices=keep)
        info = dataclasses.replace(info, num_train=len(train))
    return train, evals, info


def validation_split(train: Any, evals: Any, config: TrainConfig) -> tuple[Any, Any]:
    """``(train, val)``: a stratified share ``config.val_fraction`` of the training images,
    seeded by ``config.seed``, held out with the evaluation transform."""
    from .data.api import carve_validation

    return carve_validation(
        train, evals.transform, config.val_fraction, derive_seed(config.seed, "val")
    )


def _run_splits(config: TrainConfig) -> tuple[Any, Any | None, Any, Any]:
    """``(train, val or None, eval, info)``."""
    train, evals, info = _base_datasets(config)
    val = None
    if config.val_fraction > 0:
        train, val = validation_split(train, evals, config)
    return train, val, evals, info


def _calibration_loader(
    train_ds: Any, eval_ds: Any, *, config: TrainConfig, batch_size: int, env: DistEnv, pin: bool
) -> DataLoader | None:
    """``config.precise_bn`` batches of training images through the evaluation transform.

    A fixed, seeded draw (the same every evaluation, shuffled so no batch is one class: the
    train-mode forward normalises each batch with its own statistics). Under DDP every rank
    takes its shard.
    """
    if config.precise_bn <= 0:
        return None
    n = config.precise_bn * batch_size * env.world_size
    calib = _seeded_eval_view(train_ds, eval_ds, n, seed=config.seed, tag="precise-bn")
    sampler = ShardSampler(len(calib), rank=env.rank, world_size=env.world_size)
    return DataLoader(
        calib, batch_size=batch_size, sampler=sampler, num_workers=config.workers, pin_memory=pin
    )


def _seeded_eval_view(train_ds: Any, eval_ds: Any, n: int, *, seed: int, tag: str) -> Any:
    """At most ``n`` training images in a seeded shuffled order, through the eval transform."""
    from .data.api import with_transform

    order = np.random.default_rng(derive_seed(seed, tag)).permutation(len(train_ds))[:n]
    return with_transform(train_ds, eval_ds.transform, indices=[int(i) for i in order], name=tag)


def _probe_batch(train_ds: Any, eval_ds: Any, config: TrainConfig, device: torch.device) -> Tensor:
    """A fixed batch of training images (evaluation transform) for the gate telemetry."""
    probe = _seeded_eval_view(train_ds, eval_ds, 64, seed=config.seed, tag="probe")
    return torch.stack([probe[i][0] for i in range(len(probe))]).to(device)


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

    def batches() -> Iterable[Tensor]:
        for images, _ in loader:
            yield images.to(device, non_blocking=True).contiguous(memory_format=memory_format)

    def forward(x: Tensor) -> Any:
        with _autocast(device, amp_dtype):
            return model(x)

    # Calibrate with the evaluation's policies: no exploration noise.
    quiet_gate = getattr(model, "without_gate_noise", contextlib.nullcontext)
    with quiet_gate():
        return recalibrate_bn(model, batches(), forward=forward, env=env)


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One log line per epoch; evaluation fields only where the epoch was evaluated."""
    parts = [
        f"epoch {row['epoch']}/{epochs} lr {row['lr'] or 0.0:.3g}",
        f"train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.2f}",
    ]
    for split in ("val", "test"):
        if row.get(f"{split}_acc") is not None:
            parts.append(
                f"{split}_loss {row[f'{split}_loss']:.4f} {split}_acc {row[f'{split}_acc']:.2f}"
            )
    parts.append(f"{row['seconds']:.1f}s {row['images_per_second']:.0f} img/s")
    return " ".join(parts)


def _evaluate_epoch(
    prepared: Prepared,
    *,
    loaders: dict[str, Any],
    device: torch.device,
    num_classes: int,
    skip: bool,
    collect_policies: bool,
    seed: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    env: DistEnv,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Precise BN (if a calibration loader is given), then the validation and test splits.

    Returns:
        ``{"val": {...}, "test": {...}}``, each empty when that split is absent or skipped.
    """
    out: dict[str, dict[str, Any]] = {"val": {}, "test": {}}
    if skip:
        return out
    module = prepared.model
    kw = {"device": device, "amp_dtype": amp_dtype, "channels_last": channels_last, "env": env}
    if loaders.get("calib") is not None:
        recalibrate(module, loaders["calib"], **kw)
    for split in ("val", "test"):
        if loaders.get(split) is None:
            continue
        # The same policy draws at every evaluation, so `adafilter eval` reproduces test_acc.
        prepared.method.on_evaluate(prepared, seed=seed, rank=env.rank)
        out[split] = evaluate(
            module,
            loaders[split],
            num_classes=num_classes,
            collect_policies=collect_policies and split == "test",
            progress=progress,
            **kw,
        )
    return out


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    s = derive_seed(seed, epoch, rank, "global")
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def fit(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run described by ``config``; rank 0 writes the results.

    Writes into ``config.out``: ``metrics.jsonl`` (one line per epoch), ``summary.json``,
    ``config.json``, ``policy.json`` (methods with policies) and ``checkpoint.pt`` (every
    epoch), all atomically. Under torchrun (``WORLD_SIZE > 1``) it trains with DDP.

    Args:
        config: The run's configuration.

    Returns:
        The summary dict (as written to ``summary.json``).

    Raises:
        AdaFilterError: Bad names, paths, options or an incompatible checkpoint.
    """
    from .backbones import BACKBONES
    from .data import DATASETS

    # Validate everything cheap before any output, so bad input gives one clean error.
    METHODS.get(config.method)
    BACKBONES.get(config.backbone)
    DATASETS.get(config.dataset)
    if config.method == "cnn-gate":
        BACKBONES.get(config.gate_backbone)
    if not config.out:
        raise AdaFilterError("missing --out (the run's output directory)")
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt: dict[str, Any] | None = None
    if config.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(ckpt, config, ckpt_path)
    elif not config.resume and (ckpt_path.exists() or (out / "metrics.jsonl").exists()):
        raise AdaFilterError(
            f"output directory {str(out)!r} already holds a run; pass --resume to continue it "
            "or choose another --out"
        )
    splits = _run_splits(config)

    # All ranks have checked the output directory before rank 0 can write (init is a barrier).
    # The CUDA device is selected before the process group exists so NCCL binds to it.
    device = resolve_device(config.device, env_from_environ())
    env = init_distributed(device)
    try:
        return _fit(config, env=env, device=device, ckpt=ckpt, splits=splits)
    finally:
        cleanup_distributed()


def _fit(
    config: TrainConfig,
    *,
    env: DistEnv,
    device: torch.device,
    ckpt: dict[str, Any] | None,
    splits: tuple[Any, Any | None, Any, Any],
) -> dict[str, Any]:
    t0 = time.perf_counter()
    amp_dtype = _amp_dtype(config.amp, device)
    out = Path(config.out)
    main = env.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config.to_dict())
    quiet = config.quiet or not main
    progress = not quiet and sys.stderr.isatty()

    train_ds, val_ds, eval_ds, dinfo = splits
    num_classes = int(dinfo.num_classes)
    prepared, _ = build_model(config, num_classes=num_classes)
    method = prepared.method
    module = prepared.model.to(device)
    if config.bn_momentum is not None:
        set_bn_momentum(module, config.bn_momentum)
    if config.channels_last:
        module = module.to(memory_format=torch.channels_last)
    regularizer = prepared.regularizer.to(device) if prepared.regularizer is not None else None

    groups = build_param_groups(
        prepared, lr=config.lr, gate_lr=config.gate_lr, weight_decay=config.weight_decay
    )
    optimizer = build_optimizer(
        groups, momentum=config.momentum, gate_optimizer=config.gate_optimizer
    )
    scheduler = build_scheduler(optimizer, milestones=config.milestones, gamma=config.gamma)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    metrics: list[dict[str, Any]] = []
    start_epoch = 1
    wall_before = 0.0
    if ckpt is not None:
        _load_model_state(module, ckpt["model"], out / "checkpoint.pt")
        if regularizer is not None and ckpt.get("regularizer"):
            regularizer.load_state_dict(ckpt["regularizer"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        metrics = list(ckpt.get("metrics", []))
        start_epoch = int(ckpt["epoch"]) + 1
        wall_before = float(ckpt.get("wall_time_s", 0.0))
        if not quiet:
            logger.info("resuming %s from epoch %d", out, start_epoch)
    elif config.resume and not quiet:
        logger.info("no checkpoint in %s yet: starting a new run", out)

    graphed = _graphed_forward(config, module, device=device, env=env, method=method)
    model: nn.Module = module
    if env.enabled:
        model = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.find_unused_parameters,
        )
    if config.compile:  # --compile (issue 14)
        model, graphed = _compiled_model(config, model, graphed), None
    per_rank_batch = max(1, config.batch_size // env.world_size)
    if config.batch_size % env.world_size:
        logger.warning(
            "batch size %d is not divisible by %d ranks; using %d per rank",
            config.batch_size,
            env.world_size,
            per_rank_batch,
        )
    pin = device.type == "cuda"
    eval_loader = _eval_loader(
        eval_ds, batch_size=per_rank_batch, workers=config.workers, env=env, pin=pin
    )
    val_loader = None
    if val_ds is not None:
        val_loader = _eval_loader(
            val_ds, batch_size=per_rank_batch, workers=config.workers, env=env, pin=pin
        )
    calib_loader = _calibration_loader(
        train_ds, eval_ds, config=config, batch_size=per_rank_batch, env=env, pin=pin
    )
    telemetry = None
    if method.trains_gate:
        telemetry = GateTelemetry(module, _probe_batch(train_ds, eval_ds, config, device))
    counts = method.parameter_counts(prepared)
    class_names = list(dinfo.class_names)
    policy: dict[str, Any] | None = None

    def summary(completed: bool) -> dict[str, Any]:
        per_example = None
        if policy is not None:
            per_example = trainable_per_example(module, policy["overall"])
        seconds = sum(m["seconds"] for m in metrics)
        images = sum(m["images_per_second"] * m["seconds"] for m in metrics)
        return {
            "method": config.method,
            "dataset": config.dataset,
            "backbone": config.backbone,
            "seed": config.seed,
            "final_test_acc": metrics[-1]["test_acc"] if metrics else None,
            "best_test_acc": max(
                (m["test_acc"] for m in metrics if m.get("test_acc") is not None), default=None
            ),
            "final_val_acc": metrics[-1].get("val_acc") if metrics else None,
            "epochs": len(metrics),
            "sgd_steps": sum(m.get("steps", 0) for m in metrics),
            "num_train": len(train_ds),
            "num_val": len(val_ds) if val_ds is not None else 0,
            "params": {**counts, "trainable_per_example": per_example},
            "wall_time_s": wall_before + time.perf_counter() - t0,
            "images_per_second": images / seconds if seconds > 0 else None,
            "world_size": env.world_size,
            "device": str(device),
            "method_info": prepared.info,
            "config": config.to_dict(),
            "completed": completed,
        }

    for epoch in range(start_epoch, config.epochs + 1):
        _seed_epoch(config.seed, epoch, env.rank)
        method.on_train_epoch(prepared, seed=config.seed, epoch=epoch, rank=env.rank)
        loader = _train_loader(
            train_ds,
            batch_size=per_rank_batch,
            seed=config.seed,
            epoch=epoch,
            workers=config.workers,
            env=env,
            pin=pin,
        )
        lr, gate_lr = group_lr(optimizer, groups[0]["name"]), group_lr(optimizer, "gate")
        t_epoch = time.perf_counter()
        train = train_one_epoch(
            model,
            loader,
            optimizer,
            device=device,
            epoch=epoch,
            regularizer=regularizer,
            regularized_module=module,
            scaler=scaler,
            amp_dtype=amp_dtype,
            channels_last=config.channels_last,
            env=env,
            progress=progress,
            graphed=graphed,
            after_backward=telemetry.after_backward if telemetry is not None else None,
        )
        last = epoch == config.epochs
        evaluated = _evaluate_epoch(
            prepared,
            loaders={"calib": calib_loader, "val": val_loader, "test": eval_loader},
            device=device,
            num_classes=num_classes,
            skip=not (last or epoch == 1 or epoch % config.eval_every == 0),
            collect_policies=method.has_policies and last,
            seed=config.seed,
            amp_dtype=amp_dtype,
            channels_last=config.channels_last,
            env=env,
            progress=progress,
        )
        test = evaluated["test"]
        scheduler.step()
        for ds in (train_ds, val_ds, eval_ds):  # one counting warning per epoch for bad images
            report = getattr(ds, "report_skipped", None)
            if report is not None:
                report()
        row = {
            "epoch": epoch,
            "lr": lr,
            "gate_lr": gate_lr if method.trains_gate else None,
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "steps": train["steps"],
            "val_loss": evaluated["val"].get("loss"),
            "val_acc": evaluated["val"].get("acc"),
            "test_loss": test.get("loss"),
            "test_acc": test.get("acc"),
            "seconds": time.perf_counter() - t_epoch,
            "images_per_second": train["images_per_second"],
        }
        if telemetry is not None:
            row["gate"] = telemetry.epoch_end()
        metrics.append(row)
        if "policy" in test:
            policy = test["policy"]
        if not quiet:
            logger.info("%s", _epoch_line(row, config.epochs))
        if main:
            # Checkpoint first: the result files never get ahead of what --resume restores.
            save_checkpoint(
                out / "checkpoint.pt",
                {
                    "model": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler_state(scheduler),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "regularizer": regularizer.state_dict() if regularizer is not None else None,
                    "epoch": epoch,
                    "rng": get_rng_state(),
                    "config": config.to_dict(),
                    "metrics": metrics,
                    "wall_time_s": wall_before + time.perf_counter() - t0,
                    "num_classes": num_classes,
                    "class_names": class_names,
                    "world_size": env.world_size,
                },
            )
            atomic_write_jsonl(out / "metrics.jsonl", metrics)
            if policy is not None:
                atomic_write_json(out / "policy.json", _policy_json(policy, class_names))
            atomic_write_json(out / "summary.json", summary(completed=last))

    if policy is None and method.has_policies and (out / "policy.json").exists():
        # Resumed an already finished run: policy.json holds its final evaluation.
        with open(out / "policy.json", encoding="utf-8") as f:
            policy = {"overall": json.load(f)["overall"]}
    result = summary(completed=len(metrics) >= config.epochs)
    if main:
        atomic_write_json(out / "summary.json", result)
    return result


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Rebuild a run from its ``checkpoint.pt`` and evaluate it on its evaluation split.

    Args:
        path: The checkpoint.
        data_root: Dataset directory (default: the run's ``data_root``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: Evaluation batch (default: the run's per-process batch size).
        workers: DataLoader workers.

    Returns:
        ``{"checkpoint", "epoch", "method", "dataset", "backbone", "test_acc", "test_loss",
        "images", "recorded_test_acc"}``.
    """
    from .inference import rebuild_model  # the one place that rebuilds a saved model

    path = Path(path)
    ckpt = load_checkpoint(path)
    rebuilt = rebuild_model(ckpt, path)  # also runs the method's evaluation hook
    config = rebuilt.config
    if data_root is not None:
        config = config.replace(data_root=str(data_root))
    num_classes = rebuilt.num_classes
    env = DistEnv()
    dev = resolve_device(device, env)
    _, eval_ds, dinfo = run_datasets(config.replace(download=False))
    if dinfo.num_classes != num_classes:
        raise AdaFilterError(
            f"data root {config.data_root!r} has {dinfo.num_classes} classes; the checkpoint "
            f"was trained on {num_classes}"
        )
    module = rebuilt.model.to(dev)
    world = int(ckpt.get("world_size", 1))
    bs = batch_size or max(1, config.batch_size // world)
    loader = _eval_loader(eval_ds, batch_size=bs, workers=workers, env=env, pin=dev.type == "cuda")
    res = evaluate(module, loader, device=dev, num_classes=num_classes)
    metrics = ckpt.get("metrics") or []
    return {
        "checkpoint": str(path),
        "epoch": int(ckpt["epoch"]),
        "method": config.method,
        "dataset": config.dataset,
        "backbone": config.backbone,
        "test_acc": res["acc"],
        "test_loss": res["loss"],
        "images": res["images"],
        "recorded_test_acc": metrics[-1]["test_acc"] if metrics else None,
    }
