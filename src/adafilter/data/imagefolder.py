"""A user's own data: ``train/<class>/*`` and ``val/<class>/*`` (or ``test/<class>/*``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..errors import DataError
from .base import FileSource, ImageList
from .registry import DatasetSpec, register

_FIX = "lay it out as DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg"


def _eval_dir(root: Path) -> Path:
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"missing eval folder {root / 'val'} (or {root / 'test'}); {_FIX}")


def _scan(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """torchvision's make_dataset, tolerating empty class folders (reported by the caller)."""
    try:
        return make_dataset(str(folder), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    except TypeError:  # torchvision < 0.18 has no allow_empty: scan class by class
        out: list[tuple[str, int]] = []
        for c, i in class_to_idx.items():
            try:
                out += make_dataset(str(folder), {c: i}, IMG_EXTENSIONS)
            except FileNotFoundError:
                pass
        return sorted(out)


def load(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Read ``root/train`` and ``root/val`` (or ``root/test``) class folders."""
    del seed
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"missing train folder {train_dir}; {_FIX}")
    eval_dir = _eval_dir(root)
    try:
        classes, class_to_idx = find_classes(str(train_dir))
    except FileNotFoundError:
        raise DataError(f"no class folders in {train_dir}; {_FIX}") from None
    extra = sorted(e.name for e in eval_dir.iterdir() if e.is_dir() and e.name not in class_to_idx)
    if extra:
        raise DataError(
            f"{eval_dir} has class folder(s) not in {train_dir}: {', '.join(extra)}; "
            "use the same class folders in both"
        )
    out = []
    for folder, allow_empty in ((train_dir, False), (eval_dir, True)):
        eval_classes = {c: i for c, i in class_to_idx.items() if (folder / c).is_dir()}
        samples = _scan(folder, eval_classes)
        if not allow_empty:
            counts = Counter(label for _, label in samples)
            empty = [c for c, i in class_to_idx.items() if counts[i] == 0]
            if empty:
                raise DataError(
                    f"class folder(s) without images in {folder}: {', '.join(empty)}; add images "
                    f"({', '.join(IMG_EXTENSIONS[:4])}, ...) or remove the folder(s)"
                )
        if not samples:
            raise DataError(f"no images in {folder}; {_FIX}")
        out.append(ImageList(FileSource(), samples, classes))
    return out[0], out[1]


SPEC = register(
    DatasetSpec(
        name="imagefolder",
        load=load,
        layout="train/<class>/*.jpg + val/<class>/*.jpg (or test/)",
    )
)
