"""The resumable downloader against a local HTTP server on 127.0.0.1 (no real internet)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from adafilter.data import build_datasets, download_dataset
from adafilter.errors import DataError
from adafilter.utils.download import (
    BASE_URL_ENV,
    Resource,
    download_file,
    extract_archive,
    fetch_resources,
)
from helpers import ServerState


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
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
    res = [Resource("https://example.invalid/a.tar", "a.tar", extract=True)]
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
