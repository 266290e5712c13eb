"""``build_datasets`` and ``check_data_root``: the package's two entry points."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .base import ImageList, SafeImageDataset, UnreadableImageError, balanced_subset
from .registry import DATASETS, DatasetInfo, DatasetSpec
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms


def resolve_root(spec: DatasetSpec, root: str | os.PathLike[str] | None) -> Path:
    """``root`` as a Path, or the dataset's default location; one-line error otherwise."""
    if root is None:
        default = spec.default_root()
        if default is None:
            hint = f" ({spec.how_to_get})" if spec.how_to_get else ""
            raise DataError(
                f"{spec.name} has no default data location; pass data_root=DIR holding "
                f"{spec.layout}{hint}"
            )
        return default
    return Path(root).expanduser()


def download_dataset(
    name: str, root: str | os.PathLike[str] | None, *, base_url: str | None = None
) -> Path:
    """Fetch dataset ``name`` into ``root`` (resumable, checksum-verified, then extracted).

    Args:
        name: Registry name.
        root: Destination data root (``None``: the dataset's default location).
        base_url: Fetch every file from ``base_url/<filename>`` instead of the official URLs
            (mirrors, tests); defaults to ``$ADAFILTER_DOWNLOAD_BASE``.

    Returns:
        The data root.

    Raises:
        DataError: No public download exists, or the download failed.
    """
    spec = DATASETS.get(name)
    path = resolve_root(spec, root)
    if not spec.resources:
        raise DataError(f"{name} cannot be downloaded automatically: {spec.how_to_get}")
    spec.download(path, base_url=base_url)
    return path


def _load(name: str, root: str | os.PathLike[str] | None, seed: int, download: bool):
    spec = DATASETS.get(name)
    path = download_dataset(name, root) if download else resolve_root(spec, root)
    if not path.exists():
        fix = "or fetch it with download=True" if spec.resources else ""
        fix = f"({spec.how_to_get})" if spec.how_to_get else fix
        raise DataError(
            f"data root {path} does not exist; point data_root= at a folder holding "
            f"{spec.layout} {fix}".rstrip()
        )
    try:
        train, evals = spec.load(path, seed)
    except PermissionError as exc:
        raise DataError(
            f"cannot read {exc.filename}: permission denied; fix its permissions"
        ) from None
    if len(train) == 0 or len(evals) == 0:
        raise DataError(f"{name} at {path} has an empty split; check the layout ({spec.layout})")
    return spec, path, train, evals


def build_datasets(
    name: str,
    root: str | os.PathLike[str] | None,
    *,
    resolution: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
    download: bool = False,
    strict_images: bool = False,
    subset_per_class: int | None = None,
    augment: str = "resized-crop",
) -> tuple[SafeImageDataset, SafeImageDataset, DatasetInfo]:
    """Build the train and eval datasets of ``name`` from its official layout at ``root``.

    Args:
        name: A name in :data:`DATASETS` (``adafilter.data.DATASETS.names()``).
        root: Data root; ``None`` uses the dataset's default location if it has one.
        resolution: Side length of the output images.
        mean: Normalisation mean of the backbone.
        std: Normalisation std of the backbone.
        seed: Seed of random splits (Caltech-256) and of ``subset_per_class`` selection.
        download: Fetch the public files first when they are not there yet.
        strict_images: Raise :class:`DataError` on an unreadable image instead of skipping it.
        subset_per_class: Keep at most this many samples per class in each split
            (deterministic per seed); ``None`` keeps everything.
        augment: Training augmentation, one of ``AUGMENTATIONS`` (``transforms``).

    Returns:
        ``(train_ds, eval_ds, info)``. Items are ``(float tensor (3, R, R), int label)``;
        both datasets expose ``.targets`` and ``.classes``.

    Raises:
        DataError: Missing/invalid data root, layout or split files (one-line message).
    """
    spec, _, train, evals = _load(name, root, seed, download)
    if subset_per_class is not None:
        train = train.subset(balanced_subset(train.targets, subset_per_class, seed))
        evals = evals.subset(balanced_subset(evals.targets, subset_per_class, seed + 1))
    kw = {"resolution": resolution, "mean": mean, "std": std, "augment": augment}
    train.transform = build_transforms(True, **kw)
    evals.transform = build_transforms(False, **kw)
    info = DatasetInfo(
        name=spec.name,
        num_classes=len(train.classes),
        class_names=list(train.classes),
        num_train=len(train),
        num_eval=len(evals),
    )
    return (
        SafeImageDataset(train, f"{name}/train", strict=strict_images),
        SafeImageDataset(evals, f"{name}/eval", strict=strict_images, drop=True),
        info,
    )


def _verify_all(lists: Sequence[ImageList], workers: int = 8) -> list[UnreadableImageError]:
    def check(item: tuple[ImageList, object]) -> UnreadableImageError | None:
        lst, key = item
        try:
            lst.source.verify(key)
        except UnreadableImageError as exc:
            return exc
        return None

    items = [
        (lst, key)
        for lst in lists
        if getattr(lst.source, "verifiable", True)
        for key, _ in lst.samples
    ]
    # Threads: verification is file I/O plus C decoding, so they overlap well.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [e for e in pool.map(check, items, chunksize=64) if e is not None]


def check_data_root(
    name: str, root: str | os.PathLike[str] | None, *, seed: int = 0, verify_images: bool = True
) -> dict[str, object]:
    """Check that ``root`` holds dataset ``name`` and that every image can be opened.

    Args:
        name: Registry name.
        root: Data root (``None``: the default location, if any).
        seed: Seed of random splits (Caltech-256).
        verify_images: Open every image with PIL ``verify()`` (header/structure check).

    Returns:
        ``{"dataset": name, "train": N, "eval": N, "classes": K}``.

    Raises:
        DataError: One line naming the problem (missing folder or split file, empty class,
            unreadable images with the count and the first one) and the fix.
    """
    _, path, train, evals = _load(name, root, seed, download=False)
    if verify_images:
        bad = _verify_all([train, evals])
        if bad:
            raise DataError(
                f"{len(bad)} unreadable image(s) in {name} at {path}, first: {bad[0]}; delete or "
                "replace them (training skips them with a warning)"
            )
    return {"dataset": name, "train": len(train), "eval": len(evals), "classes": len(train.classes)}


def with_transform(
    ds: SafeImageDataset,
    transform: Callable[[Any], Any] | None,
    *,
    indices: Sequence[int] | None = None,
    name: str | None = None,
    drop: bool | None = None,
) -> SafeImageDataset:
    """A copy of ``ds`` (optionally only ``indices``) that applies ``transform``.

    The copy has its own sample list, so setting its transform never changes ``ds``.
    ``drop`` (default: as ``ds``) drops unreadable images instead of replacing them.
    """
    base = ds.base.subset(range(len(ds.base)) if indices is None else indices)
    base.transform = transform
    return SafeImageDataset(
        base, name or ds.name, strict=ds.strict, drop=ds.drop if drop is None else drop
    )


def carve_validation(
    train: SafeImageDataset, eval_transform: Callable[[Any], Any] | None, fraction: float, seed: int
) -> tuple[SafeImageDataset, SafeImageDataset]:
    """Split a stratified, seeded validation set off the training split.

    Args:
        train: The training split.
        eval_transform: Transform of the validation images (the evaluation one).
        fraction: Share of each class's images that go to validation (at least one per class
            with two or more images).
        seed: Selection seed.

    Returns:
        ``(train, val)``: the remaining training images (training transform) and the held-out
        ones.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(train.targets):
        by_class.setdefault(int(t), []).append(i)
    val: list[int] = []
    for label in sorted(by_class):
        idx = rng.permutation(np.asarray(by_class[label]))
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val.extend(int(i) for i in idx[:k])
    held = set(val)
    rest = [i for i in range(len(train.targets)) if i not in held]
    return (
        with_transform(train, train.transform, indices=rest),
        with_transform(
            train, eval_transform, indices=sorted(val), name=f"{train.name}:val", drop=True
        ),
    )
