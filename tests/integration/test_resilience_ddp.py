"""Long runs on a cluster under torchrun (2 Gloo processes on CPU): a preemption signal to one
rank stops every rank at the same step with one checkpoint; a rank killed with ``kill -9``
ends the job quickly with one message; ``--max-restarts`` + ``--resume`` continues the run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import free_port
from test_resilience import assert_same_run

from adafilter.checkpoint import load_checkpoint
from helpers import install_plugin, make_imagefolder, train_args, uninstall_plugin

EXTRA = ("--epochs", "3", "--milestones", "2", "--batch-size", "4", "--quiet")

# Under torchrun: HOOK=kind:rank:epoch:step acts on that rank after that step.
#   term  SIGTERM to itself;  pause  create the file PAUSED and sleep 5 s;
#   kill  SIGKILL to itself (writes the time first to KILLED; with
#   ONCE, only if the file ONCE does not exist yet, which it then creates)
HOOK_SCRIPT = """
import functools, os, signal, sys, time

import adafilter_tiny_plugin  # noqa: F401  (registers tiny-cnn)
import adafilter.training.fit as fit_module
from adafilter.cli import main

kind, rank, *at = os.environ.get("HOOK", "none:-1:0:0").split(":")
at = tuple(int(v) for v in at)


def on_step(epoch, step):
    if (epoch, step) != at or int(os.environ["RANK"]) != int(rank):
        return
    if kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif kind == "pause":  # let the test signal torchrun itself
        open(os.environ["PAUSED"], "w").close()
        time.sleep(5)
    elif kind == "kill":
        once = os.environ.get("ONCE")
        if once:
            if os.path.exists(once):
                return
            open(once, "w").close()
        with open(os.environ["KILLED"], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)


fit_module.fit = functools.partial(fit_module.fit, on_step=on_step)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("ddp")
    env = install_plugin(base / "plugin")
    uninstall_plugin()  # only the subprocesses need it
    data = make_imagefolder(base / "data", train=8, val=2)  # 16 images: 4 steps per epoch
    script = base / "hooked.py"
    script.write_text(HOOK_SCRIPT)
    return {"env": env, "data": data, "script": script, "base": base}


def torchrun(job: dict, out: Path, *extra: str, restarts: int = 0, **env: str):
    proc = subprocess.run(
        _cmd(job, out, *extra, restarts=restarts),
        env={**job["env"], **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    proc.ended = time.time()  # type: ignore[attr-defined]
    return proc


def _cmd(job: dict, out: Path, *extra: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(restarts),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--signals-to-handle",
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",  # as under SLURM's --signal=USR1@...
        str(job["script"]),
        *train_args(job["data"], out, "adafilter", *EXTRA, *extra),
    ]


@pytest.fixture(scope="module")
def full(job: dict) -> Path:
    out = job["base"] / "full"
    proc = torchrun(job, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _adafilter_lines(stderr: str) -> list[str]:
    """The job's ``adafilter:`` lines; no traceback through adafilter (torchrun's own report
    of a failed worker is allowed)."""
    assert "adafilter/" not in "".join(
        line for line in stderr.splitlines() if line.strip().startswith("File ")
    ), stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("adafilter:")]


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_at_one_step_and_resume_matches(
    job: dict, full: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = torchrun(job, out, HOOK="term:1:2:1")
    assert proc.returncode != 0
    lines = _adafilter_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("adafilter: stopped by SIGTERM at epoch 2 step 1 of 4")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"]["step"] == 1
    assert len(ckpt["position"]["ranks"]) == 2  # both ranks' state, in one checkpoint
    assert not list(out.glob(".*.tmp"))
    resumed = torchrun(job, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(full, out)


@pytest.mark.slow
def test_killed_rank_ends_the_job_quickly_with_one_message(job: dict, tmp_path: Path) -> None:
    out, killed = tmp_path / "run", tmp_path / "killed"
    proc = torchrun(job, out, HOOK="kill:1:2:1", KILLED=str(killed))
    assert proc.returncode != 0
    seconds = proc.ended - float(killed.read_text())  # type: ignore[attr-defined]
    assert seconds < 30, seconds  # not a collective's 30-minute timeout
    lines = _adafilter_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("adafilter: error: rank 0 lost another process of the job")
    assert "--resume" in lines[0] and "--max-restarts" in lines[0]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    print(f"job ended {seconds:.2f} s after kill -9 of rank 1")


@pytest.mark.slow
def test_max_restarts_with_resume_continues_the_run(job: dict, full: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {"HOOK": "kill:1:2:1", "KILLED": str(tmp_path / "killed"), "ONCE": str(tmp_path / "1")}
    proc = torchrun(job, out, "--resume", restarts=1, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "killed").exists()  # a rank did die once
    assert json.loads((out / "summary.json").read_text())["completed"] is True
    assert_same_run(full, out)


@pytest.mark.slow
def test_sigusr1_to_torchrun_stops_the_job_with_a_checkpoint(
    job: dict, full: Path, tmp_path: Path
) -> None:
    """SLURM's ``--signal=USR1@120`` reaches torchrun, which forwards it to the ranks."""
    out, paused = tmp_path / "run", tmp_path / "paused"
    env = {**job["env"], "HOOK": "pause:0:2:1", "PAUSED": str(paused)}
    launcher = subprocess.Popen(
        _cmd(job, out), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.time() + 120
        while not paused.exists() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        assert paused.exists()
        sent = time.time()
        launcher.send_signal(signal.SIGUSR1)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    seconds = time.time() - sent
    assert launcher.returncode != 0
    lines = _adafilter_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("adafilter: stopped by SIGUSR1 at epoch 2 step 1 of 4")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"]["step"] == 1
    print(f"torchrun ended {seconds:.2f} s after SIGUSR1 (5 s of it the test's pause)")
    resumed = torchrun(job, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(full, out)
