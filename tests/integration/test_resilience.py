"""Long runs on a cluster, one process: preemption signals, ``--checkpoint-every``, a full or
read-only disk, a dead DataLoader worker, and ``--resume`` refusing changed settings.

Every interrupted run is resumed and compared with an uninterrupted one: metrics, policy and
weights bit for bit (CPU). Runs use the ``tiny`` fixture with batch 2: 4 steps per epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adafilter.checkpoint import load_checkpoint
from adafilter.cli import main
from helpers import read_jsonl, train_args

EXTRA = ("--epochs", "3", "--milestones", "2", "--batch-size", "2", "--quiet")
STABLE = ("epoch", "lr", "gate_lr", "train_loss", "train_acc", "test_loss", "test_acc", "steps")

# The CLI with test hooks: HOOK=kind:a:b sends SIGNAL (or does something else) at a point.
#   step:E:S   after step S of epoch E (the on_step callback)
#   eval:K     inside the K-th evaluation of the test split
#   write:K    inside the K-th checkpoint write
#   kill-worker:E:S  SIGKILL to the DataLoader worker after step S of epoch E
#   fill:E:S   fill the disk holding FILL after step S of epoch E
#   readonly:E:S  remount the file system at FILL read-only after step S of epoch E
HOOK_SCRIPT = """
import functools, os, signal, subprocess, sys

import adafilter_tiny_plugin  # noqa: F401  (registers tiny-cnn)
import adafilter.training.fit as fit_module
import adafilter.training.run_dir as run_dir
from adafilter.cli import main

kind, *at = os.environ["HOOK"].split(":")
at = tuple(int(v) for v in at)
sig = getattr(signal, os.environ.get("SIGNAL", "SIGTERM"))
calls = {"eval": 0, "write": 0}


def children():
    pid = os.getpid()
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def fill(path):
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        except OSError:
            pass


def on_step(epoch, step):
    if (epoch, step) != at:
        return
    if kind == "step":
        os.kill(os.getpid(), sig)
    elif kind == "kill-worker":
        os.kill(children()[0], signal.SIGKILL)
    elif kind == "fill":
        fill(os.path.join(os.environ["FILL"], "filler"))
    elif kind == "readonly":
        subprocess.run(["mount", "-o", "remount,ro", os.environ["FILL"]], check=True)


def counted(name, real):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        if kind == name and calls[name] == at[0]:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    return wrapper


fit_module.evaluate = counted("eval", fit_module.evaluate)
run_dir.save_checkpoint = counted("write", run_dir.save_checkpoint)
fit_module.fit = functools.partial(fit_module.fit, on_step=on_step)
sys.exit(main(sys.argv[1:]))
"""


def _run(argv: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300, **kw
    )


def _hooked(tiny: dict, out: Path, hook: str, *extra: str, **env: str):
    script = Path(tiny["base"]) / "hooked.py"
    script.write_text(HOOK_SCRIPT)
    environ = {**tiny["env"], "HOOK": hook, **env}
    argv = [str(script), *train_args(tiny["data"], out, "adafilter", *EXTRA, *extra)]
    t0 = time.perf_counter()
    proc = _run(argv, environ)
    proc.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return proc


def _resume(tiny: dict, out: Path, *extra: str) -> None:
    argv = ["-m", "adafilter", *train_args(tiny["data"], out, "adafilter", *EXTRA, *extra)]
    proc = _run([*argv, "--resume"], tiny["env"])
    assert proc.returncode == 0, proc.stderr


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same results, bit for bit."""
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [[r[k] for k in STABLE] for r in ra] == [[r[k] for k in STABLE] for r in rb]
    assert [r.get("gate") for r in ra] == [r.get("gate") for r in rb]  # telemetry too
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["completed"] is True and sb["final_test_acc"] == sa["final_test_acc"]
    assert json.loads((a / "policy.json").read_text()) == json.loads(
        (b / "policy.json").read_text()
    )
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert "position" not in cb


def _one_line(stderr: str, start: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(start), stderr
    return lines[0]


@pytest.fixture(scope="module")
def full(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("full") / "run"
    argv = ["-m", "adafilter", *train_args(tiny["data"], out, "adafilter", *EXTRA)]
    proc = _run(argv, tiny["env"])
    assert proc.returncode == 0, proc.stderr
    return out


# ---- 1. preemption --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hook", "sig", "position"),
    [
        ("step:2:1", "SIGTERM", (2, 1)),  # inside an epoch
        ("step:1:3", "SIGUSR1", (1, 3)),
        ("step:3:2", "SIGINT", (3, 2)),  # in the last epoch
        ("eval:2", "SIGTERM", None),  # during epoch 2's evaluation: its end is saved
        ("write:1", "SIGUSR1", None),  # during epoch 1's checkpoint write
    ],
)
def test_signal_saves_progress_and_resume_matches_uninterrupted(
    tiny: dict, full: Path, tmp_path: Path, hook: str, sig: str, position: tuple | None
) -> None:
    out = tmp_path / "run"
    proc = _hooked(tiny, out, hook, SIGNAL=sig)
    signum = int(getattr(signal, sig))
    assert proc.returncode == 128 + signum, proc.stderr
    line = _one_line(proc.stderr, f"adafilter: stopped by {sig} at ")
    assert "--resume" in line and str(out) in line
    ckpt = load_checkpoint(out / "checkpoint.pt")
    if position is None:  # stopped at an epoch's end
        assert "position" not in ckpt and ckpt["epoch"] == int(hook.split(":")[1])
    else:
        epoch, step = position
        assert ckpt["epoch"] == epoch - 1
        assert (ckpt["position"]["epoch"], ckpt["position"]["step"]) == position
        assert f"epoch {epoch} step {step} of 4" in line
    assert not list(out.glob(".*.tmp"))
    _resume(tiny, out)
    assert_same_run(full, out)


@pytest.mark.parametrize("method", ["random-policy", "adafilter"])
def test_stop_inside_an_epoch_and_resume_in_process(
    tiny: dict, tmp_path: Path, method: str
) -> None:
    """A library call: ``fit`` raises ``TrainingStopped`` after the checkpoint; a second call
    with ``resume=True`` ends as the uninterrupted run (random policies' generator included)."""
    from adafilter.cli import build_parser, train_config_from_args
    from adafilter.training.fit import fit
    from adafilter.training.stopping import TrainingStopped

    def config(out: Path, *extra: str):
        argv = train_args(tiny["data"], out, method, *EXTRA, *extra)
        return train_config_from_args(build_parser().parse_args(argv))

    def term(epoch: int, step: int) -> None:
        if (epoch, step) == (2, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(config(full))
    with pytest.raises(TrainingStopped) as stopped:
        fit(config(cut), on_step=term)
    assert stopped.value.signum == signal.SIGTERM
    assert load_checkpoint(cut / "checkpoint.pt")["position"]["step"] == 2
    assert fit(config(cut, "--resume"))["completed"]
    assert_same_run(full, cut)


@pytest.mark.slow
def test_checkpoint_every_steps_then_kill9_resumes_exactly(
    tiny: dict, full: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = _hooked(tiny, out, "step:2:4", "--checkpoint-every", "3", SIGNAL="SIGKILL")
    assert proc.returncode == -9
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"]["step"] == 3
    _resume(tiny, out, "--checkpoint-every", "3")
    assert_same_run(full, out)


def test_fit_restores_the_callers_signal_handlers(tiny: dict, tmp_path: Path) -> None:
    """A library call: handlers only while training, the caller's ones after (also after a
    stop and an error); from another thread nothing is installed and training runs."""
    from adafilter.cli import build_parser, train_config_from_args
    from adafilter.training.fit import fit
    from adafilter.training.stopping import STOP_SIGNALS, TrainingStopped

    def config(name: str, *extra: str):
        argv = train_args(tiny["data"], tmp_path / name, "adafilter", *EXTRA, *extra)
        return train_config_from_args(build_parser().parse_args(argv))

    def mine(signum: int, frame: object) -> None:
        pass

    before = {s: signal.signal(s, mine) for s in STOP_SIGNALS}
    try:

        def term(epoch: int, step: int) -> None:
            if (epoch, step) == (1, 2):
                os.kill(os.getpid(), signal.SIGTERM)

        with pytest.raises(TrainingStopped, match="SIGTERM at epoch 1 step 2 of 4"):
            fit(config("stopped"), on_step=term)
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)

        def boom(epoch: int, step: int) -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fit(config("error"), on_step=boom)
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)

        result: dict[str, object] = {}
        thread = threading.Thread(
            target=lambda: result.update(fit(config("thread", "--epochs", "1")))
        )
        thread.start()
        thread.join(300)
        assert result.get("completed") is True
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# ---- 3. a full or read-only disk ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root, as in CI)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hook", "cause"),
    [("fill:2:1", "No space left on device"), ("readonly:2:1", "Read-only file system")],
)
def test_full_or_read_only_disk_is_one_line_and_resume_finishes(
    tiny: dict, full: Path, small_disk: Path, hook: str, cause: str
) -> None:
    out = small_disk / "run"
    proc = _hooked(tiny, out, hook, FILL=str(small_disk))
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr, "adafilter: error: cannot write ")
    assert str(out / "checkpoint.pt") in line and cause in line and "--resume" in line
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    if hook.startswith("readonly"):
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    else:
        (small_disk / "filler").unlink()
    _resume(tiny, out)
    assert_same_run(full, out)


# ---- 4. a dead DataLoader worker ------------------------------------------------------------


@pytest.mark.slow
def test_killed_dataloader_worker_is_a_clear_error(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _hooked(tiny, out, "kill-worker:1:1", "--workers", "1")
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr, "adafilter: error: a DataLoader worker died in epoch 1")
    assert "--workers" in line and "--resume" in line
    assert proc.seconds < 60  # type: ignore[attr-defined]


# ---- 5. resume never mixes configurations ---------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        ("--lr", "0.05"),
        ("--momentum", "0.5"),
        ("--weight-decay", "0"),
        ("--gate-lr", "0.1"),
        ("--gate-optimizer", "sgd"),
        ("--batch-size", "4"),
        ("--augment", "none"),
        ("--precise-bn", "2"),
    ],
)
def test_resume_refuses_a_changed_setting(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str]
) -> None:
    from helpers import one_line_error

    out = tmp_path / "run"
    args = train_args(tiny["data"], out, "adafilter", *EXTRA, "--epochs", "1")
    assert main(args) == 0
    recorded = (out / "config.json").read_text()
    line = one_line_error(capsys, [*args, "--epochs", "2", *change, "--resume"])
    assert change[0].lstrip("-").replace("-", "_") in line.replace("--", "").replace("-", "_")
    assert (out / "config.json").read_text() == recorded  # nothing not in effect is written
    # settings that do not change the run's state may change, and are recorded
    assert main([*args, "--epochs", "2", "--checkpoint-every", "1", "--resume"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["checkpoint_every"] == 1


# ---- fit() is a guest in the caller's process (issue 30) ------------------------------------


def _fit_one_epoch(tiny: dict, out: Path) -> dict:
    from adafilter.cli import build_parser, train_config_from_args
    from adafilter.training.fit import fit

    argv = train_args(tiny["data"], out, "adafilter", *EXTRA, "--epochs", "1")
    return fit(train_config_from_args(build_parser().parse_args(argv)))


def test_fit_gives_the_callers_rng_states_back(tiny: dict, tmp_path: Path) -> None:
    import random

    import numpy as np

    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    assert _fit_one_epoch(tiny, tmp_path / "run")["completed"]
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


def test_fit_leaves_a_callers_process_group_alone(tiny: dict, tmp_path: Path) -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert _fit_one_epoch(tiny, tmp_path / "run")["completed"]
        assert dist.is_initialized()  # the caller's group, still usable
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 1.0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fit_leaves_the_allocator_to_the_caller(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc's malloc thresholds are process-wide: the CLI sets them, a library call does not."""
    from adafilter.utils import allocator

    looked: list[int] = []
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator, "_glibc", lambda: looked.append(1))  # sets nothing
    monkeypatch.setattr(allocator, "_user_chose", lambda: False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert _fit_one_epoch(tiny, tmp_path / "run")["completed"]
    assert looked == []
    cli = train_args(tiny["data"], tmp_path / "cli", "adafilter", *EXTRA, "--epochs", "1")
    assert main(cli) == 0
    assert looked == [1]  # `adafilter train` on the CPU does set them
