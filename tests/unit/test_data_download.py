"""The resumable downloader against a local HTTP server on 127.0.0.1 (no real internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from adafilter.data import DATASETS, build_datasets, download_dataset
from adafilter.errors import DataError
from adafilter.utils.download import (
    BASE_URL_ENV,
    Resource,
    download_file,
    extract_archive,
    fetch_resources,
)
from helpers import ServerState


def _tar(members: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


PAYLOAD = bytes(range(256)) * 400  # 100 KiB


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "JPEG")
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pin_served(monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes]) -> None:
    """Register ``name`` with its resources pinned to the generated files' SHA-256.

    The real pins are the published digests of the official archives, which a miniature cannot
    match; everything else (names, URLs, extraction, layout) stays the dataset's own.
    """
    spec = DATASETS.get(name)
    resources = tuple(
        dataclasses.replace(res, sha256=_sha256(files[res.filename]), md5=None)
        for res in spec.resources
    )
    monkeypatch.setitem(DATASETS._items, name, dataclasses.replace(spec, resources=resources))


def _cell(strings: list[str]) -> np.ndarray:
    cell = np.empty((len(strings), 1), dtype=object)  # MATLAB N x 1 cell of char arrays
    for i, s in enumerate(strings):
        cell[i, 0] = np.array([s])
    return cell


def test_download_verifies_and_writes_atomically(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    state.files["f.bin"] = PAYLOAD
    dest = download_file(
        f"{url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest()
    )
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    download_file(f"{url}/f.bin", dest, md5=hashlib.md5(PAYLOAD).hexdigest())
    assert len(state.requests) == 1  # already there and verified: no second transfer


def test_interrupted_transfer_resumes_with_range(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    state.files["f.bin"] = PAYLOAD
    state.truncate_once.add("f.bin")
    dest = download_file(
        f"{url}/f.bin", tmp_path / "f.bin", backoff=0, md5=hashlib.md5(PAYLOAD).hexdigest()
    )
    assert dest.read_bytes() == PAYLOAD
    assert state.requests == [("f.bin", None), ("f.bin", f"bytes={len(PAYLOAD) // 2}-")]


def test_existing_part_file_is_continued(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    state.files["f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:1000])
    download_file(f"{url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert state.requests == [("f.bin", "bytes=1000-")]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    state.files["f.bin"] = PAYLOAD
    state.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:1000])
    download_file(f"{url}/f.bin", tmp_path / "f.bin", md5=hashlib.md5(PAYLOAD).hexdigest())
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_bad_checksum_leaves_nothing(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    state.files["f.bin"] = PAYLOAD
    with pytest.raises(DataError) as exc:
        download_file(f"{url}/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    msg = str(exc.value)
    assert "checksum mismatch" in msg and "\n" not in msg
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_http_error_and_non_archive(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    with pytest.raises(DataError, match="HTTP 404"):
        download_file(f"{url}/missing.tar", tmp_path / "missing.tar")
    (tmp_path / "page.tar").write_text("<html>not found</html>")
    with pytest.raises(DataError, match="not a tar or zip"):
        extract_archive(tmp_path / "page.tar", tmp_path / "out")


def test_fetch_extracts_and_is_idempotent(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    state.files["a.tar"] = _tar({"top/x.txt": b"x", "top/sub/y.txt": b"y"})
    sha = _sha256(state.files["a.tar"])
    res = [Resource("https://example.invalid/a.tar", "a.tar", sha256=sha, extract=True)]
    fetch_resources(res, tmp_path, base_url=url)
    assert (tmp_path / "top/sub/y.txt").read_bytes() == b"y" and not (tmp_path / "a.tar").exists()
    fetch_resources(res, tmp_path, base_url=url)
    assert len(state.requests) == 1


def test_stanford_dogs_end_to_end_download(
    tmp_path: Path, server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = server
    images, lists = {}, {}
    for split in ("train", "test"):
        files = [f"n01-Akita/{split}{k}.jpg" for k in range(2)] + [f"n02-Pug/{split}0.jpg"]
        images.update({f"Images/{f}": _jpeg() for f in files})
        buf = io.BytesIO()
        scipy.io.savemat(buf, {"file_list": _cell(files), "labels": np.array([[1], [1], [2]])})
        lists[f"{split}_list.mat"] = buf.getvalue()
    state.files = {"images.tar": _tar(images), "lists.tar": _tar(lists)}
    _pin_served(monkeypatch, "stanford-dogs", state.files)
    monkeypatch.setenv(BASE_URL_ENV, url)
    _, _, info = build_datasets("stanford-dogs", tmp_path / "dogs", download=True, resolution=8)
    assert (info.num_train, info.num_eval, info.class_names) == (3, 3, ["Akita", "Pug"])
    build_datasets("stanford-dogs", tmp_path / "dogs", download=True)  # present: no refetch
    assert [name for name, _ in state.requests] == ["images.tar", "lists.tar"]


def test_omniglot_download_checks_sha256(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    state.files["images_background_small1.zip"] = b"PK fake zip"
    with pytest.raises(DataError, match="checksum mismatch"):
        download_dataset("omniglot-small", tmp_path, base_url=url)
    assert [p.name for p in tmp_path.iterdir()] == [".adafilter-download.lock"]  # no zip/.part


# ---------------------------------------------------------------- every download is verified


# Hosts that serve plain http only (S3 website endpoints have no TLS).
HTTP_ONLY_HOSTS = {"fashion-mnist.s3-website.eu-central-1.amazonaws.com"}


def test_every_dataset_download_is_pinned_and_https() -> None:
    """Issue 30: a SHA-256 for every archive (MD5 only for a small non-archive file), https."""
    fetched = 0
    for name in DATASETS.names():
        for res in DATASETS.get(name).resources:
            fetched += 1
            scheme, _, rest = res.url.partition("://")
            assert scheme == "https" or rest.split("/")[0] in HTTP_ONLY_HOSTS, (name, res.url)
            if res.extract or res.filename.endswith((".gz", ".tgz", ".tar", ".zip")):
                assert re.fullmatch(r"[0-9a-f]{64}", res.sha256 or ""), (name, res.filename)
            else:
                assert re.fullmatch(r"[0-9a-f]{64}", res.sha256 or "") or re.fullmatch(
                    r"[0-9a-f]{32}", res.md5 or ""
                ), (name, res.filename)
    assert fetched >= 10


def test_unpinned_resource_is_refused_before_any_request(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    state.files["a.tar"] = _tar({"top/x.txt": b"x"})
    res = [Resource("https://example.invalid/a.tar", "a.tar", extract=True)]
    with pytest.raises(DataError) as exc:
        fetch_resources(res, tmp_path / "root", base_url=url)
    msg = str(exc.value)
    assert "no pinned SHA-256" in msg and "a.tar" in msg and "\n" not in msg
    assert state.requests == [] and not (tmp_path / "root").exists()


def test_existing_file_without_checksum_is_fetched_again(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    state.files["f.bin"] = PAYLOAD
    (tmp_path / "f.bin").write_bytes(b"stale or foreign")
    download_file(f"{url}/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD and len(state.requests) == 1


def test_mit_indoors_has_no_unverified_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        download_dataset("mit-indoors", tmp_path)
    msg = str(exc.value)
    assert "indoorCVPR_09.tar" in msg and "\n" not in msg
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- imagewoof / imagenette


WOOF = {"n02086240": "Shih-Tzu", "n02115641": "dingo"}


def _imagewoof_tgz(folder: str = "imagewoof2-320") -> bytes:
    members = {f"{folder}/noisy_imagewoof.csv": b"path,noisy_labels_0\n"}
    for wnid in WOOF:
        for split, n in (("train", 3), ("val", 2)):
            for k in range(n):
                members[f"{folder}/{split}/{wnid}/{wnid}_{split}{k}.JPEG"] = _jpeg()
    return _tar(members, gz=True)


@pytest.mark.parametrize(
    ("name", "folder"), [("imagewoof", "imagewoof2-320"), ("imagewoof-160", "imagewoof2-160")]
)
def test_imagewoof_end_to_end_download(
    tmp_path: Path,
    server: tuple[str, ServerState],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    folder: str,
) -> None:
    url, state = server
    state.files = {f"{folder}.tgz": _imagewoof_tgz(folder)}
    _pin_served(monkeypatch, name, state.files)
    monkeypatch.setenv(BASE_URL_ENV, url)
    _, ev, info = build_datasets(name, None, download=True, resolution=8)  # the cache directory
    assert (info.num_train, info.num_eval, info.class_names) == (6, 4, ["Shih-Tzu", "dingo"])
    assert ev.targets == [0, 0, 1, 1]
    build_datasets(name, None, download=True)  # present: no second request
    assert [n for n, _ in state.requests] == [f"{folder}.tgz"]


def test_imagewoof_checksum_mismatch_is_one_line_and_extracts_nothing(
    tmp_path: Path, server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped pin against a miniature: the mismatch path of the real resource."""
    url, state = server
    state.files["imagewoof2-320.tgz"] = _imagewoof_tgz()
    monkeypatch.setenv(BASE_URL_ENV, url)
    with pytest.raises(DataError) as exc:
        build_datasets("imagewoof", tmp_path, download=True)
    msg = str(exc.value)
    assert msg.startswith("checksum mismatch for imagewoof2-320.tgz") and "\n" not in msg
    assert [p.name for p in tmp_path.iterdir()] == [".adafilter-download.lock"]


def test_imagenette_download(
    tmp_path: Path, server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = server
    members = {
        f"imagenette2-320/{split}/{wnid}/x{k}.JPEG": _jpeg()
        for wnid in ("n01440764", "n03888257")
        for split in ("train", "val")
        for k in range(2)
    }
    state.files = {"imagenette2-320.tgz": _tar(members, gz=True)}
    _pin_served(monkeypatch, "imagenette", state.files)
    monkeypatch.setenv(BASE_URL_ENV, url)
    _, _, info = build_datasets("imagenette", tmp_path, download=True, resolution=8)
    assert (info.num_train, info.num_eval, info.class_names) == (4, 4, ["tench", "parachute"])


# ---------------------------------------------------------------- flowers-17


def _flowers_files(per_class: int = 4) -> dict[str, bytes]:
    """17flowers.tgz (jpg/image_NNNN.jpg, 80 ids a class) with ``per_class`` images of every
    class, and datasplits.mat whose split 1 puts 2 a class in trn1, 1 in val1, 1 in tst1."""
    ids = [c * 80 + k + 1 for c in range(17) for k in range(per_class)]
    tgz = _tar({f"jpg/image_{i:04d}.jpg": _jpeg() for i in ids} | {"jpg/files.txt": b""}, gz=True)
    by_k = {k: np.array([[c * 80 + k + 1 for c in range(17)]], dtype=np.uint16) for k in range(4)}
    splits = {
        "trn1": np.concatenate([by_k[0], by_k[1]], axis=1),
        "val1": by_k[2],
        "tst1": by_k[3],
        "trn2": by_k[3],  # other splits are ignored
        "val2": by_k[0],
        "tst2": by_k[1],
    }
    buf = io.BytesIO()
    scipy.io.savemat(buf, splits)
    return {"17flowers.tgz": tgz, "datasplits.mat": buf.getvalue()}


def test_flowers17_end_to_end_download(
    tmp_path: Path, server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = server
    state.files = _flowers_files()
    _pin_served(monkeypatch, "flowers17", state.files)
    monkeypatch.setenv(BASE_URL_ENV, url)
    train, ev, info = build_datasets("flowers17", tmp_path, download=True, resolution=8)
    assert (info.num_train, info.num_eval, info.num_classes) == (51, 17, 17)
    assert info.class_names[:3] == ["daffodil", "snowdrop", "lily_valley"]
    assert info.class_names[-1] == "pansy"
    assert ev.targets == list(range(17))  # image 80c+4 is class c
    assert ev.base.samples[1][0].endswith("jpg/image_0084.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".17flowers.tgz.extracted",
        ".adafilter-download.lock",
        "datasplits.mat",
        "jpg",
    ]


def test_flowers17_checksum_mismatch_extracts_nothing(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    """The shipped SHA-256 of 17flowers.tgz refuses another file before anything is extracted."""
    url, state = server
    state.files = _flowers_files()
    state.files["17flowers.tgz"] = b"not the archive"
    with pytest.raises(DataError, match="checksum mismatch for 17flowers.tgz"):
        download_dataset("flowers17", tmp_path, base_url=url)
    assert [p.name for p in tmp_path.iterdir()] == [".adafilter-download.lock"]
