"""Every dataset loader against a miniature copy of its official on-disk layout."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from adafilter.data import DATASETS, build_datasets, check_data_root
from adafilter.errors import AdaFilterError, DataError
from helpers import make_fashion


def _jpeg_bytes(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 40)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def write_img(path: Path, data: bytes = JPEG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- stanford dogs


def _cell(strings: list[str]) -> np.ndarray:
    # The official lists are N x 1 MATLAB cell arrays of 1-element char arrays.
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = np.array([s])
    return cell


def make_dogs(root: Path, per_split: int = 2) -> Path:
    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
    for split, offset in (("train", 0), ("test", per_split)):
        files, labels = [], []
        for label, breed in enumerate(breeds, start=1):
            for k in range(per_split):
                rel = f"{breed}/{breed.split('-')[0]}_{offset + k}.jpg"
                write_img(root / "Images" / rel)
                files.append(rel)
                labels.append(label)
        scipy.io.savemat(
            root / f"{split}_list.mat",
            {
                "file_list": _cell(files),
                "annotation_list": _cell([f.removesuffix(".jpg") for f in files]),
                "labels": np.array(labels, dtype=np.uint8).reshape(-1, 1),
            },
        )
    return root


def test_stanford_dogs_counts_labels_and_names(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    train, ev, info = build_datasets("stanford-dogs", root, resolution=16)
    assert (info.num_train, info.num_eval, info.num_classes) == (6, 6, 3)
    assert info.class_names == ["Chihuahua", "Japanese_spaniel", "Maltese_dog"]
    assert ev.targets == [0, 0, 1, 1, 2, 2]  # 1-based .mat labels -> 0-based
    x, y = train[0]
    assert tuple(x.shape) == (3, 16, 16) and y == 0
    assert check_data_root("stanford-dogs", root) == {
        "dataset": "stanford-dogs",
        "train": 6,
        "eval": 6,
        "classes": 3,
    }


def test_stanford_dogs_missing_split_file_and_images(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    (root / "test_list.mat").unlink()
    with pytest.raises(DataError) as exc:
        check_data_root("stanford-dogs", root)
    assert "test_list.mat" in one_line(exc) and "lists.tar" in str(exc.value)
    with pytest.raises(DataError) as exc:
        check_data_root("stanford-dogs", tmp_path / "nowhere")
    assert "does not exist" in one_line(exc)


def test_listed_file_missing(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    (root / "Images/n02085620-Chihuahua/n02085620_0.jpg").unlink()
    with pytest.raises(DataError) as exc:
        check_data_root("stanford-dogs", root)
    assert "1 image(s) listed in train_list.mat are missing" in one_line(exc)


# ---------------------------------------------------------------- visual decathlon


def make_decathlon(
    root: Path, task: str, n_classes: int = 3, per: tuple[int, int] = (3, 2)
) -> Path:
    base = root / "decathlon-1.0"
    cats = [{"id": 1000 * 7 + c + 1, "name": f"{task}_cls{c}"} for c in range(n_classes)]
    img_id = 7_000_000
    for split, n in zip(("train", "val"), per, strict=True):
        images, anns = [], []
        for c, cat in enumerate(cats):
            for _ in range(n):
                img_id += 1
                rel = f"data/{task}/{split}/{c + 1:04d}/{img_id}.jpg"
                write_img(base / rel)
                images.append({"id": img_id, "file_name": rel, "width": 8, "height": 8})
                anns.append({"id": img_id, "image_id": img_id, "category_id": cat["id"]})
        ann = {"info": {}, "images": images, "annotations": anns, "categories": cats}
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{task}_{split}.json").write_text(json.dumps(ann))
    return root


@pytest.mark.parametrize("name", ["ucf101", "omniglot", "aircraft"])
def test_decathlon_tasks(tmp_path: Path, name: str) -> None:
    make_decathlon(tmp_path, name)
    train, ev, info = build_datasets(name, tmp_path, resolution=8)
    assert (info.num_train, info.num_eval, info.num_classes) == (9, 6, 3)
    assert info.class_names == [f"{name}_cls{c}" for c in range(3)]
    assert sorted(set(ev.targets)) == [0, 1, 2] and ev.targets.count(2) == 2
    # The decathlon-1.0 folder itself works as the root too.
    assert check_data_root(name, tmp_path / "decathlon-1.0")["train"] == 9


def test_decathlon_missing_val_json_and_download(tmp_path: Path) -> None:
    make_decathlon(tmp_path, "ucf101")
    (tmp_path / "decathlon-1.0/annotations/ucf101_val.json").unlink()
    with pytest.raises(DataError) as exc:
        check_data_root("ucf101", tmp_path)
    assert "ucf101_val.json" in one_line(exc) and "robots.ox.ac.uk" in str(exc.value)
    with pytest.raises(DataError) as exc:
        build_datasets("ucf101", tmp_path, download=True)
    assert "cannot be downloaded automatically" in one_line(exc)


# ---------------------------------------------------------------- FGVC aircraft (official)


def make_fgvc(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 1000000
    for split, per in (("train", 2), ("val", 3)):
        lines = []
        for v in variants:
            for _ in range(per):
                n += 1
                write_img(data / "images" / f"{n}.jpg")
                lines.append(f"{n} {v}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_aircraft_official_layout(tmp_path: Path) -> None:
    make_fgvc(tmp_path)
    train, ev, info = build_datasets("aircraft", tmp_path, resolution=8)
    assert (info.num_train, info.num_eval) == (6, 9)
    assert info.class_names == ["707-320", "A300B4", "Cessna 172"]
    assert ev.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    inner = tmp_path / "fgvc-aircraft-2013b"
    assert check_data_root("aircraft", inner) == {
        "dataset": "aircraft",
        "train": 6,
        "eval": 9,
        "classes": 3,
    }
    (inner / "data/images_variant_val.txt").unlink()
    with pytest.raises(DataError) as exc:
        check_data_root("aircraft", tmp_path)
    assert "images_variant_val.txt" in one_line(exc)


# ---------------------------------------------------------------- caltech-256


def make_caltech(root: Path, n_classes: int = 3, per_class: int = 52) -> Path:
    cats = root / "256_ObjectCategories"
    for c in range(1, n_classes + 1):
        d = cats / f"{c:03d}.thing{c}"
        for k in range(per_class):
            write_img(d / f"{c:03d}_{k + 1:04d}.jpg")
    for k in range(5):
        write_img(cats / "257.clutter" / f"257_{k + 1:04d}.jpg")
    write_img(cats / "001.thing1" / "greg" / "extra.jpg")  # stray sub-folder: ignored
    (cats / "001.thing1" / "notes.txt").write_text("not an image")
    return root


def _paths(ds) -> list[str]:  # noqa: ANN001 - SafeImageDataset
    return [p for p, _ in ds.base.samples]


def test_caltech_split_rules(tmp_path: Path) -> None:
    make_caltech(tmp_path)
    train, ev, info = build_datasets("caltech256-30", tmp_path, resolution=8, seed=0)
    assert (info.num_train, info.num_eval, info.num_classes) == (90, 60, 3)
    assert "clutter" not in " ".join(info.class_names) and info.class_names[0] == "thing1"
    assert not set(_paths(train)) & set(_paths(ev))  # disjoint
    assert all(train.targets.count(c) == 30 and ev.targets.count(c) == 20 for c in range(3))
    again, ev_again, _ = build_datasets("caltech256-30", tmp_path, seed=0)
    assert _paths(again) == _paths(train) and _paths(ev_again) == _paths(ev)  # deterministic
    other, _, _ = build_datasets("caltech256-30", tmp_path, seed=1)
    assert _paths(other) != _paths(train)
    summary = check_data_root("caltech256-30", tmp_path / "256_ObjectCategories")
    assert summary == {"dataset": "caltech256-30", "train": 90, "eval": 60, "classes": 3}


def test_caltech_too_small_and_empty_class(tmp_path: Path) -> None:
    make_caltech(tmp_path)
    with pytest.raises(DataError) as exc:
        check_data_root("caltech256-60", tmp_path)
    assert "needs 80 (60 train + 20 eval)" in one_line(exc)
    (tmp_path / "256_ObjectCategories" / "004.empty").mkdir()
    with pytest.raises(DataError) as exc:
        check_data_root("caltech256-30", tmp_path)
    assert "004.empty has 0 images" in one_line(exc)


# ---------------------------------------------------------------- MIT indoor


def make_indoor(root: Path) -> Path:
    classes = ["bakery", "kitchen", "library"]
    for split, name, per in (("tr", "TrainImages.txt", 4), ("te", "TestImages.txt", 1)):
        lines = []
        for c in classes:
            for k in range(per):
                rel = f"{c}/{split}_{k}.jpg"
                write_img(root / "Images" / rel)
                lines.append(rel)
        (root / name).write_bytes(("\r\n".join(lines) + "\r\n").encode())  # CRLF like the release
    return root


def test_mit_indoor(tmp_path: Path) -> None:
    make_indoor(tmp_path)
    _, ev, info = build_datasets("mit-indoors", tmp_path, resolution=8)
    assert (info.num_train, info.num_eval, info.num_classes) == (12, 3, 3)
    assert info.class_names == ["bakery", "kitchen", "library"] and ev.targets == [0, 1, 2]
    assert check_data_root("mit-indoors", tmp_path)["eval"] == 3
    (tmp_path / "TrainImages.txt").unlink()
    with pytest.raises(DataError) as exc:
        check_data_root("mit-indoors", tmp_path)
    assert "TrainImages.txt" in one_line(exc)


# ---------------------------------------------------------------- omniglot-small


def _png_1bit() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10, 10), 1).save(buf, "PNG")
    return buf.getvalue()


def make_omniglot_zip(path: Path, alphabets: int = 2, chars: int = 2) -> Path:
    png = _png_1bit()
    with zipfile.ZipFile(path, "w") as zf:
        for a in range(alphabets):
            for c in range(chars):
                for d in range(20, 0, -1):  # written out of order: the loader sorts
                    char = f"images_background_small1/Alpha{a}/character{c + 1:02d}"
                    zf.writestr(f"{char}/0{a}{c}_{d:02d}.png", png)
    return path


def test_omniglot_small_zip_folder_and_extracted(tmp_path: Path) -> None:
    z = make_omniglot_zip(tmp_path / "images_background_small1.zip")
    for root in (z, tmp_path):
        train, ev, info = build_datasets("omniglot-small", root, resolution=8)
        assert (info.num_train, info.num_eval, info.num_classes) == (60, 20, 4)
        assert info.class_names[0] == "Alpha0/character01"
        assert [k.rsplit("_", 1)[1] for k, _ in ev.base.samples[:5]] == [
            f"{d}.png" for d in range(16, 21)
        ]  # drawers 16-20 evaluate
        assert tuple(train[3][0].shape) == (3, 8, 8)
    with zipfile.ZipFile(z) as zf:
        zf.extractall(tmp_path / "x")
    extracted = tmp_path / "x" / "images_background_small1"
    assert check_data_root("omniglot-small", extracted)["train"] == 60
    assert check_data_root("omniglot-small", tmp_path / "x")["eval"] == 20


def test_omniglot_small_real_zip(shared_home: Path) -> None:
    """The real zip from ``../shared``; ``None`` reads it from the cache directory."""
    summary = check_data_root("omniglot-small", shared_home / "data" / "omniglot-small")
    assert summary == {"dataset": "omniglot-small", "train": 2040, "eval": 680, "classes": 136}
    train, _, info = build_datasets("omniglot-small", None, resolution=32)
    assert info.num_classes == 136 and tuple(train[0][0].shape) == (3, 32, 32)


# ---------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_layouts_and_subset(tmp_path: Path) -> None:
    make_fashion(tmp_path / "debian")  # flat .gz files, like /usr/share/datasets/fashion-mnist
    train, ev, info = build_datasets("fashion-mnist", tmp_path / "debian", resolution=32)
    assert (info.num_train, info.num_eval, info.num_classes) == (40, 20, 10)
    assert info.class_names[0] == "T-shirt/top" and ev.targets[:3] == [0, 1, 2]
    assert tuple(train[0][0].shape) == (3, 32, 32)
    make_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)  # torchvision layout
    assert check_data_root("fashion-mnist", tmp_path / "tv")["train"] == 40
    a, b, info = build_datasets("fashion-mnist", tmp_path / "debian", subset_per_class=2, seed=3)
    assert (info.num_train, info.num_eval) == (20, 20)
    assert all(a.targets.count(c) == 2 for c in range(10))
    a2, _, _ = build_datasets("fashion-mnist", tmp_path / "debian", subset_per_class=2, seed=3)
    a3, _, _ = build_datasets("fashion-mnist", tmp_path / "debian", subset_per_class=2, seed=4)
    assert a.base.samples == a2.base.samples != a3.base.samples
    (tmp_path / "debian" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        check_data_root("fashion-mnist", tmp_path / "debian")
    assert "t10k-labels-idx1-ubyte" in one_line(exc)


# ---------------------------------------------------------------- imagefolder + generic errors


def make_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per: int = 3) -> Path:
    for split in ("train", "val"):
        for c in classes:
            for k in range(per):
                write_img(root / split / c / f"{k}.jpg")
    return root


def test_imagefolder_and_its_errors(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    assert check_data_root("imagefolder", tmp_path) == {
        "dataset": "imagefolder",
        "train": 6,
        "eval": 6,
        "classes": 2,
    }
    (tmp_path / "train" / "emu").mkdir()
    with pytest.raises(DataError) as exc:
        check_data_root("imagefolder", tmp_path)
    assert "class folder(s) without images" in one_line(exc) and "emu" in str(exc.value)
    (tmp_path / "train" / "emu").rmdir()
    write_img(tmp_path / "val" / "yak" / "0.jpg")
    with pytest.raises(DataError) as exc:
        check_data_root("imagefolder", tmp_path)
    assert "not in" in one_line(exc) and "yak" in str(exc.value)


def test_imagefolder_missing_val(tmp_path: Path) -> None:
    write_img(tmp_path / "train" / "a" / "0.jpg")
    with pytest.raises(DataError) as exc:
        check_data_root("imagefolder", tmp_path)
    assert "missing eval folder" in one_line(exc)


def test_unreadable_image_reported_by_check(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    write_img(tmp_path / "val" / "dog" / "broken.jpg", b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError) as exc:
        check_data_root("imagefolder", tmp_path)
    assert "1 unreadable image(s)" in one_line(exc) and "broken.jpg" in str(exc.value)


def test_no_root_and_unknown_name() -> None:
    with pytest.raises(DataError) as exc:
        check_data_root("stanford-dogs", None)
    assert "data_root=" in one_line(exc)
    with pytest.raises(AdaFilterError) as exc:
        check_data_root("imagenet-21k", "/tmp")
    assert "choose one of" in one_line(exc)
    assert {"stanford-dogs", "omniglot-small", "fashion-mnist", "imagefolder"} <= set(
        DATASETS.names()
    )


def test_paper_counts_are_registered() -> None:
    table1 = {
        "stanford-dogs": (12000, 8580, 120),
        "ucf101": (7629, 1908, 101),
        "aircraft": (3334, 3333, 100),
        "caltech256-30": (7680, 5120, 256),
        "caltech256-60": (15360, 5120, 256),
        "mit-indoors": (5360, 1340, 67),
        "omniglot": (19476, 6492, 1623),
    }
    for name, counts in table1.items():
        assert DATASETS.get(name).paper_counts == counts


def test_caltech256_60_counts(tmp_path: Path) -> None:
    make_caltech(tmp_path, n_classes=2, per_class=81)
    summary = check_data_root("caltech256-60", tmp_path, seed=5)
    assert summary == {"dataset": "caltech256-60", "train": 120, "eval": 40, "classes": 2}


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_debian_default_root() -> None:
    summary = check_data_root("fashion-mnist", None)
    assert summary == {"dataset": "fashion-mnist", "train": 60000, "eval": 10000, "classes": 10}


def test_default_root_is_the_cache_directory_and_missing_names_path_and_fix(
    empty_adafilter_home: Path,
) -> None:
    """No ``../shared`` lookup: the default is ``$ADAFILTER_HOME/data/omniglot-small``."""
    with pytest.raises(DataError) as exc:
        build_datasets("omniglot-small", None, resolution=8)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(empty_adafilter_home / "data" / "omniglot-small") in msg and "download=True" in msg


# ---------------------------------------------------------------- imagewoof / imagenette


def make_imagewoof(root: Path, folder: str = "imagewoof2-320", eval_name: str = "val") -> Path:
    for split, n in (("train", 2), (eval_name, 1)):
        for wnid in ("n02115641", "n02086240", "n02099601"):  # dingo, Shih-Tzu, golden_retriever
            for k in range(n):
                write_img(root / folder / split / wnid / f"{wnid}_{split}{k}.JPEG")
    return root


def test_imagewoof_sizes_root_itself_and_class_names(tmp_path: Path) -> None:
    names = ["Shih-Tzu", "golden_retriever", "dingo"]  # sorted by wnid
    for folder in ("imagewoof2-320", "imagewoof2", "imagewoof2-160"):
        root = make_imagewoof(tmp_path / folder, folder)
        for name in ("imagewoof", "imagewoof-160"):  # any extracted size loads under any name
            for r in (root, root / folder):
                _, ev, info = build_datasets(name, r, resolution=8)
                assert (info.num_train, info.num_eval, info.class_names) == (6, 3, names)
                assert ev.targets == [0, 1, 2]


def test_imagewoof_prefers_its_own_size(tmp_path: Path) -> None:
    make_imagewoof(tmp_path, "imagewoof2-320")
    write_img(tmp_path / "imagewoof2-160" / "train" / "n02086240" / "only.JPEG")
    write_img(tmp_path / "imagewoof2-160" / "val" / "n02086240" / "only.JPEG")
    assert check_data_root("imagewoof", tmp_path)["train"] == 6
    assert check_data_root("imagewoof-160", tmp_path)["train"] == 1


def test_imagewoof_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        check_data_root("imagewoof", tmp_path)
    assert "imagewoof2-320.tgz" in one_line(exc) and "download=True" in str(exc.value)
    make_imagewoof(tmp_path)
    with pytest.raises(DataError) as exc:  # Imagewoof's folders are not Imagenette's
        check_data_root("imagenette", tmp_path / "imagewoof2-320")
    assert "Imagenette" in one_line(exc)
    write_img(tmp_path / "imagewoof2-320" / "val" / "n02088364" / "x.JPEG")  # beagle: not in train
    with pytest.raises(DataError) as exc:
        check_data_root("imagewoof", tmp_path)
    assert "n02088364" in one_line(exc)
    (tmp_path / "imagewoof2-320" / "train" / "n02088364").mkdir()
    with pytest.raises(DataError) as exc:
        check_data_root("imagewoof", tmp_path)
    assert "no images" in one_line(exc)


def test_imagewoof_reads_the_imagefolder_miniature_layout(tmp_path: Path) -> None:
    """``train`` + ``test`` with ``<wnid>_<breed>`` folders, as ../shared's imagewoof-mini."""
    make_imagewoof(tmp_path, "imagewoof-mini", eval_name="test")
    for wnid in ("n02115641", "n02086240", "n02099601"):
        for split in ("train", "test"):
            d = tmp_path / "imagewoof-mini" / split / wnid
            d.rename(d.with_name(f"{wnid}_breed"))
    _, ev, info = build_datasets("imagewoof", tmp_path / "imagewoof-mini", resolution=8)
    assert (info.num_train, info.num_eval) == (6, 3) and info.class_names[0] == "Shih-Tzu"


def test_imagewoof_real_miniature(tmp_path: Path) -> None:
    """../shared's imagewoof-mini (real ImageNet JPEGs) through the ``imagewoof`` loader."""
    from helpers import SHARED_IMAGEWOOF_ZIP

    if not SHARED_IMAGEWOOF_ZIP.is_file():
        pytest.skip(f"shared imagewoof-mini not available ({SHARED_IMAGEWOOF_ZIP})")
    with zipfile.ZipFile(SHARED_IMAGEWOOF_ZIP) as zf:
        zf.extractall(tmp_path)
    train, _, info = build_datasets("imagewoof", tmp_path / "imagewoof-mini", resolution=32)
    assert (info.num_train, info.num_eval, info.num_classes) == (1250, 1000, 10)
    assert info.class_names == [
        "Shih-Tzu",
        "Rhodesian_ridgeback",
        "beagle",
        "English_foxhound",
        "Border_terrier",
        "Australian_terrier",
        "golden_retriever",
        "Old_English_sheepdog",
        "Samoyed",
        "dingo",
    ]
    assert tuple(train[0][0].shape) == (3, 32, 32)


# ---------------------------------------------------------------- flowers-17


def make_flowers(root: Path, ids: list[int], splits: dict[str, list[int]]) -> Path:
    for i in ids:
        write_img(root / "jpg" / f"image_{i:04d}.jpg")
    scipy.io.savemat(root / "datasplits.mat", {k: np.array([v]) for k, v in splits.items()})
    return root


def test_flowers17_split1_labels_and_names(tmp_path: Path) -> None:
    ids = [1, 2, 80, 81, 1281, 1360]
    make_flowers(tmp_path, ids, {"trn1": [1, 81], "val1": [1360], "tst1": [2, 80, 1281]})
    train, ev, info = build_datasets("flowers17", tmp_path, resolution=8)
    assert (info.num_train, info.num_eval, info.num_classes) == (3, 3, 17)
    assert train.targets == [0, 1, 16] and ev.targets == [0, 0, 16]
    assert info.class_names[1] == "snowdrop" and info.class_names[16] == "pansy"


def test_flowers17_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        check_data_root("flowers17", tmp_path)
    assert "jpg" in one_line(exc)
    make_flowers(tmp_path, [1], {"trn1": [1], "val1": [1], "tst1": [1361]})
    with pytest.raises(DataError) as exc:
        check_data_root("flowers17", tmp_path)
    assert "1361" in one_line(exc)
    make_flowers(tmp_path, [1], {"trn1": [1], "val1": [1]})
    with pytest.raises(DataError) as exc:
        check_data_root("flowers17", tmp_path)
    assert "tst1" in one_line(exc)
    make_flowers(tmp_path, [1], {"trn1": [1], "val1": [1], "tst1": [5]})
    with pytest.raises(DataError) as exc:
        check_data_root("flowers17", tmp_path)
    assert "image_0005.jpg" in one_line(exc)
