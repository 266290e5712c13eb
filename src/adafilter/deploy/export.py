"""Exporting a run: its weights plus metadata (:func:`export_run`) and a ``torch.export``
program that runs without adafilter (:func:`export_program`)."""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import atomic_write_bytes, atomic_write_json
from ..data.transforms import eval_resize
from ..errors import AdaFilterError
from ..layers.gated_conv import bn_affine
from ..tuner import AdaFilterModel
from ..utils.modules import set_submodule
from ..utils.text import one_line
from .files import EXPORT_FORMAT, EXPORT_VERSION
from .loaded import LoadedRun, load

__all__ = ["ExportFormat", "export_program", "export_run"]

ExportFormat = Literal["auto", "safetensors", "torch"]


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
            "resize": eval_resize(r, run.config.augment),
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
        from ..layers.gated_conv import _SOURCE

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
            set_submodule(copied.model, name, _DeployGatedConv(layer))
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
            f"{one_line(e, 120)}); use the weights export and adafilter.load instead"
        ) from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    to = Path(to).expanduser()
    to.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(to, buf.getvalue())
    return {"program_path": str(to), "input_shape": ["B", 3, r, r], "method": loaded.method}
