"""Oxford 17 Category Flowers (Nilsback & Zisserman 2006): ``jpg/`` + ``datasplits.mat``.

Official layout: ``17flowers.tgz`` extracts to ``jpg/image_0001.jpg ... image_1360.jpg``, 80
consecutive images per class in the official class order (images 1-80 daffodil, 81-160
snowdrop, ...). ``datasplits.mat`` holds three splits as 1-based image indices: ``trn1/val1/tst1``
(40 / 20 / 20 per class), ``trn2/...``, ``trn3/...``. This dataset uses split 1: train = trn1 +
val1 (1020 images, 60 per class), eval = tst1 (340, 20 per class) -- the 60/20 per class of the
``flowers17`` miniature in ``imagefolder`` layout; hold out a validation share of the training
images with ``--val-fraction`` to choose settings without the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from ..errors import DataError
from ..utils.download import Resource, cache_dir
from .base import FileSource, ImageList, check_files_exist, require_dir, require_file
from .registry import DatasetSpec, register

IMAGES_PER_CLASS = 80
CLASSES = (
    "daffodil",
    "snowdrop",
    "lily_valley",
    "bluebell",
    "crocus",
    "iris",
    "tigerlily",
    "tulip",
    "fritillary",
    "sunflower",
    "daisy",
    "colts_foot",
    "dandelion",
    "cowslip",
    "buttercup",
    "windflower",
    "pansy",
)
SPLIT = 1
_BASE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/17"
# 17flowers.tgz: SHA-256 as pinned by intel/dffml (examples/flower17/dataset.sh). datasplits.mat
# (not an archive): no SHA-256 is published; its MD5 is, by public Flowers17 dataset classes
# (which also agree on the tgz's MD5 b59a65d8d1a99cd66944d474e1289eab).
RESOURCES = (
    Resource(
        f"{_BASE}/17flowers.tgz",
        "17flowers.tgz",
        sha256="fe38a60f8b4a95e657551247d3e7d799a3fafcdbc595be504b12839967823d70",
        extract=True,
    ),
    Resource(f"{_BASE}/datasplits.mat", "datasplits.mat", md5="4828cddfd0d803c5abbdebcb1e148a1e"),
)
_FIX = f"extract 17flowers.tgz and put datasplits.mat from {_BASE}/ there, or pass download=True"


def default_root() -> Path:
    """``$ADAFILTER_HOME/data/flowers17`` (filled by ``download=True``)."""
    return cache_dir("data", "flowers17")


def _indices(mat: dict[str, object], key: str, path: Path) -> list[int]:
    try:
        ids = [int(v) for v in np.asarray(mat[key]).ravel()]
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(
            f"{path} has no usable {key} ({type(exc).__name__}: {exc}); re-download datasplits.mat"
        ) from None
    bad = [i for i in ids if not 1 <= i <= IMAGES_PER_CLASS * len(CLASSES)]
    if bad:
        raise DataError(f"{path}: {key} holds image index {bad[0]} outside 1..1360; re-download it")
    return ids


def load(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Read split 1 of the official Flowers-17 release at ``root`` (train = trn1 + val1)."""
    del seed  # fixed official split
    jpg = require_dir(root / "jpg", "Flowers-17 jpg", _FIX)
    path = require_file(root / "datasplits.mat", "split file", _FIX)
    try:
        mat = scipy.io.loadmat(str(path))
    except (ValueError, OSError, TypeError) as exc:
        raise DataError(
            f"{path} is not a MATLAB file ({exc}); re-download datasplits.mat"
        ) from None
    splits = {
        "train": _indices(mat, f"trn{SPLIT}", path) + _indices(mat, f"val{SPLIT}", path),
        "eval": _indices(mat, f"tst{SPLIT}", path),
    }
    source = FileSource()
    lists = []
    for ids in splits.values():
        samples = [
            (str(jpg / f"image_{i:04d}.jpg"), (i - 1) // IMAGES_PER_CLASS) for i in sorted(ids)
        ]
        check_files_exist([p for p, _ in samples], "datasplits.mat", _FIX)
        lists.append(ImageList(source, samples, list(CLASSES)))
    return lists[0], lists[1]


SPEC = register(
    DatasetSpec(
        name="flowers17",
        load=load,
        layout="jpg/image_NNNN.jpg + datasplits.mat (split 1: trn1+val1 / tst1)",
        resources=RESOURCES,
        default_root=default_root,
        is_present=lambda root: (root / "jpg").is_dir() and (root / "datasplits.mat").is_file(),
    )
)
