"""Result files store paths relative to the repository, never the machine they ran on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def repo_relative(obj: Any) -> Any:
    """``obj`` with every string naming a path inside the repository made relative to it."""
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [repo_relative(v) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        path = Path(obj)
        if path == REPO or REPO in path.parents:
            return path.relative_to(REPO).as_posix() or "."
    return obj
