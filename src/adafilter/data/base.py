"""Image lists shared by every dataset layout, and the corrupt-image-skipping wrapper.

Every loader in this package turns its official on-disk layout into two :class:`ImageList`
objects (train, eval): a list of ``(key, label)`` samples plus an :class:`ImageSource` that
turns a key into a PIL image (a file path, a member of a zip archive, or a row of an array).
Keeping the decoding behind one interface lets ``check_data_root`` verify every image and
lets :class:`SafeImageDataset` catch decoding errors in exactly one place.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.context
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

Key = Any  # str path, zip member name or int row, depending on the ImageSource
Sample = tuple[Key, int]


class UnreadableImageError(Exception):
    """An image that exists in the split lists but cannot be opened or decoded."""

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f"{where}: {type(cause).__name__}: {cause}".replace("\n", " "))
        self.where = where
        self.cause = cause


class UnreadableImageWarning(UserWarning):
    """Emitted (once per dataset and process) when unreadable images are skipped."""


class ImageSource(Protocol):
    """Turns a sample key into a decoded PIL image."""

    def open(self, key: Key) -> Image.Image: ...

    def verify(self, key: Key) -> None: ...

    def describe(self, key: Key) -> str: ...


def _decode(fp: Any) -> Image.Image:
    img = Image.open(fp)
    img.load()  # force decoding now so truncated/corrupt files fail inside the loader
    return img


class FileSource:
    """Keys are image file paths."""

    def open(self, key: Key) -> Image.Image:
        try:
            with open(key, "rb") as f:
                return _decode(f)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
            raise UnreadableImageError(str(key), exc) from exc

    def verify(self, key: Key) -> None:
        try:
            with Image.open(key) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001
            raise UnreadableImageError(str(key), exc) from exc

    def describe(self, key: Key) -> str:
        return str(key)


class ZipSource:
    """Keys are member names of one zip archive, read without extracting it.

    The ``ZipFile`` handle is opened lazily and re-opened after a fork (DataLoader workers):
    a handle shared between processes would interleave seeks on the same file descriptor.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_zip": None, "_pid": -1}

    def _read(self, key: Key) -> bytes:
        return self._handle().read(key)

    def open(self, key: Key) -> Image.Image:
        try:
            return _decode(io.BytesIO(self._read(key)))
        except Exception as exc:  # noqa: BLE001
            raise UnreadableImageError(self.describe(key), exc) from exc

    def verify(self, key: Key) -> None:
        try:
            with Image.open(io.BytesIO(self._read(key))) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001
            raise UnreadableImageError(self.describe(key), exc) from exc

    def describe(self, key: Key) -> str:
        return f"{self.path}:{key}"


class ArraySource:
    """Keys are row indices of a uint8 array of grayscale images (N, H, W)."""

    verifiable = False  # already decoded when the file was parsed: nothing to verify

    def __init__(self, images: np.ndarray, name: str = "array") -> None:
        self.images = images
        self.name = name

    def open(self, key: Key) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.images[key]), mode="L")

    def verify(self, key: Key) -> None:
        return None  # already decoded when the IDX file was parsed

    def describe(self, key: Key) -> str:
        return f"{self.name}[{key}]"


class ImageList(Dataset):
    """A split: samples ``(key, label)`` decoded by ``source``, with an optional transform.

    Args:
        source: Decodes a key into a PIL image.
        samples: ``(key, label)`` pairs, labels in ``[0, len(classes))``.
        classes: Class names indexed by label.
        transform: Applied to the decoded PIL image.
    """

    def __init__(
        self,
        source: ImageSource,
        samples: Sequence[Sample],
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.source = source
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        key, label = self.samples[index]
        img = self.source.open(key)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def subset(self, indices: Sequence[int]) -> ImageList:
        """Return a new list holding only ``indices`` (same source, classes and transform)."""
        return ImageList(
            self.source, [self.samples[i] for i in indices], self.classes, self.transform
        )


def balanced_subset(targets: Sequence[int], per_class: int, seed: int) -> list[int]:
    """Indices of at most ``per_class`` samples of each class, chosen reproducibly.

    Args:
        targets: Label of every sample.
        per_class: Samples kept per class (all of a class when it has fewer).
        seed: Selection seed; the same seed always picks the same indices.

    Returns:
        Sorted indices into ``targets``.
    """
    if per_class < 1:
        raise DataError(f"subset_per_class must be >= 1, got {per_class}; pass a positive count")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    keep: list[int] = []
    for label in sorted(by_class):
        idx = np.asarray(by_class[label])
        keep.extend(int(i) for i in rng.permutation(idx)[:per_class])
    return sorted(keep)


#: Label of an unreadable evaluation image in ``drop`` mode (its image is ``None``).
DROPPED_LABEL = -1


def collate_dropping(batch: Sequence[tuple[Any, int]]) -> tuple[Any, Any]:
    """``default_collate`` that keeps dropped samples as zero images labelled ``DROPPED_LABEL``.

    The batch keeps its size (samplers and shards stay aligned); the evaluation masks these
    rows out and counts them.
    """
    import torch
    from torch.utils.data import default_collate

    real = next((img for img, _ in batch if img is not None), None)
    if real is None:  # every image of the batch unreadable
        return torch.zeros(len(batch), 0), torch.full((len(batch),), DROPPED_LABEL)
    filled = [(real.new_zeros(real.shape) if img is None else img, y) for img, y in batch]
    return default_collate(filled)


class SafeImageDataset(Dataset):
    """Wraps an :class:`ImageList` so an unreadable image never crashes an epoch.

    When ``base[i]`` cannot be decoded, training (the default, ``drop=False``) gets the next
    readable sample in index order (``i+1, i+2, ...``, wrapping around) instead, with its own
    label, so a batch stays consistent and the substitution is deterministic. An evaluation
    split (``drop=True``) returns ``(None, DROPPED_LABEL)`` instead, so the image is left out
    of the evaluation rather than counting another one twice (batch with
    :func:`collate_dropping`). Known-bad indices are remembered
    per process and skipped directly afterwards. The first skip in each process emits one
    :class:`UnreadableImageWarning`; :attr:`num_skipped` counts skips across DataLoader worker
    processes and :meth:`report_skipped` emits one counting warning (e.g. at epoch end).
    With ``strict=True`` an unreadable image raises :class:`~adafilter.errors.DataError`.

    Args:
        base: The split to wrap.
        name: Dataset/split name used in messages, e.g. ``"stanford-dogs/train"``.
        strict: Raise instead of skipping.
        drop: Drop unreadable images (evaluation) instead of replacing them (training).
    """

    def __init__(
        self, base: ImageList, name: str, *, strict: bool = False, drop: bool = False
    ) -> None:
        self.base = base
        self.name = name
        self.strict = strict
        self.drop = drop
        self._bad: set[int] = set()
        self._warned_pid = -1
        self._reported = 0
        # Shared across forked/spawned DataLoader workers so the main process sees the total.
        try:
            self._counter: Any = multiprocessing.Value("q", 0)
        except OSError:  # no shared memory (some sandboxes): count in this process only
            self._counter = _PlainCounter(0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # A multiprocessing.Value can only travel to a child being started; for any other
        # pickling (deepcopy, torch.save) keep a plain snapshot of the count instead.
        if multiprocessing.context.get_spawning_popen() is None:
            state["_counter"] = _PlainCounter(self.num_skipped)
        return state

    @property
    def targets(self) -> list[int]:
        return self.base.targets

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    @property
    def transform(self) -> Callable[[Image.Image], Any] | None:
        return self.base.transform

    @transform.setter
    def transform(self, value: Callable[[Image.Image], Any] | None) -> None:
        self.base.transform = value

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far (all processes)."""
        return int(self._counter.value)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.drop:
            return self._get_or_drop(index)
        n = len(self.base)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return self.base[i]
            except UnreadableImageError as exc:
                self._skip(i, exc)
        raise DataError(f"{self.name}: no readable image left; run `adafilter data check` on it")

    def _get_or_drop(self, index: int) -> tuple[Any, int]:
        if index not in self._bad:
            try:
                return self.base[index]
            except UnreadableImageError as exc:
                self._skip(index, exc)
        return None, DROPPED_LABEL

    def _skip(self, index: int, exc: UnreadableImageError) -> None:
        if self.strict:
            raise DataError(
                f"{self.name}: unreadable image {exc}; delete or replace it, or turn off "
                "strict image checking to skip such images"
            ) from None
        self._bad.add(index)
        with self._counter.get_lock():
            self._counter.value += 1
        if self._warned_pid != os.getpid():
            self._warned_pid = os.getpid()
            what = (
                "it is dropped from the evaluation"
                if self.drop
                else "it is replaced by the next readable sample"
            )
            warnings.warn(
                f"{self.name}: skipping unreadable image {exc}; {what} and further skips are "
                "only counted (run `adafilter data check` to list them all)",
                UnreadableImageWarning,
                stacklevel=3,
            )

    def report_skipped(self) -> int:
        """Warn once with the number of images skipped since the last report.

        Returns:
            The number of newly skipped images (0 emits no warning).
        """
        total = self.num_skipped
        new = total - self._reported
        self._reported = total
        if new > 0:
            warnings.warn(
                f"{self.name}: skipped {new} unreadable image(s) ({total} in total); "
                "run `adafilter data check` to list them",
                UnreadableImageWarning,
                stacklevel=2,
            )
        return new


class _PlainCounter:
    """Stand-in for ``multiprocessing.Value`` after ordinary pickling."""

    def __init__(self, value: int) -> None:
        self.value = value

    def get_lock(self) -> _NullLock:
        return _NullLock()


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def require_dir(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a directory, else raise a one-line :class:`DataError`."""
    if not path.is_dir():
        raise DataError(f"missing {what} folder {path}; {fix}")
    return path


def require_file(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a file, else raise a one-line :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"missing {what} {path}; {fix}")
    return path


def check_files_exist(paths: Sequence[str], listed_in: str, fix: str) -> None:
    """Raise one :class:`DataError` naming the missing files among ``paths`` (if any)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) listed in {listed_in} are missing, e.g. {missing[0]}; {fix}"
        )
