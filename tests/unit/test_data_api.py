"""Transforms, the corrupt-image wrapper and the dataset objects' plumbing."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from adafilter.data import (
    DatasetInfo,
    UnreadableImageWarning,
    build_datasets,
    build_transforms,
)
from adafilter.data.api import with_transform
from adafilter.data.base import DROPPED_LABEL, ZipSource, collate_dropping
from adafilter.data.transforms import eval_resize
from adafilter.errors import DataError


def _write(path: Path, img: Image.Image | None = None, raw: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        (img or Image.new("RGB", (8, 8), "red")).save(path)


def _tree(root: Path, broken: tuple[str, ...] = ()) -> Path:
    """imagefolder root: 2 classes x 3 images per split; ``broken`` names unreadable files."""
    for split in ("train", "val"):
        for label, c in enumerate(("a", "b")):
            for k in range(3):
                name = f"{split}/{c}/{k}.png"
                color = (label * 200, k * 50, 0)
                raw = b"garbage" if name in broken else None
                _write(root / name, Image.new("RGB", (8, 8), color), raw)
    return root


@pytest.mark.parametrize("augment", ["resized-crop", "random-crop", "pad-crop", "none"])
@pytest.mark.parametrize("resolution", [32, 224])
@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "P"])
def test_transforms_shape_and_channels(resolution: int, mode: str, augment: str) -> None:
    img = Image.new(mode, (12, 9))
    for train in (True, False):
        x = build_transforms(train, resolution=resolution, augment=augment)(img)
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, resolution, resolution)


def test_pad_crop_augmentation_keeps_the_whole_image() -> None:
    # A white square filling the centre 16x16 of 28x28: "pad-crop" shifts it by at most R/8 =
    # 3 px and evaluates the whole image; "resized-crop" evaluates a 28-px centre crop of a
    # 32-px resize.
    img = Image.new("L", (28, 28), 0)
    img.paste(255, (6, 6, 22, 22))
    stats = dict(resolution=28, mean=(0, 0, 0), std=(1, 1, 1))
    ev = build_transforms(False, augment="pad-crop", **stats)(img)
    assert torch.equal(ev, build_transforms(False, augment="none", **stats)(img))
    assert ev[0].sum().item() == pytest.approx(16 * 16, abs=0.5)  # nothing resized or cut
    paper = build_transforms(False, augment="resized-crop", **stats)(img)
    assert paper[0].sum().item() > 16 * 16 + 10  # resized up by 32/28 before the crop
    torch.manual_seed(0)
    for _ in range(20):
        x = build_transforms(True, augment="pad-crop", **stats)(img)[0]
        assert x.sum().item() == pytest.approx(16 * 16, abs=0.5)  # shifted, never cut or scaled
    assert (eval_resize(28), eval_resize(28, "pad-crop"), eval_resize(28, "none")) == (32, 28, 28)
    with pytest.raises(ValueError, match="augment must be one of"):
        build_transforms(True, resolution=8, augment="mixup")


def test_random_crop_augmentation_shifts_a_fixed_scale_view() -> None:
    """``random-crop``: resize to R*256/224 and take a random R crop: the square keeps its
    resized size (16 * 32/28 px a side, never rescaled or cut here) and moves; evaluation is
    the resized-crop's centre crop."""
    img = Image.new("L", (28, 28), 0)
    img.paste(255, (6, 6, 22, 22))
    stats = dict(resolution=28, mean=(0, 0, 0), std=(1, 1, 1))
    ev = build_transforms(False, augment="random-crop", **stats)(img)
    assert torch.equal(ev, build_transforms(False, augment="resized-crop", **stats)(img))
    assert eval_resize(28, "random-crop") == 32
    torch.manual_seed(0)
    side, centres = 16 * 32 / 28, set()
    for _ in range(20):
        x = build_transforms(True, augment="random-crop", **stats)(img)[0]
        assert x.sum().item() == pytest.approx(side * side, rel=0.02)
        centres.add(round((x.sum(0) * torch.arange(28.0)).sum().item() / x.sum().item()))
    assert len(centres) > 1  # the crop moves


def test_eval_transform_normalises_with_given_stats() -> None:
    img = Image.new("L", (40, 40), 255)
    x = build_transforms(False, resolution=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(img)
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    pickle.dumps(build_transforms(True, resolution=8))  # spawn-safe: no lambdas


def test_build_datasets_contract(tmp_path: Path) -> None:
    train, ev, info = build_datasets(
        "imagefolder", _tree(tmp_path), resolution=16, mean=(0, 0, 0), std=(1, 1, 1)
    )
    assert info == DatasetInfo("imagefolder", 2, ["a", "b"], 6, 6)
    x, y = ev[3]
    assert isinstance(y, int) and y == 1 and tuple(x.shape) == (3, 16, 16)
    assert ev.targets == [0, 0, 0, 1, 1, 1] and len(train) == 6
    assert x.min() >= 0 and x.max() <= 1  # mean 0 / std 1 keeps ToTensor's range


def test_corrupt_image_is_skipped_with_one_warning(tmp_path: Path) -> None:
    """Training: an unreadable image is replaced (here through the deterministic eval
    transform, so the substitutes can be compared)."""
    root = _tree(tmp_path, broken=("train/a/1.png", "train/b/0.png"))
    train, evals, _ = build_datasets("imagefolder", root, resolution=8)
    ev = with_transform(train, evals.transform)
    with pytest.warns(UnreadableImageWarning) as record:
        items = [ev[i] for i in range(len(ev))]
        items += [ev[i] for i in range(len(ev))]  # second epoch: known-bad, no new warning
    assert len(record) == 1 and "1.png" in str(record[0].message)
    # Substitution rule: the next readable sample in index order, with its own label.
    assert [y for _, y in items[:6]] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(items[1][0], items[2][0]) and torch.equal(items[3][0], items[4][0])
    assert ev.num_skipped == 2
    with pytest.warns(UnreadableImageWarning, match="skipped 2 unreadable"):
        assert ev.report_skipped() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ev.report_skipped() == 0


def test_strict_images_raise(tmp_path: Path) -> None:
    root = _tree(tmp_path, broken=("train/b/2.png",))
    train, _, _ = build_datasets("imagefolder", root, resolution=8, strict_images=True)
    train[0]
    with pytest.raises(DataError) as exc:
        train[5]
    assert "unreadable image" in str(exc.value) and "\n" not in str(exc.value)


def test_all_unreadable_is_a_clear_error(tmp_path: Path) -> None:
    root = _tree(tmp_path, broken=tuple(f"train/{c}/{k}.png" for c in "ab" for k in range(3)))
    train, _, _ = build_datasets("imagefolder", root, resolution=8)
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataError, match="no readable"):
        train[0]


def test_unreadable_evaluation_image_is_dropped_not_replaced(tmp_path: Path) -> None:
    root = _tree(tmp_path, broken=("val/a/1.png", "val/b/0.png"))
    _, ev, _ = build_datasets("imagefolder", root, resolution=8)
    with pytest.warns(UnreadableImageWarning) as record:
        items = [ev[i] for i in range(len(ev))]
        items += [ev[i] for i in range(len(ev))]  # known-bad: no new warning
    assert len(record) == 1 and "dropped from the evaluation" in str(record[0].message)
    assert [y for _, y in items[:6]] == [0, DROPPED_LABEL, 0, DROPPED_LABEL, 1, 1]
    assert items[1][0] is None and items[3][0] is None and ev.num_skipped == 2
    images, labels = collate_dropping(items[:4])  # the batch keeps its size
    assert tuple(images.shape) == (4, 3, 8, 8) and labels.tolist() == [0, -1, 0, -1]
    assert not images[1].any()
    images, labels = collate_dropping([items[1], items[3]])
    assert images.shape[0] == 2 and labels.tolist() == [-1, -1]


def test_dataloader_workers_and_pickling(tmp_path: Path) -> None:
    root = _tree(tmp_path, broken=("train/a/0.png",))
    train, _, _ = build_datasets("imagefolder", root, resolution=8)
    loader = DataLoader(train, batch_size=3, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is emitted inside the worker
        batches = list(loader)
    assert sum(len(y) for _, y in batches) == 6 and batches[0][0].shape == (3, 3, 8, 8)
    assert train.num_skipped == 1  # counted in the worker, visible in the parent
    clone = copy.deepcopy(train)  # plain pickling keeps a snapshot of the count
    assert clone.num_skipped == 1 and len(clone) == 6


def test_zip_source_reopens_after_pickling(tmp_path: Path) -> None:
    z = tmp_path / "a.zip"
    buf = io.BytesIO()
    Image.new("L", (5, 5)).save(buf, "PNG")
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x/y.png", buf.getvalue())
    src = ZipSource(z)
    assert src.open("x/y.png").size == (5, 5)
    clone = pickle.loads(pickle.dumps(src))  # open handle is not pickled
    assert clone.open("x/y.png").size == (5, 5)
