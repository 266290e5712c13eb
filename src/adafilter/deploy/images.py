"""Prediction helpers of ``adafilter predict``: finding image files, the policy chart."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from ..errors import AdaFilterError

__all__ = ["find_images", "save_policy_chart"]


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
