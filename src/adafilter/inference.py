"""Use a trained run: load it back, classify images, export it for deployment.

* :func:`load` takes a run directory, its ``checkpoint.pt`` or a file written by
  :func:`export_run` and returns a :class:`LoadedRun`: the model in eval mode plus its class
  names, evaluation transform, method and configuration.
* :func:`rebuild_model` is the one place that turns saved weights back into a model (also used
  by ``adafilter eval``): the run's backbone and method are rebuilt without pretrained weights
  and the saved state is loaded strictly, so a file of another model is refused.
* :func:`export_run` writes the weights alone (safetensors when installed, else a
  ``weights_only`` torch file) with the metadata embedded and next to it as JSON;
  :func:`export_program` writes a ``torch.export`` program that runs without adafilter.

Nothing here unpickles code: torch files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_write_bytes,
    atomic_write_json,
    check_checkpoint,
    get_rng_state,
    read_weights_only,
    set_rng_state,
)
from .config import AdaFilterConfig
from .errors import AdaFilterError, CheckpointError
from .layers.gated_conv import bn_affine
from .model import AdaFilterModel

if TYPE_CHECKING:
    from PIL import Image

    from .methods import Prepared
    from .train_config import TrainConfig

__all__ = [
    "EXPORT_FORMAT",
    "FileResult",
    "LoadedRun",
    "Prediction",
    "RebuiltModel",
    "export_program",
    "export_run",
    "find_images",
    "load",
    "rebuild_model",
    "save_policy_chart",
]

EXPORT_FORMAT = "adafilter-export"
EXPORT_VERSION = 1
ExportFormat = Literal["auto", "safetensors", "torch"]
_RUN_FIX = (
    "pass a run directory (the out= of `adafilter train`), its checkpoint.pt or a file "
    "written by `adafilter export`"
)


# ---- rebuilding ----------------------------------------------------------------------------


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
    from .train_config import TrainConfig
    from .training.build import build_model
    from .training.run_dir import load_model_state

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


# ---- loading -------------------------------------------------------------------------------


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
            self.model.eval()
            try:
                return self._predict_image(image, top_k)
            finally:
                self.model.eval()  # see predict_files
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
        decision changed since the previous image.
        """
        from .data.base import FileSource, UnreadableImageError

        source = FileSource()
        self.model.eval()
        try:
            for p in paths:
                path = Path(p)
                try:
                    img = source.open(path)
                except UnreadableImageError as e:
                    yield FileResult(path, None, _unreadable(e.cause))
                    continue
                yield FileResult(path, self._predict_image(img, top_k))
        finally:
            # The batch-1 merge cache now holds inference tensors, which a later forward
            # outside inference mode could not update in place; eval() drops it.
            self.model.eval()

    def _predict_image(self, img: Image.Image, top_k: int) -> Prediction:
        if top_k < 1:
            raise AdaFilterError(f"top_k must be >= 1, got {top_k}")
        x = self.transform(img).unsqueeze(0).to(self.device)  # (1, 3, R, R)
        with torch.inference_mode():
            probs = self.model(x).float().softmax(1)[0]  # (num_classes,)
            p, idx = probs.topk(min(top_k, probs.numel()))
            policy = None
            if self.has_policies:
                pol = self.model.policies  # {layer: bool (1, C_out)}
                policy = {name: float(pol[name].float().mean()) for name in self.gated_layers}
        indices = [int(i) for i in idx.tolist()]
        top = [(self.class_names[i], float(v)) for i, v in zip(indices, p.tolist(), strict=True)]
        return Prediction(top_k=top, indices=indices, policy=policy)


def _unreadable(exc: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):  # its text repeats a file object's repr
        return "not an image format PIL can decode"
    return _short(exc)


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedRun:
    """Load a trained run for inference.

    Args:
        path: A run directory (the ``--out`` of ``adafilter train``), its ``checkpoint.pt``, or
            a file written by ``adafilter export`` / :func:`export_run`.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a device.

    Returns:
        The :class:`LoadedRun`; its model is in eval mode.

    Raises:
        CheckpointError: Missing, corrupt or foreign file, or weights of another model
            (one-line message).
    """
    from .data.transforms import build_transforms
    from .distributed import DistEnv
    from .training.build import resolve_device

    path = _resolve_run_path(path)
    kind, payload, meta = _read_model_file(path)
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
    transform = build_transforms(False, resolution=resolution, mean=mean, std=std)
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


def _resolve_run_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        ckpt = path / "checkpoint.pt"
        if not ckpt.is_file():
            raise CheckpointError(f"{str(path)!r} holds no checkpoint.pt; {_RUN_FIX}")
        return ckpt
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; {_RUN_FIX}")
    return path


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), or
    ``None`` when ``path`` is not one."""
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            return None
        (size,) = struct.unpack("<Q", head[:8])
        if size > min(os.path.getsize(path) - 8, 100_000_000):
            return None
        f.seek(8)
        try:
            header = json.loads(f.read(size))
        except ValueError:
            return None
    return header if isinstance(header, dict) else None


def _read_model_file(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(kind, payload for rebuild_model, export metadata)`` of a checkpoint or export."""
    header = _safetensors_header(path)
    if header is not None:
        meta = _export_metadata((header.get("__metadata__") or {}).get("adafilter"), path)
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(
                f"{str(path)!r} is a safetensors file; install safetensors "
                "(pip install safetensors) to load it"
            ) from None
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # truncated or corrupt tensor data
            raise CheckpointError(f"cannot read {str(path)!r}: {_short(e)}") from None
        return "export", {**meta, "model": state}, meta
    obj = read_weights_only(path, what="model file")
    if isinstance(obj, dict) and obj.get("format") == EXPORT_FORMAT:
        meta = _export_metadata(obj.get("metadata"), path)
        return "export", {**meta, "model": obj.get("model")}, meta
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return "checkpoint", check_checkpoint(obj, path), {}
    raise CheckpointError(
        f"{str(path)!r} is neither an adafilter checkpoint nor an exported model; {_RUN_FIX}"
    )


def _export_metadata(raw: Any, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an adafilter export; {_RUN_FIX}")
    if int(meta.get("version", 0)) > EXPORT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has export version {meta.get('version')}; this adafilter reads up "
            f"to {EXPORT_VERSION}"
        )
    return meta


# ---- prediction helpers (CLI) --------------------------------------------------------------


def find_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively for
    image extensions (sorted).

    Raises:
        AdaFilterError: An input does not exist, or nothing to classify was found.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS and not f.name.startswith(".")
            )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise AdaFilterError(f"{str(p)!r} does not exist; pass image files or folders")
    if not files:
        shown = ", ".join(repr(str(i)) for i in inputs)
        raise AdaFilterError(
            f"no images found in {shown}; pass image files or folders holding "
            f"{', '.join(IMG_EXTENSIONS[:4])}, ... files"
        )
    return files


def save_policy_chart(
    policies: Sequence[tuple[str, dict[str, float]]],
    path: str | os.PathLike[str],
    *,
    max_images: int = 8,
) -> None:
    """Bar chart of per-image policies (the per-example view of the paper's Fig. 4).

    Args:
        policies: ``(image label, {gated layer: fraction of fine-tuned filters})`` per image.
        path: The PNG to write (atomically; missing folders are created).
        max_images: At most this many images are drawn, side by side per layer.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = list(policies)[:max_images]
    if not shown:
        raise AdaFilterError("no policies to draw")
    layers = list(shown[0][1])
    n, x = len(shown), np.arange(len(layers))
    fig = Figure(figsize=(max(6.0, 0.3 * len(layers) * max(1, n // 2) + 2.0), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / n
    for i, (label, pol) in enumerate(shown):
        values = [pol[name] for name in layers]
        ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, layers, rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of filters fine-tuned (F)")
    more = f" (first {n} of {len(policies)} images)" if len(policies) > n else ""
    ax.set_title(f"Per-image policy: 1 = fine-tuned filters, 0 = pretrained S{more}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


# ---- export --------------------------------------------------------------------------------


def _metadata(run: LoadedRun, weights: Path, fmt: str) -> dict[str, Any]:
    r = run.resolution
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "method": run.method,
        "backbone": run.backbone,
        "num_classes": len(run.class_names),
        "class_names": list(run.class_names),
        "transform": {
            "resolution": r,
            "resize": max(r, int(r * 256 / 224)),
            "center_crop": r,
            "mean": list(run.mean),
            "std": list(run.std),
            "steps": "RGB -> Resize(resize) -> CenterCrop(center_crop) -> ToTensor -> "
            "Normalize(mean, std)",
        },
        "adafilter": run.adafilter_config.to_dict() if run.adafilter_config else None,
        "gated_layers": run.gated_layers,
        "config": run.config.to_dict(),
        "epoch": run.epoch,
        "test_acc": run.test_acc,
        "weights": weights.name,
        "weights_format": fmt,
        "torch": str(torch.__version__),  # TorchVersion would not load weights_only
    }


def export_run(
    run: str | os.PathLike[str] | LoadedRun,
    to: str | os.PathLike[str],
    *,
    format: ExportFormat = "auto",
) -> dict[str, Any]:
    """Write a run's trained weights as a self-contained file plus a JSON of metadata.

    The file holds the model's state (no optimizer, RNG or metrics) and the metadata
    (backbone, classes, evaluation transform, method, AdaFilter and training configuration)
    that :func:`load` needs; the same metadata is written to ``<to without suffix>.json``.

    Args:
        run: A run directory, checkpoint, exported file or :class:`LoadedRun`.
        to: The weights file to write (folders are created).
        format: ``"safetensors"``, ``"torch"`` (a ``weights_only`` torch file) or ``"auto"``
            (safetensors when it is installed).

    Returns:
        The metadata, with ``"weights_path"`` and ``"metadata_path"`` added.

    Raises:
        AdaFilterError: Bad destination or format; the errors of :func:`load`.
    """
    loaded = run if isinstance(run, LoadedRun) else load(run, device="cpu")
    to = Path(to).expanduser()
    if to.suffix.lower() == ".json" or to.is_dir():
        raise AdaFilterError(
            f"to={str(to)!r} must name the weights file (e.g. model.safetensors or model.pt); "
            "its metadata goes next to it as JSON"
        )
    fmt = _export_format(format)
    meta = _metadata(loaded, to, fmt)
    # Contiguous CPU copies: safetensors needs them, and a GPU-loaded run exports the same.
    state = {k: v.detach().to("cpu").contiguous() for k, v in loaded.model.state_dict().items()}
    to.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save(state, metadata={"adafilter": json.dumps(meta)})
    else:
        buf = io.BytesIO()
        torch.save({"format": EXPORT_FORMAT, "metadata": meta, "model": state}, buf)
        data = buf.getvalue()
    atomic_write_bytes(to, data)
    meta_path = to.with_suffix(".json")
    atomic_write_json(meta_path, meta)
    return {**meta, "weights_path": str(to), "metadata_path": str(meta_path)}


def _export_format(format: str) -> str:
    try:
        import safetensors.torch  # noqa: F401

        have = True
    except ImportError:
        have = False
    if format == "auto":
        return "safetensors" if have else "torch"
    if format == "safetensors" and not have:
        raise AdaFilterError(
            "format=safetensors needs the safetensors package; pip install safetensors "
            "or use format=torch"
        )
    if format not in ("safetensors", "torch"):
        raise AdaFilterError(f"unknown export format {format!r}; use auto, safetensors or torch")
    return format


class _DeployGatedConv(nn.Module):
    """A gated layer for ``torch.export``: both BN-folded branches, selected per example.

    The eager fast path decides on the host which filters to compute (CPU) and caches merged
    filters; an exported graph can do neither, so this computes both folded convs and selects
    with ``where``. Outputs equal the eval forward; the cost is the dual path's two convs.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        conv = layer.conv_s
        self.index = int(layer.index)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        bn_f, bn_s = (layer.bn_f, layer.bn_s) if layer.gated_bn else (layer.bn, layer.bn)
        for tag, c, bn in (("f", layer.conv_f, bn_f), ("s", conv, bn_s)):
            with torch.no_grad():
                scale, shift = bn_affine(bn)  # eval-mode BN folded into the filters
                w = c.weight * scale.view(-1, 1, 1, 1)
                b = shift if c.bias is None else c.bias * scale + shift
            self.register_buffer(f"w_{tag}", w.contiguous())
            self.register_buffer(f"b_{tag}", b.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        from .layers.gated_conv import _SOURCE

        source = _SOURCE.get()
        assert source is not None, "a deploy layer runs inside its AdaFilterModel"
        g = source.policy(self.index, x)  # (B, C_out)
        sel = g if g.dtype == torch.bool else g > 0.5
        args = (self.stride, self.padding, self.dilation, self.groups)
        yf = F.conv2d(x, self.w_f, self.b_f, *args)
        ys = F.conv2d(x, self.w_s, self.b_s, *args)
        return torch.where(sel[:, :, None, None], yf, ys)


def _deploy_copy(model: nn.Module) -> nn.Module:
    """An export-friendly copy of ``model`` (eval mode, no trainable parameters)."""
    copied = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    if isinstance(copied, AdaFilterModel):
        for name, layer in copied.gated_layers().items():
            parent, _, attr = name.rpartition(".")
            owner = copied.model.get_submodule(parent) if parent else copied.model
            setattr(owner, attr, _DeployGatedConv(layer))
    return copied


def export_program(
    run: str | os.PathLike[str] | LoadedRun, to: str | os.PathLike[str]
) -> dict[str, Any]:
    """Write a ``torch.export`` program of the model (normalised images -> logits).

    The program runs without adafilter: ``torch.export.load(to).module()(x)`` with ``x`` of
    shape (B, 3, R, R) preprocessed like ``LoadedRun.transform``; the batch size is dynamic.
    AdaFilter layers run both folded filter banks and select per example (the eager batch-1
    fast path decides on the host, which a graph cannot). ``random-policy`` is refused: its
    policies are drawn from a host random generator on every call.

    Args:
        run: A run directory, checkpoint, exported file or :class:`LoadedRun`.
        to: The ``.pt2`` file to write.

    Returns:
        ``{"program_path", "input_shape", "method"}``.

    Raises:
        AdaFilterError: ``random-policy`` runs, or ``torch.export`` failing on the model.
    """
    loaded = run if isinstance(run, LoadedRun) else load(run, device="cpu")
    model = loaded.model
    if isinstance(model, AdaFilterModel) and model.policy_mode == "random":
        raise AdaFilterError(
            f"a {loaded.method} model draws its policies from a host random generator on every "
            "call and cannot be exported as a program; use `adafilter export` without "
            "program= and adafilter.load"
        )
    deploy = _deploy_copy(model)
    r = loaded.resolution
    example = torch.randn(2, 3, r, r)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        # Gradients on (no parameter needs them): the gate then rebuilds its fused eval
        # weights in the graph instead of using its host-side cache, which export cannot read.
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            program = torch.export.export(
                deploy, (example,), dynamic_shapes=({0: batch},), strict=False
            )
    except Exception as e:  # noqa: BLE001 - any tracing failure: say so in one line
        raise AdaFilterError(
            f"torch.export failed for this {loaded.method} model ({type(e).__name__}: "
            f"{_short(e)}); use the weights export and adafilter.load instead"
        ) from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    to = Path(to).expanduser()
    to.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(to, buf.getvalue())
    return {"program_path": str(to), "input_shape": ["B", 3, r, r], "method": loaded.method}
