"""Stanford Dogs, official release: ``Images/`` + ``train_list.mat`` / ``test_list.mat``.

The .mat lists (from ``lists.tar``) hold ``file_list`` (N x 1 cell of paths relative to
``Images/``, e.g. ``n02085620-Chihuahua/n02085620_10074.jpg``) and ``labels`` (N x 1, 1-based).
Paper (Table 1): 12000 train / 8580 eval / 120 classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from ..errors import DataError
from ..utils.download import Resource
from .base import FileSource, ImageList, check_files_exist, require_dir, require_file
from .registry import DatasetSpec, register

_BASE = "https://vision.stanford.edu/aditya86/ImageNetDogs"
# SHA-256 as pinned by TensorFlow Datasets (tensorflow_datasets/url_checksums/stanford_dogs.txt,
# also 793579520 / 481280 bytes there); the same digests are pinned by other public fetch scripts.
RESOURCES = (
    Resource(
        f"{_BASE}/images.tar",
        "images.tar",
        sha256="a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58",
        extract=True,
    ),
    Resource(
        f"{_BASE}/lists.tar",
        "lists.tar",
        sha256="34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c",
        extract=True,
    ),
)
_FIX = f"extract images.tar and lists.tar from {_BASE}/ there, or pass download=True"


def _read_list(path: Path) -> tuple[list[str], list[int]]:
    try:
        mat = scipy.io.loadmat(str(path))
        files = [str(np.asarray(x).ravel()[0]) for x in mat["file_list"].ravel()]
        labels = [int(v) - 1 for v in np.asarray(mat["labels"]).ravel()]
    except (KeyError, ValueError, TypeError, IndexError, OSError) as exc:
        raise DataError(
            f"{path} is not a Stanford Dogs list (needs file_list and labels): {exc}; "
            f"re-extract lists.tar from {_BASE}/"
        ) from None
    if len(files) != len(labels) or (labels and min(labels) < 0):
        raise DataError(f"{path}: file_list and 1-based labels do not match; re-extract lists.tar")
    return files, labels


def load(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Read the official Stanford Dogs split at ``root``."""
    del seed  # fixed official split
    images = require_dir(root / "Images", "Stanford Dogs Images", _FIX)
    splits = {}
    for split in ("train", "test"):
        mat = require_file(root / f"{split}_list.mat", "split file", _FIX)
        splits[split] = _read_list(mat)
    num_classes = max(max(lab, default=-1) for _, lab in splits.values()) + 1
    names = [f"class_{i:03d}" for i in range(num_classes)]
    for files, labels in splits.values():
        for f, lab in zip(files, labels, strict=True):
            synset_dir = f.replace("\\", "/").split("/")[0]
            names[lab] = synset_dir.split("-", 1)[-1]  # "n02085620-Chihuahua" -> "Chihuahua"
    source = FileSource()
    lists = []
    for split, (files, labels) in splits.items():
        paths = [str(images / f) for f in files]
        check_files_exist(paths, f"{split}_list.mat", _FIX)
        lists.append(ImageList(source, list(zip(paths, labels, strict=True)), names))
    return lists[0], lists[1]


SPEC = register(
    DatasetSpec(
        name="stanford-dogs",
        load=load,
        layout="Images/<synset-breed>/*.jpg + train_list.mat + test_list.mat",
        paper_counts=(12000, 8580, 120),
        resources=RESOURCES,
        is_present=lambda root: (root / "Images").is_dir() and (root / "test_list.mat").is_file(),
    )
)
