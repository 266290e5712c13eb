"""A run's data: its splits (train, validation, evaluation) and their seeded loaders.

Order depends only on ``(seed, epoch)``, so a resumed epoch sees the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..data.base import collate_dropping
from ..distributed import DistEnv, ShardSampler
from ..utils.seeding import derive_seed
from .config import TrainConfig
from .stopping import ignore_stop_signals

__all__ = [
    "calibration_loader",
    "eval_loader",
    "probe_batch",
    "run_datasets",
    "run_splits",
    "seeded_eval_view",
    "train_loader",
    "validation_split",
]


def run_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, Any]:
    """The run's ``(train, eval, info)`` datasets, preprocessed for its backbone.

    With ``config.val_fraction`` the validation images are already removed from ``train``.
    """
    train, _, evals, info = run_splits(config)
    return train, evals, info


def _base_datasets(config: TrainConfig) -> tuple[Any, Any, Any]:
    from ..backbones import BACKBONES
    from ..data import build_datasets

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
        augment=config.augment,
    )
    if config.train_per_class is not None:
        from ..data.api import with_transform
        from ..data.base import balanced_subset

        keep = balanced_subset(
            train.targets, config.train_per_class, derive_seed(config.seed, "few")
        )
        train = with_transform(train, train.transform, indices=keep)
        info = dataclasses.replace(info, num_train=len(train))
    return train, evals, info


def validation_split(train: Any, evals: Any, config: TrainConfig) -> tuple[Any, Any]:
    """``(train, val)``: a stratified share ``config.val_fraction`` of the training images,
    seeded by ``config.seed``, held out with the evaluation transform."""
    from ..data.api import carve_validation

    return carve_validation(
        train, evals.transform, config.val_fraction, derive_seed(config.seed, "val")
    )


def run_splits(config: TrainConfig) -> tuple[Any, Any | None, Any, Any]:
    """``(train, val or None, eval, info)``."""
    train, evals, info = _base_datasets(config)
    val = None
    if config.val_fraction > 0:
        train, val = validation_split(train, evals, config)
    return train, val, evals, info


def train_loader(
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
        worker_init_fn=ignore_stop_signals,
    )


def eval_loader(
    dataset: Dataset, *, batch_size: int, workers: int, env: DistEnv, pin: bool
) -> DataLoader:
    sampler = ShardSampler(len(dataset), rank=env.rank, world_size=env.world_size)
    # Unreadable images are dropped from an evaluation, not replaced (collate_dropping).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=collate_dropping,
        worker_init_fn=ignore_stop_signals,
    )


def calibration_loader(
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
    calib = seeded_eval_view(train_ds, eval_ds, n, seed=config.seed, tag="precise-bn")
    sampler = ShardSampler(len(calib), rank=env.rank, world_size=env.world_size)
    return DataLoader(
        calib,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=config.workers,
        pin_memory=pin,
        worker_init_fn=ignore_stop_signals,
    )


def seeded_eval_view(train_ds: Any, eval_ds: Any, n: int, *, seed: int, tag: str) -> Any:
    """At most ``n`` training images in a seeded shuffled order, through the eval transform."""
    from ..data.api import with_transform

    order = np.random.default_rng(derive_seed(seed, tag)).permutation(len(train_ds))[:n]
    return with_transform(train_ds, eval_ds.transform, indices=[int(i) for i in order], name=tag)


def probe_batch(train_ds: Any, eval_ds: Any, config: TrainConfig, device: torch.device) -> Tensor:
    """A fixed batch of training images (evaluation transform) for the gate telemetry."""
    probe = seeded_eval_view(train_ds, eval_ds, 64, seed=config.seed, tag="probe")
    return torch.stack([probe[i][0] for i in range(len(probe))]).to(device)
