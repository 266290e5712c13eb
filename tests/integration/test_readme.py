"""Every command and code block of the README runs (so the README cannot rot).

``adafilter ...`` lines run as written, in a folder holding a generated ``my_photos`` image
folder; ``train`` gets ``--epochs 1 --resolution 32 --workers 0 --quiet`` appended (later flags
win) so the test takes seconds. Python blocks are executed; ``make`` lines must name targets
that ``make -n`` accepts.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from adafilter.cli import main
from helpers import make_imagefolder

REPO = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "1", "--resolution", "32", "--workers", "0", "--quiet"]


def _blocks(lang: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(prefix: str) -> list[str]:
    """Command lines of the bash blocks (continuations joined, comments dropped)."""
    joined = [b.replace("\\\n", " ") for b in _blocks("bash")]
    lines = [ln.split("#")[0].strip() for b in joined for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith(prefix)]


def test_readme_has_what_this_test_runs() -> None:
    assert len(_commands("adafilter ")) >= 3 and _blocks("python") and _commands("make ")


def test_make_targets_exist() -> None:
    for line in _commands("make "):
        target = shlex.split(line)[1]
        proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, (line, proc.stderr)


def test_own_image_folder_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train -> report -> predict on a generated ``my_photos`` (train/ and test/)."""
    make_imagefolder(tmp_path / "my_photos", train=6, val=3, size=40)
    (tmp_path / "my_photos" / "val").rename(tmp_path / "my_photos" / "test")
    monkeypatch.chdir(tmp_path)
    for line in _commands("adafilter "):
        argv = shlex.split(line)[1:]
        if argv[0] == "train":
            argv += FAST
        assert main(argv) == 0, line
    assert (tmp_path / "runs" / "mine" / "report" / "report.html").exists()


def test_python_blocks_run(capsys: pytest.CaptureFixture[str]) -> None:
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), {})
    assert "torch.Size([1, 10])" in capsys.readouterr().out
