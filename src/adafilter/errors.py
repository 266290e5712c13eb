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
