"""The package's import graph runs down the layers: no circles (counting imports inside
functions and under ``TYPE_CHECKING``), and ``layers/`` never imports the model, tuner,
training or other higher packages (timm's rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import adafilter

ROOT = Path(adafilter.__file__).resolve().parent
LOW = ("adafilter.layers", "adafilter.utils", "adafilter.errors")  # what layers/ may import


def _graph() -> dict[str, set[str]]:
    """``module -> adafilter modules it imports`` (a package's ``__init__`` is the package)."""
    mods: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = ("adafilter", *path.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                pkg = ".".join([*base, *([node.module] if node.module else [])])
                subs = [f"{pkg}.{a.name}" for a in node.names if f"{pkg}.{a.name}" in mods]
                targets = subs + ([pkg] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    edges[mod].add(target)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or ``None``."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circles() -> None:
    assert _cycle(_graph()) is None


def test_layers_import_only_lower_modules() -> None:
    edges = _graph()
    bad = {
        m: sorted(t for t in targets if not t.startswith(LOW))
        for m, targets in edges.items()
        if m.startswith("adafilter.layers")
    }
    assert not {m: t for m, t in bad.items() if t}


def test_the_checker_sees_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
