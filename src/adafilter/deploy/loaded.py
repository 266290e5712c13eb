"""A trained run loaded for use: :func:`load` -> :class:`LoadedRun` (predict images)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import AdaFilterError
from ..tuner import AdaFilterModel
from ..tuner.config import AdaFilterConfig
from ..utils.text import one_line
from .files import read_model_file, resolve_run_path
from .rebuild import rebuild_model

if TYPE_CHECKING:
    from PIL import Image

    from ..training.config import TrainConfig

__all__ = ["FileResult", "LoadedRun", "Prediction", "load"]


@dataclass(frozen=True)
class Prediction:
    """One image's classification.

    Attributes:
        top_k: ``(class name, probability)``, most likely first.
        indices: The class indices of ``top_k``.
        policy: AdaFilter models: per gated layer (execution order), the fraction of its
            filters this image takes from the fine-tuned copy F (1.0 = all fine-tuned, 0.0 = all
            pretrained S); ``None`` for plain networks.
    """

    top_k: list[tuple[str, float]]
    indices: list[int]
    policy: dict[str, float] | None


@dataclass(frozen=True)
class FileResult:
    """The outcome for one image file: a prediction, or why the file was skipped."""

    path: Path
    prediction: Prediction | None
    error: str | None = None


@dataclass(frozen=True)
class LoadedRun:
    """A trained model in eval mode with everything needed to use it.

    Attributes:
        model: An :class:`~adafilter.AdaFilterModel` (AdaFilter variants) or the plain network
            (fine-tuning baselines), in eval mode on ``device``.
        class_names: Name of every output of the classifier.
        transform: The run's evaluation preprocessing: PIL image -> float tensor (3, R, R).
        method: The fine-tuning method (``adafilter``, ``finetune``, ...).
        config: The run's training configuration.
        adafilter_config: The model's :class:`~adafilter.AdaFilterConfig` (``None`` for plain
            networks).
        backbone: The backbone name.
        resolution: Input side length R of ``transform``.
        mean: Per-channel normalisation mean of ``transform``.
        std: Per-channel normalisation std of ``transform``.
        device: Where the model lives.
        source: The file it was loaded from.
        kind: ``"checkpoint"`` or ``"export"``.
        epoch: The epoch the weights are from (``None`` if unknown).
        test_acc: The last recorded test accuracy (%), if known.
    """

    model: nn.Module
    class_names: list[str]
    transform: Callable[[Image.Image], Tensor]
    method: str
    config: TrainConfig
    adafilter_config: AdaFilterConfig | None
    backbone: str
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    source: Path
    kind: str
    epoch: int | None = None
    test_acc: float | None = None

    @property
    def has_policies(self) -> bool:
        """The model makes a per-example filter choice (AdaFilter variants)."""
        return isinstance(self.model, AdaFilterModel)

    @property
    def gated_layers(self) -> list[str]:
        """Names of the gated convs in execution order (empty for plain networks)."""
        return list(getattr(self.model, "gated_layer_names", []))

    def predict(self, image: Image.Image | str | os.PathLike[str], *, top_k: int = 5) -> Prediction:
        """Classify one image (eval transform, then the batch-1 fast inference path).

        Args:
            image: A PIL image or an image file.
            top_k: How many classes to return.

        Raises:
            AdaFilterError: The file cannot be read as an image.
        """
        if not isinstance(image, (str, os.PathLike)):
            self._ensure_eval()
            return self._predict_image(image, top_k)
        [result] = list(self.predict_files([image], top_k=top_k))
        if result.prediction is None:
            raise AdaFilterError(f"cannot read image {str(image)!r}: {result.error}")
        return result.prediction

    def predict_files(
        self, paths: Iterable[str | os.PathLike[str]], *, top_k: int = 5
    ) -> Iterator[FileResult]:
        """Classify image files one at a time; an unreadable file yields its error instead.

        Each image runs alone (batch 1) under ``torch.inference_mode()``: the fast path that
        merges each gated layer's two filter banks once and only recopies the filters whose
        decision changed since the previous image (or the previous call: the merged filters
        are kept). Calls from several threads at once are safe: each returns its own image's
        policy.
        """
        from ..data.base import FileSource, UnreadableImageError

        source = FileSource()
        self._ensure_eval()
        for p in paths:
            path = Path(p)
            try:
                img = source.open(path)
            except UnreadableImageError as e:
                yield FileResult(path, None, _unreadable(e.cause))
                continue
            yield FileResult(path, self._predict_image(img, top_k))

    def _ensure_eval(self) -> None:
        """Eval mode, switched only where the caller left the model training: ``eval()``
        drops every cache (the merged filters), so a call in eval mode keeps them."""
        if any(m.training for m in self.model.modules()):
            self.model.eval()

    def _predict_image(self, img: Image.Image, top_k: int) -> Prediction:
        if top_k < 1:
            raise AdaFilterError(f"top_k must be >= 1, got {top_k}")
        x = self.transform(img).unsqueeze(0).to(self.device)  # (1, 3, R, R)
        with torch.inference_mode():
            policy = None
            if isinstance(self.model, AdaFilterModel):
                # this call's own decisions: model.policies may be another thread's by now
                logits, pol = self.model.forward_with_policies(x)  # pol: {layer: (1, C_out)}
                policy = {name: float(pol[name].float().mean()) for name in self.gated_layers}
            else:
                logits = self.model(x)
            probs = logits.float().softmax(1)[0]  # (num_classes,)
            p, idx = probs.topk(min(top_k, probs.numel()))
        indices = [int(i) for i in idx.tolist()]
        top = [(self.class_names[i], float(v)) for i, v in zip(indices, p.tolist(), strict=True)]
        return Prediction(top_k=top, indices=indices, policy=policy)


def _unreadable(exc: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):  # its text repeats a file object's repr
        return "not an image format PIL can decode"
    return one_line(exc, 120)


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedRun:
    """Load a trained run for inference.

    Args:
        path: A run directory (the ``--out`` of ``adafilter train``), its ``checkpoint.pt``, or
            a file written by ``adafilter export`` / :func:`~adafilter.deploy.export_run`.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a device.

    Returns:
        The :class:`LoadedRun`; its model is in eval mode.

    Raises:
        CheckpointError: Missing, corrupt or foreign file, or weights of another model
            (one-line message).
    """
    from ..data.transforms import build_transforms
    from ..distributed import DistEnv
    from ..training.build import resolve_device

    path = resolve_run_path(path)
    kind, payload, meta = read_model_file(path)
    rebuilt = rebuild_model(payload, path)
    dev = device if isinstance(device, torch.device) else resolve_device(str(device), DistEnv())
    model = rebuilt.model.to(dev).eval()
    if kind == "checkpoint":
        metrics = payload.get("metrics") or []
        epoch = int(payload["epoch"]) if "epoch" in payload else None
        test_acc = metrics[-1].get("test_acc") if metrics else None
        resolution, mean, std = rebuilt.resolution, rebuilt.mean, rebuilt.std
    else:
        epoch, test_acc = meta.get("epoch"), meta.get("test_acc")
        t = meta["transform"]
        resolution, mean, std = int(t["resolution"]), tuple(t["mean"]), tuple(t["std"])
    transform = build_transforms(
        False, resolution=resolution, mean=mean, std=std, augment=rebuilt.config.augment
    )
    return LoadedRun(
        model=model,
        class_names=rebuilt.class_names,
        transform=transform,
        method=rebuilt.config.method,
        config=rebuilt.config,
        adafilter_config=model.config if isinstance(model, AdaFilterModel) else None,
        backbone=rebuilt.config.backbone,
        resolution=resolution,
        mean=mean,
        std=std,
        device=dev,
        source=path,
        kind=kind,
        epoch=epoch,
        test_acc=test_acc,
    )
