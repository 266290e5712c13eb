"""Rewrite result files written before ``paths.stored_path``: absolute paths -> stored form.

Every ``*.json`` and ``*.jsonl`` under the given folders (default ``benchmarks/results``) gets
its path strings rewritten by :func:`paths.stored_path` (repository-relative, ``../shared/...``,
``<data>/...``, ``~/...``); the rest of each file is kept byte for byte. Results written in
another checkout of the repository (e.g. ``/work/main``) name it with ``--checkout``; folders
that a running job still writes are left out with ``--exclude``::

    python benchmarks/relativize_results.py --checkout /work/main \\
        --exclude benchmarks/results/allf --exclude benchmarks/results/far

Prints one JSON line: the files changed and the number scanned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paths import REPO, relativize_json_file, relativize_json_text


def result_files(folders: list[Path], exclude: list[Path]) -> list[Path]:
    """The JSON files under ``folders``, less those in (or equal to) an ``exclude`` path."""
    skip = [p.resolve() for p in exclude]
    files = []
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.suffix not in (".json", ".jsonl") or not f.is_file():
                continue
            r = f.resolve()
            if any(r == s or s in r.parents for s in skip):
                continue
            files.append(f)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", help="folders to rewrite (default benchmarks/results)")
    ap.add_argument("--checkout", action="append", default=[], help="another checkout's root")
    ap.add_argument("--exclude", action="append", default=[], help="file or folder to skip")
    ap.add_argument("--dry-run", action="store_true", help="list what would change")
    args = ap.parse_args()
    folders = [Path(f) for f in args.folders] or [REPO / "benchmarks" / "results"]
    changed = []
    files = result_files(folders, [Path(p) for p in args.exclude])
    for f in files:
        if args.dry_run:
            text = f.read_text(encoding="utf-8")
            hit = relativize_json_text(text, checkouts=args.checkout) != text
        else:
            hit = relativize_json_file(f, checkouts=args.checkout)
        if hit:
            changed.append(str(f))
    print(json.dumps({"changed": changed, "scanned": len(files)}))


if __name__ == "__main__":
    main()
