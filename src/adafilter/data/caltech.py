"""Caltech-256 with the paper's random per-class splits (Caltech256-30 and Caltech256-60).

Official layout: ``256_ObjectCategories/NNN.name/*.jpg``. The clutter class ``257.clutter`` is
excluded, leaving 256 classes. For every class the sorted image list is shuffled with a
generator seeded by ``(seed, class index)``; the first ``n`` images train and the next 20
evaluate, so train and eval are disjoint and the split is a pure function of the seed.
Paper: 30 -> 7680 / 5120, 60 -> 15360 / 5120.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..utils.download import Resource
from .base import FileSource, ImageList, require_dir
from .registry import DatasetSpec, register

EVAL_PER_CLASS = 20
CLUTTER = "257.clutter"
# SHA-256 as pinned by torchvision's prototype Caltech256 dataset, for the tar whose MD5
# (67b4f42ca05d46448c6bb8ecd2220f6d, torchvision.datasets.Caltech256) the CaltechDATA copy has.
RESOURCES = (
    Resource(
        "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar",
        "256_ObjectCategories.tar",
        sha256="08ff01b03c65566014ae88eb0490dbe4419fc7ac4de726ee1163e39fd809543e",
        extract=True,
    ),
)
_FIX = "extract 256_ObjectCategories.tar from https://data.caltech.edu/records/nyy15-4j048 there"
_CLASS_DIR = re.compile(r"^\d{3}\.(.+)$")


def categories_dir(root: Path) -> Path:
    """``root/256_ObjectCategories`` or ``root`` itself when it is that folder."""
    if (root / "256_ObjectCategories").is_dir():
        return root / "256_ObjectCategories"
    if root.is_dir() and any(_CLASS_DIR.match(p.name) for p in root.iterdir() if p.is_dir()):
        return root
    return require_dir(root / "256_ObjectCategories", "Caltech-256 256_ObjectCategories", _FIX)


def load(root: Path, seed: int, *, train_per_class: int) -> tuple[ImageList, ImageList]:
    """Sample the seeded Caltech-256 split with ``train_per_class`` training images."""
    cats = categories_dir(root)
    class_dirs = sorted(
        p for p in cats.iterdir() if p.is_dir() and _CLASS_DIR.match(p.name) and p.name != CLUTTER
    )
    if not class_dirs:
        raise DataError(f"no NNN.name class folders in {cats}; {_FIX}")
    need = train_per_class + EVAL_PER_CLASS
    names, train, evals = [], [], []
    for label, d in enumerate(class_dirs):
        m = _CLASS_DIR.match(d.name)
        assert m is not None
        names.append(m.group(1))
        # Only the class folder's own .jpg files: the release has stray sub-folders/files.
        files = sorted(p.name for p in d.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())
        if len(files) < need:
            raise DataError(
                f"class folder {d} has {len(files)} images but caltech256-{train_per_class} "
                f"needs {need} ({train_per_class} train + {EVAL_PER_CLASS} eval); restore it"
            )
        order = np.random.default_rng([seed, label]).permutation(len(files))
        train += [(str(d / files[i]), label) for i in sorted(order[:train_per_class])]
        evals += [(str(d / files[i]), label) for i in sorted(order[train_per_class:need])]
    source = FileSource()
    return ImageList(source, train, names), ImageList(source, evals, names)


def _present(root: Path) -> bool:
    return (root / "256_ObjectCategories").is_dir()


for _n, _counts in ((30, (7680, 5120, 256)), (60, (15360, 5120, 256))):
    register(
        DatasetSpec(
            name=f"caltech256-{_n}",
            load=partial(load, train_per_class=_n),
            layout="256_ObjectCategories/NNN.name/*.jpg",
            paper_counts=_counts,
            resources=RESOURCES,
            is_present=_present,
        )
    )
