"""The recurrent gate's eval step as one compiled CPU function (issue 14).

In an eval forward each gated layer runs the gate's step -- pool the input, two to four small
matrix products, the LSTM cell, the head, the threshold -- as ~13 ATen calls; right after a
conv has streamed megabytes through the caches each call costs tens of microseconds, ~25 ms
of a ResNet-50 batch-1 forward (README, *Inference at the cost of plain fine-tuning*). Here the
whole step is one C++ loop nest over the same cached weights (:class:`~.gate._EvalWeights`),
float32, CPU, any batch size; equal to the ATen step up to summation order.

The function is compiled once per machine with PyTorch's C++ extension tooling (a C++
compiler and ``ninja`` are needed) by :func:`build` -- ``adafilter build-kernels`` -- into
``$ADAFILTER_HOME/kernels/``. Inference uses it whenever it has been built there (a
forward never compiles: the first build takes about a minute); ``ADAFILTER_CPU_GATE=0`` (or
``cpu_gate.ENABLED = False``) keeps the ATen step.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .gate import _EvalWeights

#: Set to ``False`` to keep the ATen eval step although the kernel is built.
ENABLED = os.environ.get("ADAFILTER_CPU_GATE", "1") != "0"

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// y[0:n] += a * x[0:n]
static inline void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// One eval step of the recurrent gate for every example of x (B, C_in, H, W), float32.
// emb (E, C_in) and emb_bias (E) or empty; inp (K, 4H); bias (4H); hid (H, 4H);
// head (H, C_out); head_bias (C_out); h0, c0 (B, H) or empty. The g rows are pre-doubled:
// tanh(g) = 2 sigmoid(2 g) - 1. Returns logits (B, C_out), h, c (B, H).
std::vector<at::Tensor> step(const at::Tensor& x, const at::Tensor& emb,
                             const at::Tensor& emb_bias, const at::Tensor& inp,
                             const at::Tensor& bias, const at::Tensor& hid,
                             const at::Tensor& head, const at::Tensor& head_bias,
                             const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x must be (B, C, H, W) float32");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t K = inp.size(0), G4 = inp.size(1), Hd = G4 / 4, Co = head.size(1);
  const bool has_emb = emb.numel() > 0, has_state = h0.numel() > 0;
  const int64_t E = has_emb ? emb.size(0) : 0;
  TORCH_CHECK(K == (has_emb ? E : C), "input map does not match the input channels");
  TORCH_CHECK(!has_emb || emb.size(1) == C, "embedding does not match the input channels");
  for (const at::Tensor* t : {&emb, &emb_bias, &inp, &bias, &hid, &head, &head_bias, &h0, &c0})
    TORCH_CHECK(t->numel() == 0 || (t->is_contiguous() && t->scalar_type() == at::kFloat),
                "gate weights must be contiguous float32");
  const at::Tensor xc = x.contiguous();
  at::Tensor logits = at::empty({B, Co}, x.options());
  at::Tensor h = at::empty({B, Hd}, x.options()), c = at::empty({B, Hd}, x.options());
  std::vector<float> pooled(C), e(has_emb ? E : 1), gates(G4);
  const float alpha = 1.f / static_cast<float>(HW);
  const float* xp = xc.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    // global average pool, over ATen's threads for large inputs (the early layers)
    at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const float* p = xp + (b * C + ch) * HW;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < HW; ++i) acc += p[i];
        pooled[ch] = acc * alpha;
      }
    });
    const float* v = pooled.data();
    if (has_emb) {  // the layer's 1x1 conv on the pooled vector
      const float* we = emb.data_ptr<float>();
      for (int64_t j = 0; j < E; ++j) {
        const float* row = we + j * C;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < C; ++i) acc += row[i] * v[i];
        e[j] = acc + emb_bias.data_ptr<float>()[j];
      }
      v = e.data();
    }
    std::copy(bias.data_ptr<float>(), bias.data_ptr<float>() + G4, gates.begin());
    const float* wi = inp.data_ptr<float>();
    for (int64_t k = 0; k < K; ++k) axpy(v[k], wi + k * G4, gates.data(), G4);
    float* hp = h.data_ptr<float>() + b * Hd;
    float* cp = c.data_ptr<float>() + b * Hd;
    if (has_state) {
      const float* wh = hid.data_ptr<float>();
      const float* hprev = h0.data_ptr<float>() + b * Hd;
      for (int64_t j = 0; j < Hd; ++j) axpy(hprev[j], wh + j * G4, gates.data(), G4);
    }
    for (int64_t j = 0; j < Hd; ++j) {  // the LSTM cell, PyTorch's gate order i, f, g, o
      const float i_ = 1.f / (1.f + std::exp(-gates[j]));
      const float f_ = 1.f / (1.f + std::exp(-gates[Hd + j]));
      const float g2 = 1.f / (1.f + std::exp(-gates[2 * Hd + j]));
      const float o_ = 1.f / (1.f + std::exp(-gates[3 * Hd + j]));
      float cc = i_ * (2.f * g2 - 1.f);
      if (has_state) cc += f_ * c0.data_ptr<float>()[b * Hd + j];
      cp[j] = cc;
      hp[j] = o_ * std::tanh(cc);
    }
    float* lp = logits.data_ptr<float>() + b * Co;
    std::copy(head_bias.data_ptr<float>(), head_bias.data_ptr<float>() + Co, lp);
    const float* wo = head.data_ptr<float>();
    for (int64_t j = 0; j < Hd; ++j) axpy(hp[j], wo + j * Co, lp, Co);
  }
  return {logits, h, c};
}
"""

_FLAGS = ["-O3", "-fopenmp-simd", "-march=native"]


@functools.cache
def _name() -> str:
    """Module name: the source, flags, torch version and this CPU (``-march=native`` code must
    not run on another CPU sharing the cache directory)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:  # the instruction sets the build may use
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    key = "\n".join([SOURCE, " ".join(_FLAGS), torch.__version__, sys.version, cpu])
    return "adafilter_gate_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def build_directory() -> Path:
    """Where :func:`build` puts the compiled module (``$ADAFILTER_HOME/kernels/<name>``)."""
    from ..utils.download import cache_dir

    return cache_dir("kernels", _name())


_module: ModuleType | None = None
_looked = False


def _library() -> Path:
    return build_directory() / f"{_name()}.so"  # the name torch's extension builder gives it


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_name(), path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(*, verbose: bool = False) -> Path:
    """Compile the kernel for this machine (about a minute) and return the library's path.

    Raises:
        RuntimeError: No C++ compiler/ninja, or the build failed (the message says which).
    """
    global _module, _looked
    from torch.utils.cpp_extension import load_inline

    out = build_directory()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _module = load_inline(
            name=_name(),
            cpp_sources=SOURCE,
            functions=["step"],
            extra_cflags=_FLAGS,
            build_directory=str(out),
            verbose=verbose,
        )
    except Exception as exc:  # noqa: BLE001 - any toolchain failure: one message
        raise RuntimeError(
            f"building the CPU gate kernel failed ({type(exc).__name__}: {exc}); it needs a C++ "
            "compiler and ninja (pip install ninja); inference keeps the ATen step"
        ) from exc
    _looked = True
    return _library()


def get() -> ModuleType | None:
    """The built kernel module, or ``None`` (not built here, disabled, or unloadable)."""
    global _module, _looked
    if not ENABLED:
        return None
    if _module is None and not _looked:
        _looked = True
        lib = _library()
        if lib.is_file():
            try:
                _module = _import(lib)
            except Exception as exc:  # noqa: BLE001 - a stale or foreign build: fall back
                warnings.warn(
                    f"cannot load the CPU gate kernel {lib} ({exc}); using the ATen step. "
                    "Rebuild it with: adafilter build-kernels",
                    stacklevel=2,
                )
    return _module


def usable(x: Tensor, w: _EvalWeights) -> bool:
    """The kernel can run this step: float32 CPU tensors, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.inp.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def step(
    module: ModuleType, x: Tensor, w: _EvalWeights, state: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """:meth:`~.gate.RecurrentGate._step_eval` through the kernel (same weights and results,
    up to summation order)."""
    empty = x.new_empty(0)
    emb = empty if w.emb is None else w.emb.t()  # (E, C_in), the stored layout
    emb_bias = empty if w.emb_bias is None else w.emb_bias.detach()
    h0, c0 = state if state is not None else (empty, empty)
    logits, h, c = module.step(
        x,
        emb.detach(),
        emb_bias,
        w.inp,
        w.bias,
        w.hid,
        w.head,
        w.head_bias.detach(),
        h0,
        c0,
    )
    return logits, (h, c)
