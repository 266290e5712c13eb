"""FGVC-Aircraft (variants): the official release via torchvision, or the Decathlon copy.

Official layout ``fgvc-aircraft-2013b/data/`` with ``variants.txt``, ``images/*.jpg`` and
``images_variant_{train,val}.txt`` (3334 / 3333, 100 classes -- the paper's split).
``torchvision.datasets.FGVCAircraft`` parses it; we only pick the folder and collect samples.
A Decathlon root (``annotations/aircraft_{train,val}.json``) works too.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import FGVCAircraft

from ..errors import DataError
from ..utils.download import Resource
from .base import FileSource, ImageList, check_files_exist
from .decathlon import decathlon_root, load_task
from .registry import DatasetSpec, register

OFFICIAL = "fgvc-aircraft-2013b"
# SHA-256 of the archive Oxford serves now (2,753,340,328 bytes), as pinned by several public
# fetch scripts; TensorFlow Datasets' older entry (d5f68b1b..., 2,770,575,360 bytes) predates a
# re-upload.
RESOURCES = (
    Resource(
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
        "fgvc-aircraft-2013b.tar.gz",
        sha256="e4e323d410e29f0370c81eabdcbb0e2b813acea1de22891b70b58ff41bfc9834",
        extract=True,
    ),
)


def _official_parent(root: Path) -> Path | None:
    """The folder that contains ``fgvc-aircraft-2013b`` (what torchvision wants as root)."""
    if (root / OFFICIAL / "data").is_dir():
        return root
    if root.name == OFFICIAL and (root / "data").is_dir():
        return root.parent
    return None


def _identity(path: str) -> str:
    return path


def _parse(parent: Path, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    try:
        # loader=_identity makes ds[i] return (image path, label) without opening images.
        ds = FGVCAircraft(str(parent), split=split, loader=_identity)
        return [ds[i] for i in range(len(ds))], list(ds.classes)
    except TypeError:  # torchvision < 0.20 has no loader argument
        ds = FGVCAircraft(str(parent), split=split)
        return list(zip(ds._image_files, ds._labels, strict=True)), list(ds.classes)


def load(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Read FGVC-Aircraft train/val (variant level) from ``root``."""
    del seed  # fixed official split
    parent = _official_parent(root)
    if parent is None:
        if decathlon_root(root) is not None:
            return load_task(root, "aircraft")
        raise DataError(
            f"no {OFFICIAL}/data or Decathlon annotations under {root}; extract "
            f"{RESOURCES[0].url} there or pass download=True"
        )
    data = parent / OFFICIAL / "data"
    out = []
    for split in ("train", "val"):
        for name in ("variants.txt", f"images_variant_{split}.txt"):
            if not (data / name).is_file():
                raise DataError(
                    f"missing split file {data / name}; re-extract {RESOURCES[0].filename}"
                )
        try:
            samples, classes = _parse(parent, split)
        except (KeyError, ValueError) as exc:
            raise DataError(
                f"{data}/images_variant_{split}.txt names a variant missing from variants.txt "
                f"({exc}); re-extract {RESOURCES[0].filename}"
            ) from None
        check_files_exist([p for p, _ in samples], f"images_variant_{split}.txt", "re-extract it")
        out.append(ImageList(FileSource(), samples, classes))
    return out[0], out[1]


SPEC = register(
    DatasetSpec(
        name="aircraft",
        load=load,
        layout=f"{OFFICIAL}/data/{{images/,variants.txt,images_variant_train.txt,"
        "images_variant_val.txt}} or a Decathlon root",
        paper_counts=(3334, 3333, 100),
        resources=RESOURCES,
        is_present=lambda root: (
            _official_parent(root) is not None or decathlon_root(root) is not None
        ),
    )
)
