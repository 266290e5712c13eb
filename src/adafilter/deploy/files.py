"""Reading what a run leaves: a run directory, its checkpoint or an exported weights file.

Nothing here unpickles code: torch files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT_FORMAT, check_checkpoint, read_weights_only
from ..errors import CheckpointError
from ..utils.text import one_line

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "RUN_FIX", "read_model_file", "resolve_run_path"]

EXPORT_FORMAT = "adafilter-export"
EXPORT_VERSION = 1
RUN_FIX = (
    "pass a run directory (the out= of `adafilter train`), its checkpoint.pt or a file "
    "written by `adafilter export`"
)


def resolve_run_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        ckpt = path / "checkpoint.pt"
        if not ckpt.is_file():
            raise CheckpointError(f"{str(path)!r} holds no checkpoint.pt; {RUN_FIX}")
        return ckpt
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; {RUN_FIX}")
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


def read_model_file(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
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
            raise CheckpointError(f"cannot read {str(path)!r}: {one_line(e, 120)}") from None
        return "export", {**meta, "model": state}, meta
    obj = read_weights_only(path, what="model file")
    if isinstance(obj, dict) and obj.get("format") == EXPORT_FORMAT:
        meta = _export_metadata(obj.get("metadata"), path)
        return "export", {**meta, "model": obj.get("model")}, meta
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return "checkpoint", check_checkpoint(obj, path), {}
    raise CheckpointError(
        f"{str(path)!r} is neither an adafilter checkpoint nor an exported model; {RUN_FIX}"
    )


def _export_metadata(raw: Any, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an adafilter export; {RUN_FIX}")
    if int(meta.get("version", 0)) > EXPORT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has export version {meta.get('version')}; this adafilter reads up "
            f"to {EXPORT_VERSION}"
        )
    return meta
