"""Smoke test of the speed benchmark at tiny sizes (the real runs are not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adafilter.utils import allocator
from conftest import has_toolchain

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # a subprocess benchmark run
GLIBC = allocator._glibc() is not None


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The benchmark's environment: one thread, a fresh cache, the allocator's defaults."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", allocator.ENV: "1", **extra}
    for name in allocator._USER_SETTINGS:
        env.pop(name, None)
    env["ADAFILTER_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def test_speed_benchmark_quick_prints_every_ratio(tmp_path: Path) -> None:
    # the compiled CPU code built first, in a fresh cache, as the benchmark does for users
    env = _env(tmp_path, ADAFILTER_CPU_GATE="1")
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out)]
        + ["--reps", "1", "--only", "train,eval1,eval32"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert {"torch", "commit", "threads", "cpu", "device"} <= set(r)
    assert r["cpu_kernels"] == has_toolchain()
    assert r["malloc_keeps_freed_memory"] == GLIBC  # as `adafilter train` on CPU
    assert r["complete"] and json.loads(out.read_text()) == r  # rows saved as they finish
    policies = [t["policy"] for t in r["train"]]
    assert policies == ["init", "trained-like", "random", "init", "random"]
    for t in r["train"]:
        # on CPU also the A/B of the backward with each branch's own transposed conv, and
        # for the trained-like policy recompute_pretrained's
        extra = {"adafilter_recompute"} if t["policy"] == "trained-like" else set()
        if r["cpu_kernels"]:  # built: also the gated BN's ATen passes
            extra.add("adafilter_eager_bn")
        assert set(t["median_s"]) == {"finetune", "adafilter", "adafilter_two_dgrads", *extra}
        assert t["ratio"] > 0 and t["ratio_two_dgrads"] > 0
        assert t["policy"] != "trained-like" or t["ratio_recompute"] > 0
    assert r["train"][0]["needed_from_S"] == 0.0  # init: every filter from F
    assert min(r["train"][2]["needed_from_F"], r["train"][2]["needed_from_S"]) > 0.95  # random
    assert r["eval_batch1"]["fast_vs_plain"] > 0
    assert [e["policy"] for e in r["eval_batch32"]] == ["trained-like", "random"]
    assert r["eval_batch32"][1]["computed_vs_plain"] > 1.9  # random: both banks needed


def test_speed_benchmark_turns_the_kernels_off_for_one_call_only() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from adafilter.layers import kernels

    seen = []
    speed._without(kernels, lambda: seen.append(kernels.ENABLED))()
    assert seen == [False] and kernels.ENABLED

    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        speed._without(kernels, fail)()
    assert kernels.ENABLED


def test_malloc_ab_measures_each_setting_in_fresh_processes(tmp_path: Path) -> None:
    out = tmp_path / "malloc.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "malloc_ab.py"), "--arch", "resnet18"]
        + ["--rounds", "1", "--warmup", "1", "--steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(tmp_path, ADAFILTER_CPU_GATE="0"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == r
    (row,) = r["rows"]
    cases = {f"{s}/{m}" for s in ("glibc_default", "kept") for m in ("finetune", "adafilter")}
    assert set(row["median"]) == cases
    for case, med in row["median"].items():  # each process set (or left) its own allocator
        assert med["kept"] == (GLIBC and case.startswith("kept/"))
        assert med["step_s"] > 0 and med["faults_per_step"] >= 0
    assert set(row["ratio"]) == {"glibc_default", "kept"} and all(row["ratio"].values())
