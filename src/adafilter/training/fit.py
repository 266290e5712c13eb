"""``fit``: run (or resume) a training run from a :class:`~adafilter.training.config.TrainConfig`.

Reproducibility and resume. Each epoch reseeds Python, numpy and torch from
``(seed, epoch, rank)``, shuffles with a generator seeded the same way (``DistributedSampler``
with ``set_epoch`` under DDP) and lets the method reseed its own draws (``random-policy``). A
run resumed from the checkpoint of epoch ``e`` therefore replays epochs ``e+1...`` exactly as
the uninterrupted run does; remaining differences can only come from nondeterministic kernels
(cuDNN autotuning/atomics on GPUs; DataLoader worker scheduling never affects order). The
checkpoint also stores and restores the RNG states themselves.

Stopping and failures (:mod:`.stopping`). A preemption signal (``SIGTERM``, ``SIGUSR1``,
``SIGINT``) finishes the current step; every rank agrees to stop at that step, rank 0 writes a
checkpoint that records the position inside the epoch (each rank's running sums, RNG states,
random-policy generator and gate telemetry) and :class:`~.stopping.TrainingStopped` is raised.
``checkpoint_every=N`` writes the same kind of checkpoint every N steps. Resuming such a
checkpoint draws and drops the epoch's batches already trained, restores the RNGs and goes on,
so the run ends as the uninterrupted one does. A signal during an evaluation or a checkpoint
write lets it finish, then stops.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import get_rng_state, load_checkpoint, scheduler_state, set_rng_state
from ..distributed import (
    DistEnv,
    all_gather_object,
    barrier,
    cleanup_distributed,
    env_from_environ,
    init_distributed,
)
from ..errors import AdaFilterError, CheckpointError
from ..layers import cpu_gate
from ..methods import METHODS, Prepared, trainable_per_example
from ..utils.seeding import preserved_rng, seed_epoch
from .build import amp_dtype, build_model, compiled_model, graphed_forward, resolve_device
from .config import TrainConfig
from .data import (
    calibration_loader,
    eval_loader,
    probe_batch,
    run_datasets,
    run_splits,
    train_loader,
)
from .loop import EpochState, evaluate, recalibrate, train_one_epoch
from .optim import build_optimizer, build_param_groups, build_scheduler, group_lr
from .precise_bn import bn_statistics, restore_bn_statistics, set_bn_momentum
from .run_dir import RunDir, load_model_state
from .stopping import (
    StopRequest,
    TrainingStopped,
    explain_failures,
    signal_name,
    stop_on_signals,
)
from .telemetry import GateTelemetry
from .tensorboard import TensorBoardLog

logger = logging.getLogger("adafilter")

__all__ = ["Trainer", "evaluate_checkpoint", "fit"]

#: ``on_step(epoch, step)``: called after every optimizer step (1-based).
StepCallback = Callable[[int, int], None]


def fit(config: TrainConfig, *, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Run (or resume) a training run described by ``config``; rank 0 writes the results.

    Writes into ``config.out`` (see :mod:`.run_dir`): ``metrics.jsonl`` (one line per epoch),
    ``summary.json``, ``config.json``, ``policy.json`` (methods with policies) and
    ``checkpoint.pt`` (every epoch), all atomically. Under torchrun (``WORLD_SIZE > 1``) it
    trains with DDP.

    Args:
        config: The run's configuration.
        on_step: Called as ``on_step(epoch, step)`` after every optimizer step.

    Returns:
        The summary dict (as written to ``summary.json``).

    Raises:
        AdaFilterError: Bad names, paths, options or an incompatible checkpoint; a full or
            read-only disk (:class:`~adafilter.errors.WriteError`); a dead DataLoader worker
            or DDP rank.
        TrainingStopped: A stop signal arrived; the checkpoint to resume from is written.
    """
    from ..backbones import BACKBONES
    from ..data import DATASETS

    # Validate everything cheap before any output, so bad input gives one clean error.
    method = METHODS.get(config.method)
    BACKBONES.get(config.backbone)
    DATASETS.get(config.dataset)
    if method.uses_gate_backbone:
        BACKBONES.get(config.gate_backbone)
    if not config.out:
        raise AdaFilterError("missing out= (the run's output directory)")
    run_dir = RunDir(config.out)
    ckpt = run_dir.open(config)
    splits = run_splits(config)

    # All ranks have checked the output directory before rank 0 can write (init is a barrier).
    # The CUDA device is selected before the process group exists so NCCL binds to it.
    device = resolve_device(config.device, env_from_environ())
    env = init_distributed(device)
    if device.type == "cpu" and method.has_policies:  # the gated BN's compiled CPU passes
        cpu_gate.ensure(say=logger.info)  # built before training, never beside it
    where = [0]  # the epoch, for failure messages
    try:
        with (
            preserved_rng(),  # the caller's RNG states come back afterwards
            stop_on_signals() as stop,
            explain_failures(env, where),
        ):
            trainer = Trainer(
                config, env=env, device=device, splits=splits, run_dir=run_dir, stop=stop
            )
            if ckpt is not None:
                trainer.restore(ckpt)
            elif config.resume and not trainer.quiet:
                logger.info("no checkpoint in %s yet: starting a new run", run_dir.path)
            trainer.prepare_loop()
            for epoch in range(trainer.start_epoch, config.epochs + 1):
                where[0] = epoch
                trainer.run_epoch(epoch, on_step=on_step)
                if trainer.main:
                    trainer.save(epoch)
                trainer.stop_if_asked(epoch)
            return trainer.finish()
    finally:
        cleanup_distributed()


class Trainer:
    """One run's objects (model, optimizer, loaders, telemetry) and what it has recorded.

    Args:
        config: The run's configuration.
        env: The DDP environment.
        device: Where to train.
        splits: ``(train, val or None, eval, info)`` from :func:`.data.run_splits`.
        run_dir: The output directory.
        stop: Where stop signals are recorded (default: none ever arrives).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        env: DistEnv,
        device: torch.device,
        splits: tuple[Any, Any | None, Any, Any],
        run_dir: RunDir,
        stop: StopRequest | None = None,
    ) -> None:
        self.t0 = time.perf_counter()
        self.stop = stop or StopRequest()
        self.config, self.env, self.device, self.run_dir = config, env, device, run_dir
        self.amp_dtype = amp_dtype(config.amp, device)
        self.main = env.is_main
        if self.main:
            run_dir.write_config(config)
        self.quiet = config.quiet or not self.main
        self.progress = not self.quiet and sys.stderr.isatty()
        self.train_ds, self.val_ds, self.eval_ds, info = splits
        self.num_classes = int(info.num_classes)
        self.class_names = list(info.class_names)
        self._build_model()
        self.metrics: list[dict[str, Any]] = []
        self.policy: dict[str, Any] | None = None
        self.start_epoch = 1
        self.wall_before = 0.0
        self.position: dict[str, Any] | None = None  # where a mid-epoch checkpoint stopped
        self._telemetry_state: dict[str, Any] | None = None
        self.tensorboard = None
        if config.tensorboard and self.main:
            layers = getattr(self.module, "gated_layer_names", None)
            self.tensorboard = TensorBoardLog(run_dir.path / "tensorboard", layers)

    def _build_model(self) -> None:
        config = self.config
        prepared, _ = build_model(config, num_classes=self.num_classes)
        self.prepared: Prepared = prepared
        self.method = prepared.method
        module = prepared.model.to(self.device)
        if config.bn_momentum is not None:
            set_bn_momentum(module, config.bn_momentum)
        if config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module: nn.Module = module
        reg = prepared.regularizer
        self.regularizer = reg.to(self.device) if reg is not None else None
        self.groups = build_param_groups(
            prepared, lr=config.lr, gate_lr=config.gate_lr, weight_decay=config.weight_decay
        )
        self.optimizer = build_optimizer(
            self.groups, momentum=config.momentum, gate_optimizer=config.gate_optimizer
        )
        self.scheduler = build_scheduler(
            self.optimizer, milestones=config.milestones, gamma=config.gamma
        )
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, RNG and recorded metrics."""
        load_model_state(self.module, ckpt["model"], self.run_dir.checkpoint)
        if self.regularizer is not None and ckpt.get("regularizer"):
            self.regularizer.load_state_dict(ckpt["regularizer"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.metrics = list(ckpt.get("metrics", []))
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.wall_before = float(ckpt.get("wall_time_s", 0.0))
        self._telemetry_state = ckpt.get("telemetry")
        self.position = ckpt.get("position")
        if self.position is not None:
            self._check_position()
        if not self.quiet:
            at = f" step {self.position['step']}" if self.position is not None else ""
            logger.info("resuming %s from epoch %d%s", self.run_dir.path, self.start_epoch, at)

    def _check_position(self) -> None:
        """A mid-epoch checkpoint resumes only with the processes that wrote it."""
        world = len(self.position["ranks"]) if self.position is not None else 1
        if world != self.env.world_size:
            raise CheckpointError(
                f"checkpoint {str(self.run_dir.checkpoint)!r} was written inside epoch "
                f"{self.start_epoch} by {world} processes; resume it with {world} processes "
                f"(not {self.env.world_size})"
            )

    def prepare_loop(self) -> None:
        """The CUDA-graph wrapper, DDP, the evaluation loaders and the gate telemetry."""
        config, env, device = self.config, self.env, self.device
        self.graphed = graphed_forward(
            config, self.module, device=device, env=env, method=self.method
        )
        self.model: nn.Module = self.module
        if env.enabled:
            self.model = DistributedDataParallel(
                self.module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.method.find_unused_parameters,
            )
        if config.compile:  # config.compile (issue 14): evaluation stays eager
            self.model, self.graphed = compiled_model(config, self.model, self.graphed), None
        self.batch = max(1, config.batch_size // env.world_size)
        if config.batch_size % env.world_size:
            logger.warning(
                "batch size %d is not divisible by %d ranks; using %d per rank",
                config.batch_size,
                env.world_size,
                self.batch,
            )
        self.pin = device.type == "cuda"
        kw = {"batch_size": self.batch, "env": env, "pin": self.pin}
        self.loaders = {
            "calib": calibration_loader(self.train_ds, self.eval_ds, config=config, **kw),
            "val": None,
            "test": eval_loader(self.eval_ds, workers=config.workers, **kw),
        }
        if self.val_ds is not None:
            self.loaders["val"] = eval_loader(self.val_ds, workers=config.workers, **kw)
        self.telemetry = None
        if self.method.trains_gate:
            probe = probe_batch(self.train_ds, self.eval_ds, config, device)
            self.telemetry = GateTelemetry(self.module, probe)
            if self._telemetry_state is not None:
                self.telemetry.load_state_dict(self._telemetry_state)

    def run_epoch(self, epoch: int, *, on_step: StepCallback | None = None) -> dict[str, Any]:
        """Train one epoch, evaluate when due, step the schedule; the epoch's metrics row."""
        config, env = self.config, self.env
        seed_epoch(config.seed, epoch, env.rank)
        self.method.on_train_epoch(self.prepared, seed=config.seed, epoch=epoch, rank=env.rank)
        loader = train_loader(
            self.train_ds,
            batch_size=self.batch,
            seed=config.seed,
            epoch=epoch,
            workers=config.workers,
            env=env,
            pin=self.pin,
        )
        lr = group_lr(self.optimizer, self.groups[0]["name"])
        gate_lr = group_lr(self.optimizer, "gate")
        t_epoch = time.perf_counter()
        resume_from, on_resumed = self._resume_position(epoch)
        train = train_one_epoch(
            self.model,
            loader,
            self.optimizer,
            device=self.device,
            epoch=epoch,
            regularizer=self.regularizer,
            regularized_module=self.module,
            scaler=self.scaler,
            amp_dtype=self.amp_dtype,
            channels_last=config.channels_last,
            env=env,
            progress=self.progress,
            graphed=self.graphed,
            after_backward=self.telemetry.after_backward if self.telemetry is not None else None,
            on_step=on_step,
            resume_from=resume_from,
            on_resumed=on_resumed,
            after_step=self._after_step(epoch, len(loader)),
        )
        last = epoch == config.epochs
        due = last or epoch == 1 or epoch % config.eval_every == 0
        evaluated = self._evaluate(final=last) if due else {"val": {}, "test": {}}
        self.scheduler.step()
        for ds in (self.train_ds, self.val_ds, self.eval_ds):  # one counting warning per epoch
            report = getattr(ds, "report_skipped", None)
            if report is not None:
                report()
        row = _metrics_row(epoch, lr, gate_lr if self.method.trains_gate else None, train)
        row.update(_eval_fields(evaluated))
        if "bn" in evaluated:
            row["bn_stats"] = evaluated["bn"]
        row["seconds"] = time.perf_counter() - t_epoch
        if resume_from is not None:
            row["seconds"] += resume_from.seconds
        row["images_per_second"] = train["images_per_second"]
        for split in ("val", "test"):  # only when unreadable images were left out
            if evaluated[split].get("dropped"):
                row[f"{split}_dropped"] = evaluated[split]["dropped"]
        if self.telemetry is not None:
            row["gate"] = self.telemetry.epoch_end()
        self.metrics.append(row)
        if self.tensorboard is not None:
            self.tensorboard.log(row)
        if "policy" in evaluated["test"]:
            self.policy = evaluated["test"]["policy"]
        if not self.quiet:
            logger.info("%s", epoch_line(row, config.epochs))
        return row

    def _resume_position(self, epoch: int) -> tuple[EpochState | None, Callable[[], None] | None]:
        """This rank's place in ``epoch`` when resuming inside it, and what restores the rest."""
        position, self.position = self.position, None
        if position is None or int(position["epoch"]) != epoch:
            return None, None
        mine = position["ranks"][self.env.rank]
        state = EpochState(
            int(position["step"]), mine["sums"].to(self.device), float(mine["seconds"])
        )

        def restore() -> None:
            set_rng_state(mine["rng"])
            generator = getattr(self.module, "policy_generator", None)
            if generator is not None and mine.get("policy_rng") is not None:
                generator.set_state(mine["policy_rng"])
            if self.telemetry is not None and mine.get("telemetry") is not None:
                self.telemetry.load_state_dict(mine["telemetry"])

        return state, restore

    def _after_step(self, epoch: int, steps: int) -> Callable[[EpochState], None]:
        """Checkpoints every ``checkpoint_every`` steps and stops at a signal, inside ``epoch``
        (at its last step the epoch's end does both)."""
        every = self.config.checkpoint_every

        def after(state: EpochState) -> None:
            if state.step >= steps:
                return
            signum = self.stop.agreed(self.env, self.device)
            if signum or (every and state.step % every == 0):
                self.save_position(epoch, state)
            if signum:
                self._stopped(signum, f"epoch {epoch} step {state.step} of {steps}")

        return after

    def stop_if_asked(self, epoch: int) -> None:
        """At an epoch's end (its checkpoint written): stop if any rank got a signal."""
        if epoch < self.config.epochs:
            signum = self.stop.agreed(self.env, self.device)
            if signum:
                self._stopped(signum, f"the end of epoch {epoch}")

    def _stopped(self, signum: int, where: str) -> None:
        raise TrainingStopped(
            f"stopped by {signal_name(signum)} at {where}; checkpoint saved in "
            f"{str(self.run_dir.path)!r}: rerun with resume=True (same options) to continue",
            signum=signum,
            main=self.main,
        )

    def save_position(self, epoch: int, state: EpochState) -> None:
        """Every rank: the checkpoint of ``state``, a place inside ``epoch`` (rank 0 writes)."""
        generator = getattr(self.module, "policy_generator", None)
        mine = {
            "sums": state.sums.detach().cpu(),
            "seconds": state.seconds,
            "rng": get_rng_state(),
            "policy_rng": generator.get_state() if generator is not None else None,
            "telemetry": self.telemetry.state_dict() if self.telemetry is not None else None,
        }
        ranks = all_gather_object(mine, self.env)
        if self.main:
            ckpt = self.checkpoint_state(epoch - 1)
            ckpt["position"] = {"epoch": epoch, "step": state.step, "ranks": ranks}
            self.run_dir.write_epoch(
                ckpt,
                metrics=self.metrics,
                policy=self.policy,
                class_names=self.class_names,
                summary=self.summary(completed=False),
            )
        barrier(self.env)  # no rank leaves (and gets its job torn down) before the write ends

    def _evaluate(self, *, final: bool) -> dict[str, dict[str, Any]]:
        """Precise BN (if configured; or the BN statistics validation prefers), then the
        validation and test splits."""
        out: dict[str, dict[str, Any]] = {"val": {}, "test": {}}
        if self.loaders["calib"] is not None:
            if self.config.choose_bn_stats and self.loaders["val"] is not None:
                out["bn"], out["val"] = self._choose_bn_stats()
            else:
                recalibrate(self.module, self.loaders["calib"], **self._eval_kw())
        for split in ("val", "test"):
            if self.loaders[split] is None or out[split]:
                continue
            stats = None
            if final and split == "test":
                stats = self.method.policy_stats(
                    self.prepared, num_classes=self.num_classes, device=self.device
                )
            out[split] = self._evaluate_split(split, policy_stats=stats)
        return out

    def _eval_kw(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "amp_dtype": self.amp_dtype,
            "channels_last": self.config.channels_last,
            "env": self.env,
        }

    def _evaluate_split(self, split: str, **kw: Any) -> dict[str, Any]:
        # The same policy draws at every evaluation, so `adafilter eval` reproduces test_acc.
        self.method.on_evaluate(self.prepared, seed=self.config.seed, rank=self.env.rank)
        return evaluate(
            self.module, self.loaders[split], progress=self.progress, **kw, **self._eval_kw()
        )

    def _choose_bn_stats(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``choose_bn_stats``: validation with the running statistics, then with precise BN's;
        the running ones are put back if they scored higher. The choice (the same on every
        rank: accuracies are all-reduced) and the chosen statistics' validation result."""
        running = bn_statistics(self.module)
        with_running = self._evaluate_split("val")
        recalibrate(self.module, self.loaders["calib"], **self._eval_kw())
        with_precise = self._evaluate_split("val")
        keep_running = with_running["acc"] > with_precise["acc"]
        if keep_running:
            restore_bn_statistics(self.module, running)
        choice = {
            "stats": "running" if keep_running else "precise",
            "val_acc_running": with_running["acc"],
            "val_acc_precise": with_precise["acc"],
        }
        return choice, with_running if keep_running else with_precise

    def save(self, epoch: int) -> None:
        """Rank 0: the checkpoint and every result file for ``epoch``."""
        self.run_dir.write_epoch(
            self.checkpoint_state(epoch),
            metrics=self.metrics,
            policy=self.policy,
            class_names=self.class_names,
            summary=self.summary(completed=epoch == self.config.epochs),
        )

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """Everything ``resume=True`` needs to continue after ``epoch`` (weights-only loadable)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "regularizer": self.regularizer.state_dict() if self.regularizer is not None else None,
            "epoch": epoch,
            "rng": get_rng_state(),
            "config": self.config.to_dict(),
            "metrics": self.metrics,
            "wall_time_s": self.wall_before + time.perf_counter() - self.t0,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "world_size": self.env.world_size,
            "telemetry": self.telemetry.state_dict() if self.telemetry is not None else None,
        }

    def summary(self, *, completed: bool) -> dict[str, Any]:
        """``summary.json``'s content."""
        config, metrics = self.config, self.metrics
        per_example = None
        if self.policy is not None:
            per_example = trainable_per_example(self.module, self.policy["overall"])
        seconds = sum(m["seconds"] for m in metrics)
        images = sum(m["images_per_second"] * m["seconds"] for m in metrics)
        tests = [m["test_acc"] for m in metrics if m.get("test_acc") is not None]
        return {
            "method": config.method,
            "dataset": config.dataset,
            "backbone": config.backbone,
            "seed": config.seed,
            "final_test_acc": metrics[-1]["test_acc"] if metrics else None,
            "best_test_acc": max(tests, default=None),
            "final_val_acc": metrics[-1].get("val_acc") if metrics else None,
            "epochs": len(metrics),
            "sgd_steps": sum(m.get("steps", 0) for m in metrics),
            "num_train": len(self.train_ds),
            "num_val": len(self.val_ds) if self.val_ds is not None else 0,
            # unreadable evaluation images left out of the last evaluation
            "eval_images_dropped": metrics[-1].get("test_dropped", 0) if metrics else 0,
            "params": {
                **self.method.parameter_counts(self.prepared),
                "trainable_per_example": per_example,
            },
            "wall_time_s": self.wall_before + time.perf_counter() - self.t0,
            "images_per_second": images / seconds if seconds > 0 else None,
            "world_size": self.env.world_size,
            "device": str(self.device),
            "has_policies": self.method.has_policies,
            "method_info": self.prepared.info,
            "config": config.to_dict(),
            "completed": completed,
        }

    def finish(self) -> dict[str, Any]:
        """The final summary (rank 0 writes it); a resumed finished run re-reads its policy."""
        if self.policy is None and self.method.has_policies:
            self.policy = self.run_dir.recorded_policy()
        result = self.summary(completed=len(self.metrics) >= self.config.epochs)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.main:
            self.run_dir.write_summary(result)
        return result


def _metrics_row(
    epoch: int, lr: float | None, gate_lr: float | None, train: dict[str, Any]
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "lr": lr,
        "gate_lr": gate_lr,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "steps": train["steps"],
    }


def _eval_fields(evaluated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "val_loss": evaluated["val"].get("loss"),
        "val_acc": evaluated["val"].get("acc"),
        "test_loss": evaluated["test"].get("loss"),
        "test_acc": evaluated["test"].get("acc"),
    }


def epoch_line(row: dict[str, Any], epochs: int) -> str:
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
    if row.get("bn_stats"):
        parts.append(f"bn {row['bn_stats']['stats']}")
    parts.append(f"{row['seconds']:.1f}s {row['images_per_second']:.0f} img/s")
    return " ".join(parts)


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
        "images", "recorded_test_acc"}`` (and ``"dropped"`` when unreadable images were left
        out).
    """
    from ..deploy import rebuild_model  # the one place that rebuilds a saved model

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
    loader = eval_loader(eval_ds, batch_size=bs, workers=workers, env=env, pin=dev.type == "cuda")
    res = evaluate(module, loader, device=dev)
    metrics = ckpt.get("metrics") or []
    out = {
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
    if res["dropped"]:
        out["dropped"] = res["dropped"]
    return out
