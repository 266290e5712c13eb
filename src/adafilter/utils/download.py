"""Resumable, checksum-verified downloads with atomic writes, and safe archive extraction.

A file is fetched into ``<dest>.part`` with HTTP Range requests continuing whatever is already
there (so an interrupted transfer resumes rather than restarts), fsync'ed, verified, and only
then renamed to ``<dest>`` with ``os.replace``; a checksum mismatch deletes the partial file and
leaves no final file. Only the standard library is used (urllib), so there is no extra
dependency. ``base_url`` (or the ``ADAFILTER_DOWNLOAD_BASE`` environment variable) replaces
every resource's URL directory, for mirrors and for tests against a local server.

Defaults live in one cache directory, :func:`cache_dir` (``$ADAFILTER_HOME``, default
``~/.cache/adafilter``): ``weights/`` and ``data/<dataset>/``, filled by ``download=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaFilterError, DataError
from .io import fsync_dir

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock, downloads are simply not shared
    fcntl = None  # type: ignore[assignment]

BASE_URL_ENV = "ADAFILTER_DOWNLOAD_BASE"
HOME_ENV = "ADAFILTER_HOME"
_CHUNK = 1 << 20


def cache_dir(*parts: str) -> Path:
    """``$ADAFILTER_HOME/<parts>`` (default ``~/.cache/adafilter``): where defaults live.

    Nothing is created here; ``download=True`` fills it, and a missing file is an error that names
    this path.
    """
    home = os.environ.get(HOME_ENV) or os.path.join("~", ".cache", "adafilter")
    return Path(home).expanduser().joinpath(*parts)


def probe_host(host: str, port: int, timeout: float) -> None:
    """Open (and close) a TCP connection, raising ``OSError`` within ``timeout`` seconds.

    DNS lookups ignore socket timeouts and can block for tens of seconds offline, so the
    attempt runs in a daemon thread that is simply abandoned when it takes too long.
    """
    error: list[OSError] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:  # gaierror, timeout, refused, unreachable
            error.append(exc)

    thread = threading.Thread(target=attempt, name="adafilter-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer from {host}:{port} within {timeout:g} s")
    if error:
        raise error[0]


def probe_url(url: str, timeout: float) -> None:
    """:func:`probe_host` for ``url``'s host (or its proxy): fail fast when offline."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urllib.parse.urlparse(proxy) if proxy else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    probe_host(target.hostname or "", port, timeout)


@dataclass(frozen=True)
class Resource:
    """One downloadable file.

    Attributes:
        url: Official URL.
        filename: Name to save it under (also the name looked up under a ``base_url``).
        sha256: Expected SHA-256 hex digest, as published for the file (``fetch_resources``
            refuses a resource with neither this nor ``md5``).
        md5: Expected MD5 hex digest (used only when no SHA-256 is published).
        extract: Extract the archive (tar/tar.gz/zip) into the destination folder and delete
            it afterwards; ``False`` keeps the file as downloaded.
        subdir: Folder under the data root to save/extract into.
    """

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    extract: bool = False
    subdir: str = ""


def resource_url(res: Resource, base_url: str | None = None) -> str:
    """The URL to fetch ``res`` from: the official one, or ``base_url/filename``."""
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV) or None
    if base:
        return f"{base.rstrip('/')}/{res.filename}"
    return res.url


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _transfer(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (Range request); raise on an interrupted read."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "adafilter"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # the .part already holds the whole file
        raise
    with resp:
        status = getattr(resp, "status", 200)
        if offset and status != 206:
            offset = 0  # server ignored Range: start over rather than append a second copy
        expected = resp.headers.get("Content-Length")
        received = 0
        with open(part, "ab" if offset else "wb") as f:
            while True:
                block = resp.read(_CHUNK)
                if not block:
                    break
                f.write(block)
                received += len(block)
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and received < int(expected):
            raise http.client.IncompleteRead(b"", int(expected) - received)


def download_file(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    error: type[AdaFilterError] = DataError,
) -> Path:
    """Download ``url`` to ``dest`` resumably, verify it, and move it into place atomically.

    Args:
        url: What to fetch (http/https/file).
        dest: Final file path; its folder is created.
        sha256: Expected SHA-256 digest (preferred), or a prefix of it (torch hub file names
            carry the first 8 hex digits).
        md5: Expected MD5 digest (when no SHA-256 is known). With neither, an existing ``dest``
            is not trusted: it is fetched again.
        retries: Resume attempts after a dropped connection.
        timeout: Socket timeout in seconds.
        backoff: Seconds to wait before the first retry (doubles each time).
        error: The exception class raised on failure (weights raise ``CheckpointError``).

    Returns:
        ``dest``.

    Raises:
        DataError: (or ``error``) The transfer kept failing or the checksum did not match
            (the partial file is deleted; no final file is written).
    """
    dest = Path(dest)
    if dest.is_file() and _matches(dest, sha256, md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout)
            break
        except urllib.error.HTTPError as exc:
            raise error(
                f"download of {url} failed: HTTP {exc.code} {exc.reason}; check the URL or "
                f"fetch the file by hand into {dest.parent}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            last = exc  # dropped connection / timeout: resume from what .part holds
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
    else:
        raise error(
            f"download of {url} failed after {retries + 1} attempts ({type(last).__name__}: "
            f"{last}); rerun to resume from {part.name}"
        )
    if not part.is_file():
        raise error(f"download of {url} produced no data; rerun or fetch it by hand")
    algo, want = ("sha256", sha256) if sha256 else ("md5", md5) if md5 else (None, None)
    if algo is not None and want is not None:
        got = _digest(part, algo)
        if not got.lower().startswith(want.lower()):
            part.unlink(missing_ok=True)
            raise error(
                f"checksum mismatch for {dest.name} from {url}: {algo} {got} != expected {want}; "
                "the download was deleted, rerun it or fetch the file by hand"
            )
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _matches(path: Path, sha256: str | None, md5: str | None) -> bool:
    if sha256:
        return _digest(path, "sha256").startswith(sha256.lower())
    if md5:
        return _digest(path, "md5") == md5.lower()
    return False  # nothing to check it against: fetch it again rather than trust it


def extract_archive(archive: str | Path, dest_dir: str | Path) -> list[Path]:
    """Extract a tar(.gz/.bz2/.xz) or zip archive into ``dest_dir``.

    Members are unpacked into a temporary folder inside ``dest_dir`` first and then moved into
    place, so an interrupted extraction never leaves a half-filled dataset folder behind.
    Tar members go through the ``"data"`` filter (no absolute paths, links out of the tree or
    device files).

    Args:
        archive: The archive file.
        dest_dir: Folder receiving the archive's top-level entries.

    Returns:
        The top-level paths created in ``dest_dir``.

    Raises:
        DataError: The file is not a readable tar/zip archive.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".extract-{archive.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)  # zipfile strips absolute paths and '..' components
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        else:
            raise DataError(
                f"{archive} is not a tar or zip archive (corrupt or an HTML error page?); "
                "delete it and download again"
            )
        created = []
        for entry in sorted(tmp.iterdir()):
            target = dest_dir / entry.name
            if target.exists():
                _merge(entry, target)
            else:
                os.replace(entry, target)
            created.append(target)
        return created
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(
            f"cannot extract {archive} ({type(exc).__name__}: {exc}); delete it and download again"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into existing ``dst`` (e.g. a second tar into Images/)."""
    if not (src.is_dir() and dst.is_dir()):
        os.replace(src, dst)
        return
    for entry in src.iterdir():
        target = dst / entry.name
        if target.exists():
            _merge(entry, target)
        else:
            os.replace(entry, target)


def fetch_resources(
    resources: Sequence[Resource], root: str | Path, *, base_url: str | None = None
) -> None:
    """Download (and extract where asked) every resource under ``root``.

    Every resource must carry a pinned checksum (``sha256``, or ``md5`` where no SHA-256 is
    published): a file that cannot be verified is never fetched, and one that fails its check is
    deleted before anything is extracted.

    Args:
        resources: What to fetch.
        root: The dataset's data root.
        base_url: Replaces the URL directory of every resource (mirror / local test server);
            defaults to ``$ADAFILTER_DOWNLOAD_BASE`` or the official URLs.

    Raises:
        DataError: A resource has no pinned checksum (nothing is fetched), a download failed or
            did not match its checksum (nothing of it is kept or extracted).
    """
    unpinned = [res.filename for res in resources if not (res.sha256 or res.md5)]
    if unpinned:
        raise DataError(
            f"refusing to download {', '.join(unpinned)}: no pinned SHA-256 to verify it "
            f"against; pin one in its Resource or fetch the file by hand into {root}"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".adafilter-download.lock"):
        _fetch_locked(resources, root, base_url)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive file lock: distributed ranks sharing a data root download it only once."""
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fetch_locked(resources: Sequence[Resource], root: Path, base_url: str | None) -> None:
    for res in resources:
        folder = root / res.subdir if res.subdir else root
        marker = folder / f".{res.filename}.extracted"
        if res.extract and marker.is_file():
            continue  # extracted by an earlier run (the archive itself was deleted)
        path = download_file(
            resource_url(res, base_url), folder / res.filename, sha256=res.sha256, md5=res.md5
        )
        if res.extract:
            extract_archive(path, folder)
            marker.touch()
            path.unlink()  # the extracted tree is what loaders read; don't keep 2 copies
