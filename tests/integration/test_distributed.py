"""DDP: two processes under torchrun train, evaluate exactly and write files once.

On CPU (Gloo) always; on one CUDA GPU (two ranks sharing it, through Gloo since NCCL refuses
two ranks on one device, with bf16 autocast) where a GPU is present.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adafilter.errors import AdaFilterError
from helpers import install_plugin, make_imagefolder, read_jsonl, train_args, uninstall_plugin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on(device: str, argv: list[str]) -> list[str]:
    """``train_args`` with its ``--device cpu`` replaced."""
    i = argv.index("--device")
    return [*argv[: i + 1], device, *argv[i + 2 :]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_torchrun_two_processes(tmp_path: Path, device: str) -> None:
    env = install_plugin(tmp_path / "plugin")
    extra = ["--epochs", "2"]
    if device == "cuda":
        env["ADAFILTER_DIST_BACKEND"] = "gloo"
        extra += ["--amp", "bf16"]
    uninstall_plugin()  # only the subprocesses need it
    data = make_imagefolder(tmp_path / "data", train=4, val=3)
    (data / "val" / "dog" / "2.png").unlink()  # 5 eval images: shards of 3 and 2, no padding
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "adafilter",
        *_on(device, train_args(data, out, "adafilter", *extra)),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert logs.count("epoch 1/2") == 1 and logs.count("epoch 2/2") == 1  # rank 0 only

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2
    assert summary["device"].startswith(device)
    policy = json.loads((out / "policy.json").read_text())
    assert policy["per_class"]["count"] == [3, 2]  # every eval image counted exactly once
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "policy.json",
        "summary.json",
    ]

    # A single process re-evaluating the DDP checkpoint sees the same accuracy.
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "adafilter",
            "eval",
            "--checkpoint",
            str(out / "checkpoint.pt"),
            "--device",
            device,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["images"] == 5 and res["test_acc"] == rows[-1]["test_acc"]


def test_unknown_backend_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adafilter.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ADAFILTER_DIST_BACKEND", "ncl")
    with pytest.raises(AdaFilterError, match="ADAFILTER_DIST_BACKEND='ncl'.*gloo"):
        init_distributed(torch.device("cpu"))
