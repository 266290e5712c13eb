"""MIT Indoor-67, official release: ``Images/<class>/*.jpg`` + ``TrainImages.txt`` /
``TestImages.txt`` (one ``<class>/<file>.jpg`` per line). Paper: 5360 / 1340 / 67.
"""

from __future__ import annotations

from pathlib import Path

from .base import FileSource, ImageList, check_files_exist, require_dir, require_file
from .registry import DatasetSpec, register

# No SHA-256 of indoorCVPR_09.tar or of the two lists is published anywhere this project could
# check, and every download must be verified: the files are fetched by hand (pinning their
# digests in Resources here would turn ``download=True`` back on).
HOW_TO_GET = (
    "no verified download: fetch http://groups.csail.mit.edu/vision/LabelMe/NewImages/"
    "indoorCVPR_09.tar and https://web.mit.edu/torralba/www/{TrainImages,TestImages}.txt, "
    "extract the tar into DIR next to the two lists"
)
_FIX = (
    "extract indoorCVPR_09.tar and put TrainImages.txt/TestImages.txt from "
    "https://web.mit.edu/torralba/www/indoor.html there"
)


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [ln.strip().replace("\\", "/") for ln in text.splitlines() if ln.strip()]


def load(root: Path, seed: int) -> tuple[ImageList, ImageList]:
    """Read the official MIT Indoor-67 split at ``root``."""
    del seed  # fixed official split
    images = require_dir(root / "Images", "MIT Indoor Images", _FIX)
    lists = {
        name: _read_lines(require_file(root / name, "split file", _FIX))
        for name in ("TrainImages.txt", "TestImages.txt")
    }
    classes = sorted({ln.split("/")[0] for lines in lists.values() for ln in lines})
    index = {c: i for i, c in enumerate(classes)}
    source = FileSource()
    out = []
    for name, lines in lists.items():
        paths = [str(images / ln) for ln in lines]
        check_files_exist(paths, name, _FIX)
        out.append(
            ImageList(
                source,
                [(p, index[ln.split("/")[0]]) for p, ln in zip(paths, lines, strict=True)],
                classes,
            )
        )
    return out[0], out[1]


SPEC = register(
    DatasetSpec(
        name="mit-indoors",
        load=load,
        layout="Images/<class>/*.jpg + TrainImages.txt + TestImages.txt",
        paper_counts=(5360, 1340, 67),
        how_to_get=HOW_TO_GET,
        is_present=lambda root: (root / "Images").is_dir() and (root / "TestImages.txt").is_file(),
    )
)
