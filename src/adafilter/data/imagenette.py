"""Imagewoof2 and Imagenette2 (fast.ai): ``<folder>/{train,val}/<wnid>/*.JPEG``.

Both are 10-class subsets of ImageNet published by fast.ai (https://github.com/fastai/imagenette)
with a fixed train/val split (Imagewoof2 9025 / 3929, Imagenette2 9469 / 3925): Imagewoof's ten
dog breeds are hard to tell apart, Imagenette's ten classes are easy. Each comes in three sizes;
``imagewoof`` / ``imagenette`` download the 320 px one (shorter side 320, enough for 224-260 px
crops, a quarter of the full-size archive) and ``imagewoof-160`` / ``imagenette-160`` the 160 px
one. Any size works for any of these names when it is already extracted under the data root
(``imagewoof2/`` is the full-size one), or when the root is that folder itself.

Class folders are WordNet ids (``n02086240``); class names are the ImageNet breed/object names
(``Shih-Tzu``, ...), labels follow the sorted wnids. A folder named ``<wnid>_<anything>`` and an
eval folder named ``test`` are read too, so the ``imagefolder``-style miniature
``imagewoof-mini/{train,test}/n02086240_shih_tzu/`` loads with the same class names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import DataError
from ..utils.download import Resource, cache_dir
from .base import FileSource, ImageList
from .registry import DatasetSpec, register

_S3 = "https://s3.amazonaws.com/fast-ai-imageclas"
_WNID = re.compile(r"^(n\d{8})(?:[_-].*)?$")
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}

IMAGEWOOF_CLASSES = {
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian_ridgeback",
    "n02088364": "beagle",
    "n02089973": "English_foxhound",
    "n02093754": "Border_terrier",
    "n02096294": "Australian_terrier",
    "n02099601": "golden_retriever",
    "n02105641": "Old_English_sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "dingo",
}
IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English_springer",
    "n02979186": "cassette_player",
    "n03000684": "chain_saw",
    "n03028079": "church",
    "n03394916": "French_horn",
    "n03417042": "garbage_truck",
    "n03425413": "gas_pump",
    "n03445777": "golf_ball",
    "n03888257": "parachute",
}


@dataclass(frozen=True)
class Family:
    """One fast.ai subset: its class names and the folders its archives extract to."""

    name: str
    classes: dict[str, str]
    folders: tuple[str, ...]  # every size's top folder, e.g. imagewoof2-320, imagewoof2, ...


IMAGEWOOF = Family(
    "Imagewoof", IMAGEWOOF_CLASSES, ("imagewoof2-320", "imagewoof2", "imagewoof2-160")
)
IMAGENETTE = Family(
    "Imagenette", IMAGENETTE_CLASSES, ("imagenette2-320", "imagenette2", "imagenette2-160")
)


def _find_split_root(root: Path, family: Family, folder: str) -> Path:
    """``root/<folder>``, else another size's folder under ``root``, else ``root`` itself."""
    for name in (folder, *family.folders):
        if (root / name / "train").is_dir():
            return root / name
    if (root / "train").is_dir():
        return root
    raise DataError(
        f"no {folder}/train (or {', '.join(f for f in family.folders if f != folder)}) under "
        f"{root}; extract {folder}.tgz from {_S3}/ there, or pass download=True"
    )


def _class_dirs(split_dir: Path, family: Family) -> dict[str, Path]:
    """wnid -> class folder of one split; a folder that is not one of the family's is an error."""
    out: dict[str, Path] = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        m = _WNID.match(d.name)
        if m is None or m.group(1) not in family.classes:
            raise DataError(
                f"{d} is not one of {family.name}'s class folders (<wnid> such as "
                f"{next(iter(family.classes))}); point the data root at the {family.name} data"
            )
        out[m.group(1)] = d
    return out


def _images(folder: Path) -> list[str]:
    return sorted(
        str(p) for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
    )


def load(root: Path, seed: int, *, family: Family, folder: str) -> tuple[ImageList, ImageList]:
    """Read the official train/val split of ``family`` from ``root``.

    Args:
        root: Folder holding ``folder`` (or another size's folder), or that folder itself.
        seed: Unused (fixed official split).
        family: :data:`IMAGEWOOF` or :data:`IMAGENETTE`.
        folder: The size's top folder looked for first, e.g. ``imagewoof2-320``.

    Returns:
        ``(train, eval)`` with the breed/object names as classes.

    Raises:
        DataError: No split folders, a foreign class folder or an empty class (one line).
    """
    del seed  # fixed official split
    base = _find_split_root(root, family, folder)
    eval_dir = next((base / n for n in ("val", "test") if (base / n).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"missing eval folder {base / 'val'}; re-extract {folder}.tgz there")
    train_dirs = _class_dirs(base / "train", family)
    if not train_dirs:
        raise DataError(f"no class folders in {base / 'train'}; re-extract {folder}.tgz there")
    wnids = sorted(train_dirs)
    label = {w: i for i, w in enumerate(wnids)}
    names = [family.classes[w] for w in wnids]
    eval_dirs = _class_dirs(eval_dir, family)
    extra = sorted(set(eval_dirs) - set(train_dirs))
    if extra:
        raise DataError(
            f"{eval_dir} has class folder(s) missing from {base / 'train'}: {', '.join(extra)}; "
            f"re-extract {folder}.tgz"
        )
    lists = []
    for dirs, must_fill in ((train_dirs, True), (eval_dirs, False)):
        samples = []
        for wnid in sorted(dirs):
            files = _images(dirs[wnid])
            if must_fill and not files:
                raise DataError(f"class folder {dirs[wnid]} has no images; re-extract {folder}.tgz")
            samples += [(f, label[wnid]) for f in files]
        lists.append(ImageList(FileSource(), samples, names))
    return lists[0], lists[1]


@dataclass(frozen=True)
class _Size:
    suffix: str  # registry-name suffix
    folder: str
    sha256: str


# SHA-256 of each archive as published: TensorFlow Datasets (imagenette/checksums.tsv, whose
# sizes equal fast.ai's checks.txt; FastAI.jl agrees on imagenette2-320 but lists 88daccb0... for
# imagenette2-160, likely an older upload) for Imagenette2; the Julia packages DLDatasets.jl
# (ImageWoof DataDeps: 320 and 160 px) and FastAI.jl (160 px) for Imagewoof2. No SHA-256 of the
# full-size imagewoof2.tgz was found, so the full sizes are not downloaded (they still load).
_SIZES = (
    (
        IMAGEWOOF,
        _Size(
            "", "imagewoof2-320", "4e4905ed7643120daaf9bf3b2ef7f3a7e8396d9bdaf254a38c6f01f618b4973d"
        ),
        _Size(
            "-160",
            "imagewoof2-160",
            "663c22f69c2802d85e2a67103c017e047096702ffddf9149a14011b7002539bf",
        ),
    ),
    (
        IMAGENETTE,
        _Size(
            "",
            "imagenette2-320",
            "569b4497c98db6dd29f335d1f109cf315fe127053cedf69010d047f0188e158c",
        ),
        _Size(
            "-160",
            "imagenette2-160",
            "64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5",
        ),
    ),
)


def _register(family: Family, size: _Size) -> None:
    name = f"{family.name.lower()}{size.suffix}"
    archive = f"{size.folder}.tgz"
    register(
        DatasetSpec(
            name=name,
            load=partial(load, family=family, folder=size.folder),
            layout=f"{size.folder}/{{train,val}}/<wnid>/*.JPEG",
            resources=(Resource(f"{_S3}/{archive}", archive, sha256=size.sha256, extract=True),),
            default_root=partial(cache_dir, "data", family.name.lower()),
            is_present=lambda root, folder=size.folder: (root / folder / "train").is_dir(),
        )
    )


for _family, *_sizes in _SIZES:
    for _size in _sizes:
        _register(_family, _size)
