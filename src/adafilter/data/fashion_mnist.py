"""Fashion-MNIST from its IDX files (plain or .gz).

Accepted layouts: the four ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` files directly
in the root (what the Debian package ``dataset-fashion-mnist`` installs under
``/usr/share/datasets/fashion-mnist``), or torchvision's ``root/FashionMNIST/raw/``. torchvision's
IDX reader cannot read the .gz files in place, so a small numpy reader is used instead.
60000 / 10000 / 10 classes; the demo uses ``subset_per_class`` for a small balanced subset.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from torchvision.datasets import FashionMNIST

from ..errors import DataError
from ..utils.download import Resource
from .base import ArraySource, ImageList
from .registry import DatasetSpec, register

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The S3 website endpoint torchvision uses serves plain http only; every file is verified.
_MIRROR = FashionMNIST.mirrors[0]
# SHA-256 as pinned by TensorFlow Datasets (url_checksums/fashion_mnist.txt); the MD5s published by
# torchvision.datasets.FashionMNIST are kept beside them. Kept gzipped (read in place).
SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
    ),
    "train-labels-idx1-ubyte.gz": (
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
    ),
}
RESOURCES = tuple(
    Resource(f"{_MIRROR}{fname}", fname, sha256=SHA256[fname], md5=md5, subdir="FashionMNIST/raw")
    for fname, md5 in FashionMNIST.resources
)
_FIX = (
    "install the Debian package dataset-fashion-mnist (scripts/fetch-fashion-mnist.sh), "
    "or pass download=True"
)


def default_root() -> Path | None:
    """The Debian package's folder when it is installed."""
    return DEBIAN_ROOT if DEBIAN_ROOT.is_dir() else None


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) into a numpy array.

    Raises:
        DataError: The file is not a uint8 IDX file or is truncated.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
            raise ValueError("bad magic number (expected unsigned-byte IDX)")
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr[: int(np.prod(shape))].reshape(shape)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"{path} is not a readable IDX file ({exc}); delete it and fetch it again"
        ) from None


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def raw_dir(root: Path) -> Path:
    """The folder holding the IDX files: ``root``, ``root/FashionMNIST/raw`` or ``root/raw``."""
    for cand in (root, root / "FashionMNIST" / "raw", root / "raw"):
        if _find(cand, FILES["train"][0]) is not None:
            return cand
    raise DataError(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz]) in {root}; {_FIX}")


def load(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Read Fashion-MNIST train (60000) and test (10000) from ``root``."""
    return _load(root, seed, negatives=False)


# The negatives variant: which images are negatives is fixed (not the run's seed), so every run,
# method and split sees the same task.
NEGATIVES_SEED = 20200207
NEGATIVES_LABEL_SHIFT = 5


def negative_mask(n: int, split: str) -> np.ndarray:
    """Which of a split's ``n`` images the negatives variant inverts (about half, fixed)."""
    rng = np.random.default_rng([NEGATIVES_SEED, 0 if split == "train" else 1])
    return rng.random(n) < 0.5


def load_negatives(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Fashion-MNIST where about half of each split are photographic negatives, relabelled.

    A negative (``255 - image``) of class ``k`` is labelled ``(k + 5) mod 10``. A network
    pretrained on plain Fashion-MNIST is right for the positives and wrong for the negatives,
    in features (inverted contrast) and in labels: the transfer problem of AdaFilter's
    known-policy check built from real images, where keeping pretrained filters for some
    examples and fine-tuning them for others is the right policy.
    """
    return _load(root, seed, negatives=True)


def _load(root: Path, seed: int, *, negatives: bool) -> tuple[ImageList, ImageList]:
    del seed
    folder = raw_dir(root)
    out = []
    for split, (img_stem, lab_stem) in FILES.items():
        paths = [_find(folder, img_stem), _find(folder, lab_stem)]
        if None in paths:
            missing = img_stem if paths[0] is None else lab_stem
            raise DataError(f"missing {missing}[.gz] in {folder}; {_FIX}")
        images, labels = read_idx(paths[0]), read_idx(paths[1])  # type: ignore[arg-type]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[0]} and {paths[1]} do not match; fetch them again")
        name = f"fashion-mnist/{split}"
        if negatives:
            neg = negative_mask(len(labels), split)
            images = np.where(neg[:, None, None], 255 - images, images)
            labels = np.where(neg, (labels + NEGATIVES_LABEL_SHIFT) % 10, labels)
            name = f"fashion-mnist-negatives/{split}"
        source = ArraySource(images, name=name)
        out.append(
            ImageList(
                source, [(i, int(t)) for i, t in enumerate(labels)], list(FashionMNIST.classes)
            )
        )
    return out[0], out[1]


def _present(root: Path) -> bool:
    try:
        raw_dir(root)
    except DataError:
        return False
    return True


_LAYOUT = "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (or FashionMNIST/raw/)"
SPEC = register(
    DatasetSpec(
        name="fashion-mnist",
        load=load,
        layout=_LAYOUT,
        resources=RESOURCES,
        default_root=default_root,
        is_present=_present,
    )
)
NEGATIVES_SPEC = register(
    DatasetSpec(
        name="fashion-mnist-negatives",
        load=load_negatives,
        layout=_LAYOUT,
        resources=RESOURCES,
        default_root=default_root,
        is_present=_present,
    )
)
