"""``utils/allocator.py``: glibc keeps a training step's freed activations for the next step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from adafilter.utils import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Four 24 MB blocks allocated, touched and freed per step, like a step's activations: under
# glibc's defaults the heap top is trimmed (or the blocks unmapped) and every page faults again.
_STEPS = """
import resource, sys, torch
from adafilter.utils.allocator import keep_freed_memory
kept = keep_freed_memory()
def step():
    blocks = [torch.ones(6 << 20) for _ in range(4)]
    del blocks
for _ in range(10):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""


def _faults_per_step(setting: str) -> tuple[bool, float]:
    env = {**os.environ, allocator.ENV: setting, "OMP_NUM_THREADS": "1"}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)
    env["LD_PRELOAD"] = ""
    out = subprocess.run(
        [sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    kept, faults = _faults_per_step("1")
    default, default_faults = _faults_per_step("0")
    assert kept and not default
    assert default_faults > 10_000  # ~24.6k: every page of the 96 MB faults again each step
    assert faults < default_faults / 20  # 0 here


class _FakeLibc:
    def __init__(self, ok: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.ok = ok

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.ok


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> _FakeLibc:
    libc = _FakeLibc()
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    for name in (allocator.ENV, "LD_PRELOAD", *allocator._USER_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_sets_both_thresholds_once(fake: _FakeLibc) -> None:
    said: list[str] = []
    assert allocator.keep_freed_memory(say=said.append)
    # the mmap threshold first: fixing either one freezes the other's dynamic value
    assert fake.calls == [(-3, 32 << 20), (-1, 1 << 30)]
    assert len(said) == 1 and allocator.ENV in said[0]
    assert allocator.keep_freed_memory(say=said.append)
    assert len(fake.calls) == 2 and len(said) == 1


@pytest.mark.parametrize(
    "name, value",
    [
        (allocator.ENV, "0"),
        ("MALLOC_TRIM_THRESHOLD_", "1000000"),
        ("MALLOC_MMAP_THRESHOLD_", "1000000"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
        ("LD_PRELOAD", "libtcmalloc_minimal.so.4"),
    ],
)
def test_leaves_the_users_choice_alone(
    fake: _FakeLibc, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert not allocator.keep_freed_memory()
    assert fake.calls == []


def test_a_refusal_or_another_c_library_changes_nothing(
    fake: _FakeLibc, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.ok = 0  # mallopt refuses the value
    assert not allocator.keep_freed_memory()
    assert fake.calls == [(-3, 32 << 20)]
    monkeypatch.setattr(allocator, "_glibc", lambda: None)  # musl, macOS, Windows
    assert not allocator.keep_freed_memory()


def test_finds_glibc_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (allocator._glibc() is not None) == GLIBC
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator._glibc() is None
