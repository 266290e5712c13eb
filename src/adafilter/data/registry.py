"""The dataset registry: one :class:`DatasetSpec` per name, shared by the CLI and the API."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.download import Resource, fetch_resources
from ..utils.registry import Registry
from .base import ImageList

Loader = Callable[[Path, int], tuple[ImageList, ImageList]]


@dataclass
class DatasetInfo:
    """What a model needs to know about a built dataset.

    Attributes:
        name: Registry name, e.g. ``"stanford-dogs"``.
        num_classes: Number of classes (labels are ``0 .. num_classes-1``).
        class_names: Class name of every label.
        num_train: Training samples.
        num_eval: Evaluation samples.
    """

    name: str
    num_classes: int
    class_names: list[str]
    num_train: int
    num_eval: int


@dataclass(frozen=True)
class DatasetSpec:
    """How to read (and optionally fetch) one dataset.

    Attributes:
        name: Registry name.
        load: ``load(root, seed) -> (train, eval)`` reading the official layout at ``root``.
        layout: One line describing the expected layout (used in error messages).
        paper_counts: ``(train, eval, classes)`` from the paper's Table 1, if any.
        resources: Files fetched by ``download=True`` (empty: no public download).
        how_to_get: Where to get the data when there is no public download.
        default_root: Returns the default data root, or ``None`` when there is none.
        is_present: Whether ``root`` already holds the data (skips the download).
    """

    name: str
    load: Loader
    layout: str
    paper_counts: tuple[int, int, int] | None = None
    resources: Sequence[Resource] = field(default_factory=tuple)
    how_to_get: str = ""
    default_root: Callable[[], Path | None] = lambda: None
    is_present: Callable[[Path], bool] = lambda root: False

    def download(self, root: Path, base_url: str | None = None) -> None:
        """Fetch the public files into ``root`` unless they are already there."""
        if not self.is_present(root):
            fetch_resources(self.resources, root, base_url=base_url)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under ``spec.name``."""
    DATASETS.add(spec.name, spec)
    return spec
