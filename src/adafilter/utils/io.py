"""The one atomic file writer: every file the package writes goes through it.

The data goes to a temporary file in the same directory, is fsynced, gets the permissions a
plain ``open(path, "w")`` would give (``0o666`` minus the umask; ``mkstemp`` makes ``0o600``)
and is ``os.replace``-d over the target, so a ``kill -9`` at any moment leaves either the old
file or the new one, never a torn one. A full or read-only disk (``ENOSPC``, ``EDQUOT``, ``EROFS``)
raises a one-line :class:`~adafilter.errors.WriteError` naming the file, after the temporary file
is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import WriteError

__all__ = [
    "NO_ROOM",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_text",
    "ensure_dir",
    "fsync_dir",
]

#: Error numbers that mean "no room or no permission to write here", not a bug.
NO_ROOM = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a power loss (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    Args:
        path: Destination file; its directory must exist.
        data: The complete file content.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _no_room(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        converted = _no_room(path, e)
        if converted is e:
            raise
        raise converted from None
    fsync_dir(path.parent)


def _no_room(path: Path, error: BaseException) -> BaseException:
    """``error`` as a :class:`WriteError` when it means a full or read-only disk."""
    if not isinstance(error, OSError) or error.errno not in NO_ROOM:
        return error
    return WriteError(
        f"cannot write {str(path)!r}: {error.strerror or os.strerror(error.errno)}",
        path=str(path),
        errno=error.errno,
    )


def ensure_dir(path: str | os.PathLike[str]) -> None:
    """``mkdir -p path``; a full or read-only disk raises :class:`WriteError`."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _no_room(Path(path), e) from None


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines to ``path`` atomically (the whole file is rewritten)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
