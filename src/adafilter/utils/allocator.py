"""CPU training's memory allocator: keep freed blocks in the process (glibc).

glibc's ``malloc`` hands large freed blocks back to the kernel: a block above its mmap threshold
is unmapped, and the heap is trimmed whenever its free top exceeds the trim threshold. The next
step's activations of the same size then fault in fresh, zeroed pages. A ResNet-50 training step
at batch 8 allocates and frees activations of 6-50 MB every layer; AdaFilter, which keeps both
branches' outputs, crossed the trim threshold every step and took ~50-100k page faults per step
(fine-tuning: 0-40k), measured with ``getrusage`` (see README, *CPU training*). Fixing both
thresholds (which also stops glibc's dynamic adjustment of them) keeps the blocks for reuse;
blocks above 32 MB, glibc's largest mmap threshold, are still mapped afresh.
PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) gets the same effect by preloading
jemalloc or tcmalloc; this is the in-process equivalent for glibc.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["ENV", "glibc_version", "keep_freed_memory"]

#: ``ADAFILTER_MALLOC=0`` leaves glibc's defaults alone.
ENV = "ADAFILTER_MALLOC"
_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap and are reused (glibc's largest value on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Free heap kept before trimming: well above one step's transient activations.
TRIM_THRESHOLD = 1 << 30
#: The user's own allocator choice, which this leaves alone.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_done = False


def keep_freed_memory(*, say: Callable[[str], None] | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds so a training step's freed activations are reused.

    Process-wide and once per process; call it before a CPU training run (``adafilter train``
    does, for every method). Does nothing with ``ADAFILTER_MALLOC=0``, where the user set glibc's
    ``MALLOC_*_`` variables or ``glibc.malloc`` tunables or preloaded another allocator, or on a
    C library other than glibc.

    Args:
        say: Logs one line when the thresholds are set.

    Returns:
        Whether the thresholds are set (now or by an earlier call).
    """
    global _done
    if _done:
        return True
    if os.environ.get(ENV, "1") == "0" or _user_chose():
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mmap first: fixing either threshold also freezes the other at its current value
    _done = bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if _done and say is not None:
        say(f"glibc malloc keeps freed memory for reuse ({ENV}=0 leaves its defaults)")
    return _done


def _user_chose() -> bool:
    preload = os.environ.get("LD_PRELOAD", "")
    return (
        any(k in os.environ for k in _USER_SETTINGS)
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
        or any(name in preload for name in _OTHER_ALLOCATORS)
    )


def glibc_version() -> tuple[int, int] | None:
    """The running glibc's ``(major, minor)``, or ``None`` on another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # None (undefined), musl, macOS, Windows
        return None


def _glibc() -> ctypes.CDLL | None:
    if glibc_version() is None:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
