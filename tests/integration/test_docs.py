"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing pages
and unresolved API references fail), and its generated reference covers every flag."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("mkdocs", reason="the docs extra is not installed")
pytest.importorskip("mkdocstrings", reason="the docs extra is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_page_in_the_nav_is_built(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "reference/api/index.html"):
        assert (site / page).exists(), page


def test_cli_reference_lists_every_train_flag(site: Path) -> None:
    from adafilter.cli import build_parser

    html = (site / "reference" / "cli" / "index.html").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    train = sub.choices["train"]._actions
    flags = [s for a in train for s in a.option_strings if s.startswith("--") and s != "--help"]
    missing = [f for f in flags if f"<code>{f}</code>" not in html]
    assert flags and not missing, missing


def test_api_reference_renders_the_docstrings(site: Path) -> None:
    html = (site / "reference" / "api" / "index.html").read_text()
    for name in ("wrap", "AdaFilterConfig", "TrainConfig", "load", "fit"):
        assert f"{name}" in html
    assert "Wrap" in html or "wrap" in html
    assert "Raises" in html or "Returns" in html  # Google-style sections parsed


def test_the_home_page_is_the_readme(site: Path) -> None:
    """The site's home page is generated from the README, so it shows the README's current
    results table, and every ``docs/`` link of the README resolves inside the site."""
    readme = (REPO / "README.md").read_text()
    html = (site / "index.html").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows
    numbers = [c.strip() for row in rows for c in row.split("|")]
    numbers = [c for c in numbers if re.fullmatch(r"-?[\d.,]+( ± [\d.]+)?", c)]
    assert numbers
    missing = [c for c in numbers if f">{c}<" not in html]
    assert not missing, missing
    for target in re.findall(r"\]\(docs/([^)#]+)", readme):
        built = site / (target if not target.endswith(".md") else target[:-3] + "/index.html")
        assert built.exists(), target
