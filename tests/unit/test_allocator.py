"""``utils/allocator.py``: glibc keeps a training step's freed activations for the next step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adafilter.utils import allocator

VERSION = allocator.glibc_version()

# A 31 MB block (a large activation): mmapped and unmapped again under glibc's defaults (their
# threshold starts at 128 kB), from the heap and kept there for reuse with the thresholds fixed
# (glibc's own counters, mallinfo2). Then four 24 MB blocks allocated, touched and freed per
# step: with freed memory kept they fault in no fresh pages once warm.
_STEPS = """
import ctypes, resource, torch
from adafilter.utils.allocator import keep_freed_memory
kept = keep_freed_memory()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = libc.mallinfo2()
block = torch.ones(31 << 18)
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
def step():
    blocks = [torch.ones(6 << 20) for _ in range(4)]
    del blocks
for _ in range(10):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
print(kept, (during.hblkhd - before.hblkhd) >> 20, (after.fordblks - before.fordblks) >> 20, faults)
"""


def _run(setting: str) -> tuple[bool, int, int, float]:
    """(kept, MB mmapped for the 31 MB block, MB of free heap kept after it, faults per step)."""
    env = {**os.environ, allocator.ENV: setting, "OMP_NUM_THREADS": "1", "LD_PRELOAD": ""}
    env.pop("GLIBC_TUNABLES", None)
    for name in allocator._USER_SETTINGS:
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2]), float(out[3])


@pytest.mark.skipif(VERSION is None or VERSION < (2, 33), reason="glibc >= 2.33 (mallinfo2)")
def test_freed_blocks_stay_in_the_heap_for_reuse() -> None:
    kept, mapped, free_heap, faults = _run("1")
    assert kept and mapped == 0 and free_heap >= 30  # from the heap, and kept there
    assert faults < 100  # 0 here; under glibc's defaults ~24.6k (every page) or 0, by layout
    kept, mapped, free_heap, _ = _run("0")
    assert not kept and mapped >= 31 and free_heap <= 1  # mmapped, and handed back


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
    for name in (allocator.ENV, "LD_PRELOAD", "GLIBC_TUNABLES", *allocator._USER_SETTINGS):
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
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000"),
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
    assert (allocator._glibc() is not None) == (VERSION is not None)
    monkeypatch.setattr(allocator.os, "confstr", lambda name: "musl 1.2.4")
    assert allocator.glibc_version() is None and allocator._glibc() is None

    def missing(name: str) -> str:
        raise ValueError("unrecognized configuration name")  # macOS, Windows

    monkeypatch.setattr(allocator.os, "confstr", missing)
    assert allocator.glibc_version() is None
    monkeypatch.setattr(allocator.os, "confstr", lambda name: "glibc 2.17")
    assert allocator.glibc_version() == (2, 17)
