"""Visual Decathlon layout (ucf101 dynamic images, aircraft, omniglot).

``decathlon-1.0/annotations/<task>_{train,val}.json`` are COCO-style: ``images`` (``id``,
``file_name``), ``annotations`` (``image_id``, ``category_id``) and ``categories`` (``id``,
``name``). Image files live under ``decathlon-1.0/data/<task>/...``; ``file_name`` is resolved
against the decathlon root, its ``data/`` folder, or the root's parent (releases differ on
whether ``file_name`` starts with ``data/``). Category ids are per-task offsets, so they are
mapped to ``0..K-1`` in id order. The paper evaluates on Decathlon's val split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from .base import FileSource, ImageList, check_files_exist
from .registry import DatasetSpec, register

HOW_TO_GET = (
    "Visual Decathlon has no anonymous download: get decathlon-1.0-devkit.tar.gz (annotations) "
    "and decathlon-1.0-data.tar.gz (images) from https://www.robots.ox.ac.uk/~vgg/decathlon/ "
    "and pass the extracted decathlon-1.0 folder as data_root="
)


def decathlon_root(root: Path) -> Path | None:
    """The folder holding ``annotations/`` (``root`` or ``root/decathlon-1.0``), if any."""
    for cand in (root, root / "decathlon-1.0"):
        if (cand / "annotations").is_dir():
            return cand
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"missing split file {path}; {HOW_TO_GET}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["images"], data["annotations"]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is not a Decathlon annotation file ({type(exc).__name__}: {exc}); "
            "re-extract decathlon-1.0-devkit.tar.gz"
        ) from None
    return data


def _resolve_base(base: Path, file_name: str) -> Path:
    for cand in (base, base / "data", base.parent):
        if (cand / file_name).is_file():
            return cand
    raise DataError(
        f"image {file_name} from the annotations is not under {base} or {base / 'data'}; "
        "extract decathlon-1.0-data.tar.gz (and the per-task tars) into decathlon-1.0/data"
    )


def load_task(root: Path, task: str) -> tuple[ImageList, ImageList]:
    """Read Decathlon task ``task`` (e.g. ``"ucf101"``): train split and val split."""
    base = decathlon_root(root)
    if base is None:
        raise DataError(f"missing annotations folder under {root}; {HOW_TO_GET}")
    splits = {s: _read_json(base / "annotations" / f"{task}_{s}.json") for s in ("train", "val")}
    cats: dict[int, str] = {}
    for data in splits.values():
        for c in data.get("categories") or []:
            cats[int(c["id"])] = str(c.get("name", c["id"]))
        for a in data["annotations"]:
            cats.setdefault(int(a["category_id"]), str(a["category_id"]))
    if not cats:
        raise DataError(f"{task}: the annotation files list no categories; re-extract the devkit")
    ids = sorted(cats)
    index = {cid: i for i, cid in enumerate(ids)}
    names = [cats[cid] for cid in ids]
    source = FileSource()
    out = []
    for split, data in splits.items():
        label_of = {int(a["image_id"]): index[int(a["category_id"])] for a in data["annotations"]}
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        missing = [im["file_name"] for im in images if int(im["id"]) not in label_of]
        if missing:
            raise DataError(
                f"{task}_{split}.json: {len(missing)} image(s) have no annotation, e.g. "
                f"{missing[0]}; re-extract the devkit"
            )
        if not images:
            raise DataError(f"{task}_{split}.json lists no images; re-extract the devkit")
        img_base = _resolve_base(base, images[0]["file_name"])
        paths = [str(img_base / im["file_name"]) for im in images]
        check_files_exist(paths, f"{task}_{split}.json", "extract decathlon-1.0-data.tar.gz fully")
        out.append(
            ImageList(
                source,
                [(p, label_of[int(im["id"])]) for p, im in zip(paths, images, strict=True)],
                names,
            )
        )
    return out[0], out[1]


def _spec(name: str, task: str, counts: tuple[int, int, int]) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        load=lambda root, seed: load_task(root, task),
        layout=f"decathlon-1.0/annotations/{task}_{{train,val}}.json + decathlon-1.0/data/{task}/",
        paper_counts=counts,
        how_to_get=HOW_TO_GET,
    )


register(_spec("ucf101", "ucf101", (7629, 1908, 101)))
register(_spec("omniglot", "omniglot", (19476, 6492, 1623)))
