"""Result files store paths relative to the repository, never the machine they ran on.

The one rule (:func:`stored_path`), used by every benchmark that writes under
``benchmarks/results/`` and by ``relativize_results.py`` for files written before it:

* inside the repository: relative to it (``benchmarks/results/near/finetune-s0``);
* beside it (the project's ``../shared``): ``../shared/...``;
* under a known data folder (:data:`DATA_ROOTS`, e.g. ``/tmp/data``): ``<data>/...``;
* under the home directory: ``~/...``;
* anything else (relative paths, names, other absolute paths) as given.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Folders outside the repository that benchmark data were extracted to -> what files store.
DATA_ROOTS: dict[str, str] = {"/tmp/data": "<data>"}
# A JSON string token (with escapes).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def stored_path(text: str, *, checkouts: Sequence[str | Path] = ()) -> str:
    """How a result file stores the path ``text`` (see the module docstring).

    Args:
        text: Any string; only absolute paths change.
        checkouts: Other checkouts of this repository whose absolute paths a file may hold
            (e.g. ``/work/main`` for results written there); mapped as the repository.

    Returns:
        The stored form.
    """
    if not os.path.isabs(text):
        return text
    path = Path(os.path.normpath(text))
    for root in (REPO, *(Path(c).resolve() for c in checkouts)):
        if path == root or root in path.parents:
            return path.relative_to(root).as_posix() or "."
        if root.parent in path.parents and (root.parent / "shared") in [path, *path.parents]:
            return Path(os.path.relpath(path, root)).as_posix()
    for prefix, marker in DATA_ROOTS.items():
        root = Path(prefix)
        if path == root or root in path.parents:
            rest = path.relative_to(root).as_posix()
            return marker if rest == "." else f"{marker}/{rest}"
    home = Path.home()
    if home != Path("/") and home in path.parents:
        return f"~/{path.relative_to(home).as_posix()}"
    return text


def repo_relative(obj: Any, *, checkouts: Sequence[str | Path] = ()) -> Any:
    """``obj`` (JSON values) with every path string in its stored form (:func:`stored_path`)."""
    if isinstance(obj, dict):
        return {k: repo_relative(v, checkouts=checkouts) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [repo_relative(v, checkouts=checkouts) for v in obj]
    if isinstance(obj, str):
        return stored_path(obj, checkouts=checkouts)
    return obj


def relativize_json_text(text: str, *, checkouts: Sequence[str | Path] = ()) -> str:
    """JSON (or JSON Lines) text with every path string in its stored form; everything else,
    layout included, byte for byte as it was."""

    def one(m: re.Match[str]) -> str:
        value = json.loads(m.group(0))
        new = stored_path(value, checkouts=checkouts)
        return m.group(0) if new == value else json.dumps(new)

    return _JSON_STRING.sub(one, text)


def relativize_json_file(path: str | Path, *, checkouts: Sequence[str | Path] = ()) -> bool:
    """Rewrite one JSON file's paths in place (atomically); ``True`` when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = relativize_json_text(text, checkouts=checkouts)
    if new == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
    return True


def code_commit(module_file: str | Path) -> str:
    """Short commit of the checkout that holds ``module_file`` (the code a benchmark imported,
    which ``PYTHONPATH`` may point at another worktree), or ``"unknown"``."""
    here = Path(module_file).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
