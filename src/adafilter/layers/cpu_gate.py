"""The recurrent gate's eval step, and batch-1 gated layers, as compiled CPU code (issue 14).

In an eval forward each gated layer runs the gate's step -- pool the input, two to four small
matrix products, the LSTM cell, the head, the threshold -- as ~13 ATen calls; right after a
conv has streamed megabytes through the caches each call costs tens of microseconds, ~25 ms
of a ResNet-50 batch-1 forward (README, *Inference at the cost of plain fine-tuning*). Here the
whole step is one C++ loop nest over the same cached weights
(:class:`~.gate_weights.EvalWeights`), float32, CPU, any batch size; equal to the ATen step up
to summation order. At batch 1 a second function runs a whole gated layer -- the step, the
threshold, the recopy of the filters whose decision changed, the conv -- in one call from
Python (:func:`bind`). In training, the gated BN's four per-plane passes (``bn_stats``,
``bn_apply``, ``bn_sums``, ``bn_grads``: the CPU counterparts of the Triton kernels' per-plane
passes, reading only the routed branch where one suffices) replace about a dozen ATen calls and
full-size temporaries per layer (:func:`~.gated_bn.gated_batch_norm` uses them where built).

The C++ is ``csrc/cpu_gate.cpp`` (package data). It is compiled only when asked: by
:func:`build` (``adafilter build-kernels``) or :func:`ensure` (a CPU training run of a gated
method, in the foreground, announced once), with PyTorch's C++ extension tooling (a C++
compiler and ``ninja``, found by absolute path: the one installed beside this Python first)
into ``$ADAFILTER_HOME/kernels/<name>``, ``<name>`` keyed on the source, flags, torch, Python
and this CPU's instruction sets (it is built with ``-march=native``: a cache made on another
CPU family is not used). A forward never compiles and starts no process: where the library
is missing it keeps the ATen step. A cache directory or library that another user owns or
that group or others may write is refused (one warning, the ATen step; :func:`build` raises).
``ADAFILTER_CPU_GATE=0`` (or ``cpu_gate.ENABLED = False``) keeps the ATen step;
``ADAFILTER_CPU_GATE=prebuilt`` uses a built kernel but never builds one (not even
:func:`ensure`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .gate_weights import EvalWeights

_SETTING = os.environ.get("ADAFILTER_CPU_GATE", "1")
#: ``False`` (``ADAFILTER_CPU_GATE=0``): the ATen eval step even where the kernel is built.
ENABLED = _SETTING != "0"
#: ``False`` (``ADAFILTER_CPU_GATE=prebuilt``): use a built kernel but never build one.
AUTO_BUILD = _SETTING not in ("0", "prebuilt")
STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build

#: The C++ source, shipped as package data beside this module.
SOURCE_FILE = Path(__file__).resolve().parent / "csrc" / "cpu_gate.cpp"
_FLAGS = ["-O3", "-fopenmp-simd", "-march=native"]


@functools.cache
def _source() -> str:
    return SOURCE_FILE.read_text()


@functools.cache
def cpu_features() -> str:
    """This CPU's model and instruction sets (``/proc/cpuinfo`` flags where readable): what
    ``-march=native`` code depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return cpu


@functools.cache
def _name() -> str:
    """Module name: the source, flags, torch version and this CPU (``-march=native`` code must
    not run on another CPU sharing the cache directory)."""
    key = "\n".join([_source(), " ".join(_FLAGS), torch.__version__, sys.version, cpu_features()])
    return "adafilter_gate_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def build_directory() -> Path:
    """Where :func:`build` puts the compiled module (``$ADAFILTER_HOME/kernels/<name>``)."""
    from ..utils.download import cache_dir

    return cache_dir("kernels", _name())


_module: ModuleType | None = None
_looked = False  # get() looked for the library once (a build in this process sets _module)


def _library() -> Path:
    return build_directory() / f"{_name()}.so"  # the name torch's extension builder gives it


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_name(), path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_ninja() -> Path | None:
    """``ninja`` by absolute path: the one beside this Python (pip puts the ``ninja`` package
    there, also in a virtual environment that is not activated), else the first on ``PATH``."""
    beside = Path(sys.executable).parent / "ninja"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("ninja")
    return Path(found) if found else None


def find_compiler() -> str | None:
    """The C++ compiler torch's extension builder will use (``$CXX``, default ``c++``)."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _guarded_paths() -> list[Path]:
    """What an attacker able to write would control: ``$ADAFILTER_HOME``, ``kernels/``, the
    build directory and the library."""
    out = build_directory()
    return [out.parent.parent, out.parent, out, _library()]


def cache_problem() -> str | None:
    """Why the kernel cache must not be trusted (a path another user owns, or that group or
    others may write: importing a library from it runs their code), or ``None``."""
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    for path in _guarded_paths():
        try:
            st = path.stat()
        except OSError:
            continue  # not made yet
        if uid is not None and st.st_uid != uid:
            return f"{path} is owned by another user"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} is group- or world-writable (fix: chmod go-w {path})"
    return None


def _make_private(out: Path) -> None:
    """Create the build directory and the missing parents writable by this user only."""
    missing = [p for p in [out, *out.parents] if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o755, exist_ok=True)


# Run in a child Python with ninja's directory first on its PATH (torch runs `ninja` by name),
# so this process's environment is never changed: argv = name, source, build dir, flags, verbose.
_BUILD_SCRIPT = (
    "import json, sys; import torch.utils.cpp_extension as e; "
    "e.load(name=sys.argv[1], sources=[sys.argv[2]], build_directory=sys.argv[3], "
    "extra_cflags=json.loads(sys.argv[4]), verbose=sys.argv[5] == '1')"
)


def build(*, verbose: bool = False) -> Path:
    """Compile the kernel for this machine (about a minute) and return the library's path.

    Runs in the foreground: a child Python drives torch's extension builder (compiler and
    ninja processes) and is waited for.

    Raises:
        RuntimeError: No C++ compiler/ninja, an untrusted cache, or the build failed (the
            message says which).
    """
    global _module, _looked
    ninja, cxx = find_ninja(), find_compiler()
    if ninja is None or cxx is None:
        raise RuntimeError(
            "building the CPU kernels needs a C++ compiler and ninja "
            f"(found {'no compiler' if cxx is None else cxx}, "
            f"{'no ninja' if ninja is None else ninja}); install them (pip install ninja)"
        )
    out = build_directory()
    _make_private(out)
    problem = cache_problem()
    if problem:
        raise RuntimeError(f"refusing to build the CPU kernels into {out}: {problem}")
    lock = out / "lock"  # torch's build lock: one left by a killed build would block forever
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    env = dict(os.environ, PATH=os.pathsep.join([str(ninja.parent), os.environ.get("PATH", "")]))
    args = [_name(), str(SOURCE_FILE), str(out), json.dumps(_FLAGS), "1" if verbose else "0"]
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=None if verbose else subprocess.PIPE,
        stderr=None if verbose else subprocess.STDOUT,
        text=True,
        check=False,
    )
    lib = _library()
    if proc.returncode != 0 or not lib.is_file():
        tail = (proc.stdout or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RuntimeError(
            f"building the CPU gate kernel failed ({tail[0][:300]}); it needs a C++ compiler "
            "and ninja (pip install ninja); inference keeps the ATen step"
        )
    for path in (lib, out):  # a umask of 002 must not leave them group-writable
        path.chmod(path.stat().st_mode & ~(stat.S_IWGRP | stat.S_IWOTH))
    _module, _looked = _import(lib), True
    failed_marker().unlink(missing_ok=True)
    return lib


def get() -> ModuleType | None:
    """The built kernel module, or ``None`` (not built, disabled, untrusted or unloadable).

    Never builds and starts no process: the library is looked for once per process (a build
    in this process, :func:`build` or :func:`ensure`, is picked up at once). An untrusted
    cache (:func:`cache_problem`) or an unloadable library warns once and keeps the ATen step.
    """
    global _module, _looked
    if not ENABLED:
        return None
    if _module is not None or _looked:
        return _module
    _looked = True
    lib = _library()
    if not lib.is_file():
        return None
    problem = cache_problem()
    if problem:
        warnings.warn(
            f"not loading the CPU gate kernel: {problem}; using the ATen step", stacklevel=2
        )
        return None
    try:
        _module = _import(lib)
    except Exception as exc:  # noqa: BLE001 - a stale or foreign build: fall back
        warnings.warn(
            f"cannot load the CPU gate kernel {lib} ({exc}); using the ATen step. "
            "Rebuild it with: adafilter build-kernels",
            stacklevel=2,
        )
    return _module


def ensure(*, say: Callable[[str], None] | None = None) -> ModuleType | None:
    """The built module, compiled first in the foreground where it is missing, builds are
    allowed (:data:`AUTO_BUILD`) and a C++ compiler and ninja are present; ``None`` where it
    is turned off, not allowed to build, or the build failed (one warning). For a caller
    about to run for a while that asked for it (training, benchmarks). ``say`` announces a
    build. A failed build is recorded (:func:`failed_marker`) and not retried here until
    ``adafilter build-kernels`` succeeds: every training run would otherwise wait for the
    same failure."""
    if not ENABLED:
        return None
    module = get()
    if module is not None or not AUTO_BUILD or failed_marker().exists():
        return module
    if find_compiler() is None or find_ninja() is None:
        return None
    if say is not None:
        say(
            "compiling the CPU kernels once for this machine (about a minute; "
            "ADAFILTER_CPU_GATE=0 skips them)"
        )
    try:
        build()
    except RuntimeError as exc:
        from ..utils.io import atomic_write_text

        if cache_problem() is None:  # never write into an untrusted cache
            _make_private(failed_marker().parent)
            atomic_write_text(failed_marker(), f"{exc}\n")
        warnings.warn(
            f"{exc} (not tried again before training; `adafilter build-kernels` retries)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _module


def failed_marker() -> Path:
    """Written by :func:`ensure` when a build failed (the error), removed by a build that
    succeeds."""
    return build_directory() / "failed"


class Passes:
    """The gated BN's compiled CPU passes with the signatures of :mod:`.kernels`' Triton
    wrappers (what :func:`~.gated_bn.gated_batch_norm` calls on either device): float32,
    contiguous, CPU; ``sel`` (B, C) 0/1 float32."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def plane_stats(self, xf: Tensor, xs: Tensor, sel: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(self.module.bn_stats(xf, xs, sel))  # type: ignore[return-value]

    def select_affine(
        self, xf: Tensor, xs: Tensor, sel: Tensor, scale: Tensor, shift: Tensor
    ) -> Tensor:
        return self.module.bn_apply(xf, xs, sel, scale.contiguous(), shift.contiguous())

    def branch_stats(
        self,
        mean: Tensor,
        var: Tensor,
        sel: Tensor,
        hw: int,
        bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d],
        *,
        min_examples: int,
        min_values: int,
    ) -> tuple[Tensor, Tensor]:
        f, s = bns
        tensors = [
            t.data
            for bn in bns
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
        ]
        settings = [f.eps, s.eps, f.momentum, s.momentum]
        out = self.module.bn_branch_stats(
            mean, var, sel, hw, tensors, settings, min_examples, min_values
        )
        return out[0], out[1]

    def plane_sums(self, dy: Tensor, xf: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(self.module.bn_sums(dy, xf, xs))  # type: ignore[return-value]

    def branch_coeffs(
        self, sel: Tensor, stats: Tensor, use: Tensor, sum_dy: Tensor, sum_dy_x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.module.bn_coeffs(sel, stats.contiguous(), use.contiguous(), sum_dy, sum_dy_x)
        return out[0], out[1], out[2]

    def branch_grads(
        self,
        dy: Tensor,
        xf: Tensor,
        xs: Tensor,
        sel: Tensor,
        k: Tensor,
        want: tuple[bool, bool] = (True, True),
    ) -> tuple[Tensor | None, Tensor | None]:
        """As the Triton wrapper; a branch not in ``want`` is not computed (``None``)."""
        out = self.module.bn_grads(dy, xf, xs, sel, k, *want)
        return out[0], out[1]


def usable(x: Tensor, w: EvalWeights) -> bool:
    """The kernel can run this step: float32 CPU tensors, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.inp.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


EMPTY = torch.empty(0)  # absent optional arguments (no embedding, no state yet)


def step(
    module: ModuleType, x: Tensor, w: EvalWeights, state: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """:meth:`~.gate.RecurrentGate._step_eval` through the kernel (same weights and results,
    up to summation order)."""
    h0, c0 = state if state is not None else (EMPTY, EMPTY)
    logits, h, c = module.step(x, *_gate_args(w), h0, c0)
    return logits, (h, c)


class LayerStep(NamedTuple):
    """The gate's compiled step for one gated layer, which binds it with its filters."""

    module: ModuleType
    weights: EvalWeights
    sources: tuple[Tensor, ...]  # the gate parameters ``weights`` were computed from


class FilterBank(NamedTuple):
    """A batch-1 example's merged filters and the decisions they were merged for (CPU)."""

    prev: Tensor  # (C_out,) bool: the decisions ``weight`` and ``bias`` hold
    weight: Tensor  # (C_out, C_in / groups, kh, kw), BN folded in
    bias: Tensor  # (C_out,)


def bind(
    step: LayerStep,
    bank: FilterBank,
    folded: tuple[Tensor, Tensor, Tensor, Tensor],
    conv: nn.Conv2d,
    sources: Iterable[Tensor],
) -> Any:
    """A gated layer's whole batch-1 eval as one compiled object (the kernel's ``Layer``).

    ``run(x, h0, c0)`` runs the gate step, its decisions (Eq. 2), the recopy into ``bank``
    of the filters whose decision changed (from ``folded`` = BN-folded
    ``(w_f, b_f, w_s, b_s)``) and the conv with ``bank``'s filters; it returns
    ``[y (1, C_out, H', W'), decisions (1, C_out) bool, h, c]``, or ``[]`` when one of
    ``sources`` (the layer's parameters and buffers; the gate's come with ``step``) moved or
    changed in place since binding, or when ``x`` is not a float32 CPU batch of 1. Checking
    the sources there costs nanoseconds where Python's checks cost microseconds per layer.
    ``h0``, ``c0``: the LSTM state, or :data:`EMPTY` twice at the first layer. ``run``
    releases the GIL; callers serialise the runs that share a bank (the layer holds its
    bank's lock).
    """
    return step.module.Layer(
        list(_gate_args(step.weights)),
        [*bank, *folded],
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        conv.groups,
        [*step.sources, *sources],
    )


def _gate_args(w: EvalWeights) -> tuple[Tensor, ...]:
    """The eval weights in the kernel's argument order; the kernel only reads them."""
    emb = EMPTY if w.emb is None else w.emb.t()  # (E, C_in), the stored layout
    emb_bias = EMPTY if w.emb_bias is None else w.emb_bias
    return emb, emb_bias, w.inp, w.bias, w.hid, w.head, w.head_bias
