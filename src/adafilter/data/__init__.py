"""Datasets of the AdaFilter paper (Table 1) plus Omniglot-small, Fashion-MNIST, Imagewoof,
Imagenette, Flowers-17 and ImageFolder.

Every dataset reads its official on-disk layout and split files; see
:data:`DATASETS` for the names. Typical use::

    train_ds, eval_ds, info = build_datasets("stanford-dogs", "/data/dogs", resolution=224)
"""

from __future__ import annotations

# Importing the layout modules registers their datasets.
from . import (  # noqa: F401
    aircraft,
    caltech,
    decathlon,
    fashion_mnist,
    flowers17,
    imagefolder,
    imagenette,
    mit_indoor,
    omniglot_small,
    stanford_dogs,
)
from .api import build_datasets, check_data_root, download_dataset
from .base import ImageList, SafeImageDataset, UnreadableImageWarning
from .registry import DATASETS, DatasetInfo, DatasetSpec
from .transforms import build_transforms

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetSpec",
    "ImageList",
    "SafeImageDataset",
    "UnreadableImageWarning",
    "build_datasets",
    "build_transforms",
    "check_data_root",
    "download_dataset",
]
