"""MkDocs hook: the home page and the reference pages, generated at build time.

``index.md`` is the README with its ``docs/`` links made relative to the docs directory, so the
site's home page cannot fall behind the README.

``reference/cli.md`` comes from the ``adafilter`` argument parser (every subcommand's flags, as
``--help`` shows them) and ``reference/config.md`` from the ``TrainConfig`` and
``AdaFilterConfig`` dataclasses (fields, types, defaults and their docstrings' ``Attributes``),
so the reference has no second copy that could drift. All three are written into ``docs/``
before MkDocs collects the pages and are not committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

GENERATED = ("index.md", "reference/cli.md", "reference/config.md")
README = Path(__file__).resolve().parents[2] / "README.md"


def _cell(text: str) -> str:
    """One table cell: one line, reST roles and double backquotes as Markdown code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", " ".join(str(text).split()))
    return text.replace("``", "`").replace("|", "\\|")


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for action in parser._actions:  # argparse has no public accessor; doc generators read this
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        if action.metavar and action.option_strings:
            names += f" `{action.metavar}`"
        default = action.default
        shown = "" if default in (None, argparse.SUPPRESS, False) else f"`{default}`"
        rows.append(f"| {names} | {shown} | {_cell(action.help or '')} |")
    return rows


def cli_page() -> str:
    """Markdown for every subcommand's flags."""
    from adafilter.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [
        "# Command line",
        "",
        "Generated from the `adafilter` argument parser (`adafilter COMMAND --help` shows the "
        "same). Options of `train` can also come from a TOML/YAML file (`--config`); flags win.",
        "",
    ]
    for name, p in sub.choices.items():
        out += [f"## `adafilter {name}`", "", _cell(p.description or ""), "", *_flags(p), ""]
    return "\n".join(out)


def _attributes(cls: type) -> dict[str, str]:
    """``{field: description}`` from a Google-style ``Attributes:`` docstring section."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    body = doc.split("Attributes:", 1)[1]
    out: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        m = re.match(r"^    (\w+): ?(.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2)
        elif name and line.startswith("        "):
            out[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


def _fields(cls: type) -> list[str]:
    notes = _attributes(cls)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append(
            f"| `{f.name}` | `{_cell(typ)}` | `{_cell(repr(default))}` | "
            f"{_cell(notes.get(f.name, ''))} |"
        )
    return rows


def config_page() -> str:
    """Markdown for ``TrainConfig`` and ``AdaFilterConfig``."""
    from adafilter.training.config import PRESETS, TrainConfig
    from adafilter.tuner.config import AdaFilterConfig

    out = [
        "# Configuration",
        "",
        "Generated from the dataclasses. `TrainConfig` is what `adafilter train` builds from its "
        "flags (`--lr` sets `lr`, ...) and what `fit()` takes; its `adafilter` field overrides "
        "`AdaFilterConfig` fields (`--adafilter embed_dim=32` or the gate flags).",
        "",
        "## `TrainConfig`",
        "",
        *_fields(TrainConfig),
        "",
        "### Presets (`--preset NAME`)",
        "",
    ]
    for name, values in PRESETS.items():
        out.append(f"- `{name}`: " + ", ".join(f"`{k}={v!r}`" for k, v in values.items()))
    out += ["", "## `AdaFilterConfig`", "", *_fields(AdaFilterConfig), ""]
    return "\n".join(out)


def home_page() -> str:
    """The README as the site's home page: links into ``docs/`` become relative to it."""
    return re.sub(r"\]\(docs/", "](", README.read_text())


def on_pre_build(config: Any, **_: Any) -> None:
    """Write the generated pages into the docs directory before MkDocs collects them."""
    docs = Path(config["docs_dir"])
    for rel, text in zip(GENERATED, (home_page(), cli_page(), config_page()), strict=True):
        path = docs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
