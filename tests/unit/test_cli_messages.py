"""Library messages name config fields; the CLI prints them as its flags (``cli_message``)."""

from __future__ import annotations

import pytest

from adafilter.cli import build_parser
from adafilter.cli.base import cli_message


@pytest.fixture(scope="module", autouse=True)
def _flags_registered() -> None:
    build_parser()  # registers every subcommand's flags


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("no pretrained weights; pass weights=FILE", "no pretrained weights; pass --weights FILE"),
        (
            "pass download=True to fetch them from https://x/y.th, or weights=FILE",
            "pass --download to fetch them from https://x/y.th, or --weights FILE",
        ),
        ("missing out= (the run's output directory)", "missing --out (the run's output directory)"),
        ("device=cuda requested but CUDA", "--device cuda requested but CUDA"),
        ("unknown compile_backend='nope'; use", "unknown --compile-backend 'nope'; use"),
        ("cuda_graphs=True ignored with compile=True", "--cuda-graphs ignored with --compile"),
        (
            "recompute_pretrained=True ignored with compile=True",
            "--recompute-pretrained ignored with --compile",
        ),
        ("amp=fp16 ignored on cpu", "--amp fp16 ignored on cpu"),
        ("lower lr=/gate_lr= or use amp=off", "lower --lr/--gate-lr or use --amp off"),
        (
            "already holds a run; pass resume=True to continue it or choose another out=",
            "already holds a run; pass --resume to continue it or choose another --out",
        ),
        ("as data_root=, or pass download=True", "as --data-root, or pass --download"),
        ("point data_root= at a folder", "point --data-root at a folder"),
        ("pass data_root=DIR holding", "pass --data-root DIR holding"),
        ("to='m.json' must name the weights file", "--to 'm.json' must name the weights file"),
        (
            "format=safetensors needs it; use format=torch",
            "--format safetensors needs it; use --format torch",
        ),
        ("without program= and adafilter.load", "without --program and adafilter.load"),
        ("channels_last=False", "--no-channels-last"),
    ],
)
def test_config_fields_become_flags(library: str, cli: str) -> None:
    assert cli_message(library) == cli


@pytest.mark.parametrize(
    "text",
    [
        "the classifier has 10 outputs but num_classes=5; pass num_classes=10 or drop keep_head",
        "cannot read /tmp/out=1/a.png",
        "cannot download https://host/file?format=zip",
        "no flag named here",
    ],
)
def test_other_text_is_kept(text: str) -> None:
    assert cli_message(text) == text
