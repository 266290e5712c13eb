"""User-facing errors.

Anything raised as :class:`AdaFilterError` is shown by the CLI as one line
(``adafilter: error: ...``) with no traceback, so its message must name the problem and the fix.
"""

from __future__ import annotations


class AdaFilterError(Exception):
    """A problem with the user's input (path, option, file) that the user can fix."""


class DataError(AdaFilterError):
    """A data root that is missing, has the wrong layout or holds unreadable files."""


class CheckpointError(AdaFilterError):
    """A checkpoint or weights file that is missing, corrupt or belongs to another model."""


class WriteError(AdaFilterError):
    """A file that cannot be written because the disk is full or read-only.

    Raised by the atomic writer (:mod:`adafilter.utils.io`) for ``ENOSPC``, ``EROFS`` and
    ``EDQUOT``, after removing its temporary file; the file it was replacing is untouched.

    Attributes:
        path: The file that could not be written.
        errno: The operating system's error number.
    """

    def __init__(self, message: str, *, path: str, errno: int) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno
