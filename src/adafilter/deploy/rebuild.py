"""The one place that turns saved weights back into a model (``load``, ``adafilter eval``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..checkpoint import get_rng_state, set_rng_state
from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..methods import Prepared
    from ..training.config import TrainConfig

__all__ = ["RebuiltModel", "rebuild_model"]


@dataclass(frozen=True)
class RebuiltModel:
    """A model rebuilt from saved weights, before it is moved to a device.

    Attributes:
        prepared: The method's :class:`~adafilter.methods.Prepared` with the saved state loaded.
        config: The run's training configuration.
        num_classes: Outputs of the classifier.
        class_names: Class name of every output.
        resolution: Input side length of the evaluation transform.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
    """

    prepared: Prepared
    config: TrainConfig
    num_classes: int
    class_names: list[str]
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def model(self) -> nn.Module:
        return self.prepared.model


def rebuild_model(payload: dict[str, Any], path: str | os.PathLike[str]) -> RebuiltModel:
    """Rebuild the model a checkpoint or an export describes and load its weights.

    The backbone and method are rebuilt from the saved configuration without pretrained
    weights (every parameter is overwritten), the state is loaded strictly, and the method's
    evaluation hook runs (``random-policy`` reseeds its draws, so evaluating the rebuilt model
    reproduces the recorded accuracy). Global RNG states are left as they were.

    Args:
        payload: ``{"config", "num_classes", "model"}`` and optionally ``"class_names"``: a
            checkpoint dict or the content of an exported file.
        path: Where it came from (for messages).

    Returns:
        The :class:`RebuiltModel` (on the CPU).

    Raises:
        CheckpointError: Missing/invalid fields, or weights of another model.
    """
    from ..training.build import build_model
    from ..training.config import TrainConfig
    from ..training.run_dir import load_model_state

    path = Path(path)
    try:
        config = TrainConfig.from_dict(payload["config"], source=f"file {str(path)!r}")
        num_classes = int(payload["num_classes"])
        state = payload["model"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} lacks a valid config or weights ({e})") from None
    names = [str(c) for c in payload.get("class_names") or range(num_classes)]
    if len(names) != num_classes:
        raise CheckpointError(
            f"{str(path)!r} names {len(names)} classes but its classifier has {num_classes}"
        )
    rng = get_rng_state()  # build_model seeds every RNG with the run's seed
    try:
        prepared, info = build_model(config, num_classes=num_classes, pretrained=False)
    finally:
        set_rng_state(rng)
    load_model_state(prepared.model, state, path)
    prepared.method.on_evaluate(prepared, seed=config.seed, rank=0)
    return RebuiltModel(
        prepared=prepared,
        config=config,
        num_classes=num_classes,
        class_names=names,
        resolution=int(config.resolution or info.default_resolution),
        mean=tuple(float(v) for v in info.mean),
        std=tuple(float(v) for v in info.std),
    )
