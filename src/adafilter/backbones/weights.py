"""Weights files: safe state_dict reading, architecture guessing, the one key comparison."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AdaFilterError, CheckpointError
from ..utils.text import one_line
from .registry import BackboneSpec

__all__ = ["KeyDiff", "compare_keys", "load_state_dict_file", "load_weights"]


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP checkpoints prefix "module.", torch.compile'd ones "_orig_mod.".
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # unwrap {"state_dict": ...} / {"model": ...}, possibly nested
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
        ):
            return _strip_prefixes(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model") if k in obj), None)
            if isinstance(inner, Mapping):
                obj = inner
                continue
        break
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        what = f"a dict with keys {keys}" if keys else "an empty dict"
    else:
        what = f"a {type(obj).__name__}"
    raise CheckpointError(
        f"weights file {path} holds {what}, not a state_dict; expected a dict of tensors or a "
        "dict with a 'state_dict'/'model' entry (save it with torch.save(model.state_dict(), PATH))"
    )


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` safely.

    Uses ``torch.load(map_location="cpu", weights_only=True)``, accepts a raw state_dict or a
    dict with a ``'state_dict'``/``'model'`` entry and strips ``module.``/``_orig_mod.`` prefixes.

    Args:
        path: File written by ``torch.save``.

    Returns:
        The state_dict (parameter name -> tensor).

    Raises:
        CheckpointError: The file is missing, unreadable, holds pickled Python objects other than
            tensors, or is not a state_dict.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"weights file {p} does not exist; pass an existing state_dict file (weights=FILE)"
        )
    if not p.is_file():
        raise CheckpointError(f"weights path {p} is not a file; pass a state_dict file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"weights file {p} contains a pickled Python object ({found.group(1)}), which is "
                "never loaded for safety; re-save just the tensors with "
                "torch.save(model.state_dict(), PATH)"
            ) from None
        raise CheckpointError(
            f"cannot read weights file {p}: not a PyTorch weights file (unsupported pickle "
            "data); pass a state_dict saved with torch.save"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/KeyError/... for corrupt files
        raise CheckpointError(
            f"cannot read weights file {p}: not a PyTorch weights file "
            f"({type(exc).__name__}: {one_line(exc)}); pass a state_dict saved with torch.save"
        ) from None
    return _as_state_dict(obj, p)


def _block_count(sd: Mapping[str, torch.Tensor], layer: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{layer}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


# EfficientNet-Lite variants by their number of MBConv blocks.
_LITE_BY_BLOCKS = {16: "efficientnet-lite0", 21: "efficientnet-lite2"}


def _guess_backbone(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Name the registered backbone whose layout ``sd`` looks like, if recognisable."""
    if "_conv_stem.weight" in sd:
        return _LITE_BY_BLOCKS.get(_block_count(sd, "_blocks"))
    conv1 = sd.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        return None
    if "linear.weight" in sd and conv1.shape[0] == 16:
        return f"cifar-resnet{6 * _block_count(sd, 'layer1') + 2}"
    if "fc.weight" not in sd or conv1.shape[0] != 64:
        return None
    counts = tuple(_block_count(sd, f"layer{i}") for i in range(1, 5))
    if "layer1.0.conv3.weight" not in sd:
        return {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}.get(counts)
    conv2 = sd.get("layer1.0.conv2.weight")
    if counts == (3, 4, 6, 3) and conv2 is not None:
        return {64: "resnet50", 4: "resnext50_32x4d", 128: "wide_resnet50_2"}.get(conv2.shape[1])
    return {(3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}.get(counts)


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


@dataclass(frozen=True)
class KeyDiff:
    """How a state_dict's keys differ from a model's (the one comparison of weights keys).

    Attributes:
        missing: The model's keys the state_dict lacks (model order).
        unexpected: The state_dict's keys the model lacks (file order).
        mismatched: Keys in both whose tensor shapes differ (file order).
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def counts(self) -> str:
        """``"N missing, N unexpected, N mis-shaped tensors, e.g. 'key'"``."""
        first = (self.missing or self.unexpected or self.mismatched or [""])[0]
        return (
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mis-shaped tensors, e.g. {first!r}"
        )


def compare_keys(
    own: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    *,
    optional: Callable[[str], bool] = lambda key: False,
    any_shape: Callable[[str], bool] = lambda key: False,
) -> KeyDiff:
    """Compare a model's state_dict ``own`` with a loaded one ``sd``.

    Args:
        own: ``model.state_dict()``.
        sd: The state_dict to load.
        optional: Keys of ``own`` that ``sd`` may lack.
        any_shape: Keys whose shape may differ (a classifier about to be replaced).
    """
    return KeyDiff(
        missing=[k for k in own if k not in sd and not optional(k)],
        unexpected=[k for k in sd if k not in own],
        mismatched=[k for k in sd if k in own and sd[k].shape != own[k].shape and not any_shape(k)],
    )


def load_weights(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    spec: BackboneSpec,
    origin: str,
    keep_head: bool,
) -> None:
    """Load ``sd`` strictly into ``model``; the head only when ``keep_head``."""
    head_prefix = spec.head_name + "."
    own = model.state_dict()
    diff = compare_keys(
        own,
        sd,
        # old BN files lack num_batches_tracked; a replaced head need not be in the file
        optional=lambda k: (
            k.endswith("num_batches_tracked") or (not keep_head and k.startswith(head_prefix))
        ),
        any_shape=lambda k: k.startswith(head_prefix),
    )
    if diff:
        raise CheckpointError(
            f"weights {origin} do not fit backbone {spec.name!r}: {_hint(sd, diff, spec)}"
        )
    if keep_head:
        wrong = [k for k in sd if k.startswith(head_prefix) and sd[k].shape != own[k].shape]
        if wrong:
            n_file = sd[spec.head_name + ".weight"].shape[0]
            n_model = own[spec.head_name + ".weight"].shape[0]
            raise AdaFilterError(
                f"the classifier in weights {origin} has {n_file} outputs but num_classes="
                f"{n_model}; pass num_classes={n_file} or drop keep_head"
            )
    merged = dict(own)
    merged.update({k: v for k, v in sd.items() if keep_head or not k.startswith(head_prefix)})
    model.load_state_dict(merged, strict=True)


def _hint(sd: Mapping[str, torch.Tensor], diff: KeyDiff, spec: BackboneSpec) -> str:
    guess = _guess_backbone(sd)
    if guess is not None and guess != spec.name:
        return f"they look like {guess!r} weights; use that backbone or {spec.name} weights"
    parts = [
        f"{label} {_examples(keys)}"
        for label, keys in (
            ("missing", diff.missing),
            ("unexpected", diff.unexpected),
            ("wrong shape", diff.mismatched),
        )
        if keys
    ]
    return "; ".join(parts) + f"; pass weights saved from a {spec.name}"
