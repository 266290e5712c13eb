"""The training engine's public names, kept importable here (``adafilter.engine.fit``, ...).

The engine lives in :mod:`adafilter.training`: ``fit`` (the run: :mod:`.training.fit`), the
per-epoch loops (:mod:`.training.loop`), the run's data and loaders (:mod:`.training.data`),
building the model and device (:mod:`.training.build`), the output directory
(:mod:`.training.run_dir`) and the optimizer (:mod:`.training.optim`). Nothing there sees
argparse.
"""

from __future__ import annotations

from .training.build import amp_dtype, build_model, graphed_forward, resolve_device
from .training.config import TrainConfig
from .training.data import run_datasets, run_splits, validation_split
from .training.fit import Trainer, evaluate_checkpoint, fit
from .training.loop import GraphedForward, evaluate, recalibrate, train_one_epoch
from .training.optim import build_optimizer, build_param_groups, build_scheduler, group_lr
from .training.run_dir import load_model_state
from .utils.seeding import seed_everything

__all__ = [
    "GraphedForward",
    "TrainConfig",
    "Trainer",
    "amp_dtype",
    "build_model",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "graphed_forward",
    "group_lr",
    "load_model_state",
    "recalibrate",
    "resolve_device",
    "run_datasets",
    "run_splits",
    "seed_everything",
    "train_one_epoch",
    "validation_split",
]
