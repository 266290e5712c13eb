"""Omniglot ``images_background_small*`` (Lake et al.'s reduced background set).

Layout (inside the zip or extracted): ``images_background_small1/<Alphabet>/<characterNN>/
<id>_<drawer>.png`` (105x105, 1-bit). A class is an (alphabet, character) pair: 136 classes in
``small1``. Within a character the file names are sorted; the first 15 drawings train and the
rest (5) evaluate: 2040 / 680. Images are read straight from the zip (no extraction needed).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError
from ..utils.download import Resource, cache_dir
from .base import FileSource, ImageList, ImageSource, ZipSource
from .registry import DatasetSpec, register

TRAIN_PER_CHARACTER = 15
ZIP_NAME = "images_background_small1.zip"
# SHA-256 of the project's copy of the file, taken to be the GitHub file
# (not re-checked against GitHub from here: no internet access when this was written).
RESOURCES = (
    Resource(
        f"https://github.com/brendenlake/omniglot/raw/master/python/{ZIP_NAME}",
        ZIP_NAME,
        sha256="f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    ),
)
_FIX = (
    f"pass the folder holding {ZIP_NAME} (or the zip, or its extracted folder) as data_root=, "
    "or pass download=True"
)


def default_root() -> Path:
    """``$ADAFILTER_HOME/data/omniglot-small`` (filled by ``download=True``)."""
    return cache_dir("data", "omniglot-small")


def _locate(root: Path) -> tuple[ImageSource, Path | None, list[str]]:
    """Pick the zip or extracted folder under ``root``; return source, folder, member names."""
    if root.is_file():
        if not zipfile.is_zipfile(root):
            raise DataError(f"{root} is not a zip archive; {_FIX}")
        with zipfile.ZipFile(root) as zf:
            return ZipSource(root), None, zf.namelist()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; {_FIX}")
    folders = sorted(p for p in root.glob("images_background_small*") if p.is_dir())
    zips = sorted(p for p in root.glob("images_background_small*.zip") if p.is_file())
    if not folders and zips:
        return _locate(zips[0])
    folder = folders[0] if folders else root  # extracted folder (or root *is* that folder)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*.png")]
    return FileSource(), folder, names


def _split(names: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    by_char: dict[str, list[str]] = {}
    for name in names:
        parts = name.split("/")
        if not name.lower().endswith(".png") or len(parts) < 3 or "__MACOSX" in parts:
            continue
        by_char.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(name)
    return sorted(by_char), by_char


def load(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Read omniglot-small from a zip, a folder of zips, or the extracted folder."""
    del seed  # fixed rule: first 15 drawings train
    source, folder, names = _locate(root)
    classes, by_char = _split(names)
    if not classes:
        raise DataError(f"no <Alphabet>/<character>/*.png images found in {root}; {_FIX}")
    train, evals = [], []
    for label, cls in enumerate(classes):
        files = sorted(by_char[cls])
        if len(files) <= TRAIN_PER_CHARACTER:
            raise DataError(
                f"character {cls} has {len(files)} drawings, needs more than "
                f"{TRAIN_PER_CHARACTER} (15 train + eval); restore the archive"
            )
        keys = [str(folder / f) for f in files] if folder is not None else files
        train += [(k, label) for k in keys[:TRAIN_PER_CHARACTER]]
        evals += [(k, label) for k in keys[TRAIN_PER_CHARACTER:]]
    return ImageList(source, train, classes), ImageList(source, evals, classes)


SPEC = register(
    DatasetSpec(
        name="omniglot-small",
        load=load,
        layout=f"{ZIP_NAME} (or images_background_small1/<Alphabet>/<characterNN>/*.png)",
        resources=RESOURCES,
        default_root=default_root,
        is_present=lambda root: root.is_file() or any(root.glob("images_background_small*")),
    )
)
